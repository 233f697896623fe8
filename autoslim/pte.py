"""The ExecuTorch artifact: a ``.pte`` program lowered to the XNNPACK delegate.

- ``torch.export.export`` of the compressed model (fake quantization stripped, batch 1: the
  deployed shape);
- the layers the config makes int8 (int8 weights and int8 activations: what recovery simulated)
  are quantized through the PT2E flow with ExecuTorch's ``XNNPACKQuantizer`` (per-channel
  symmetric weights, per-tensor activations calibrated on the recovery's images); every other
  layer stays float;
- ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner``, then ``to_executorch``; the
  program's bytes are written to a temp name and renamed into place.

XNNPACK runs int8 and float layers; int4 or fp16 weights and weight-only layers are refused here
(one line naming the layer) rather than written as something the runtime would not run as asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifact import ExportResult
from .config import CompressionConfig
from .data import Split
from .errors import ExportError
from .measure.executorch import pte_outputs
from .passes.quantize import layer_config

__all__ = ["export_pte", "pte_predictions", "OneByOne"]

_LAYER_OPS = ("conv", "linear", "addmm")
# ops that take a layer's output without changing which layer it belongs to (the quantizer
# fuses them with it and asks about the last one)
_FOLLOWERS = ("batch_norm", "relu", "hardtanh", "clamp", "hardswish", "silu", "sigmoid")
CALIBRATION_IMAGES = 256  # PT2E observers' images (batch 1 each: the program's shape)
# set the observers to recovery's trained activation ranges (off: measured 64-71% agreement on
# MobileNetV3-small, where PT2E quantises SE and hard-swish tensors recovery keeps float and
# shares one range between tensors that recovery ranges apart); off, histogram calibration
TRAINED_RANGES = False


@contextlib.contextmanager
def _quiet():
    """ExecuTorch and torch.export log and warn while lowering; the CLI keeps one line."""
    loggers = [
        logging.getLogger(n) for n in ("executorch", "torch", "torchao", "torch.utils._pytree")
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


# what ONNX Runtime folds into a conv's output (the tensor recovery's ``LAYER:out`` range covers)
_FOLDED = ("batch_norm", "relu", "hardtanh", "clamp")


def _layer_of(node, through: tuple[str, ...] = _FOLLOWERS) -> str | None:
    """The conv/linear module a graph node computes or directly follows through ``through``
    ops (None: neither)."""
    for _ in range(4):
        if node.op != "call_function":
            return None
        target = str(node.target)
        if any(k in target for k in _LAYER_OPS):
            stack = node.meta.get("nn_module_stack") or {}
            return list(stack.values())[-1][0] if stack else None
        if not any(k in target for k in through) or not node.args:
            return None
        node = node.args[0]
        if not hasattr(node, "op"):
            return None
    return None


def _int8_layers(model: nn.Module, config: CompressionConfig, factorized: set[str]) -> set[str]:
    """Names of the conv/linear layers the program holds in int8; refuses what XNNPACK's
    static int8 flow cannot hold."""
    out = set()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        cfg = layer_config(config, name, factorized)
        if cfg.weight_bits == 16:
            raise ExportError(
                f"layer {name} asks fp16 weights, which the executorch-xnnpack artifact does "
                "not write; use a space with weight_bits 8 or 32 for this runtime"
            )
        if not cfg.quantized:
            continue
        if cfg.weight_bits != 8 or cfg.act_bits != 8:
            raise ExportError(
                f"layer {name} asks int{cfg.weight_bits} weights with {cfg.act_bits}-bit "
                "activations; the executorch-xnnpack artifact holds int8 weights with int8 "
                "activations or float layers: use a space with weight_bits [8, 32] and "
                "act_bits 8 for this runtime"
            )
        out.add(name)
    return out


def export_pte(
    model: nn.Module,
    path: str | Path,
    *,
    example: torch.Tensor,
    config: CompressionConfig | None = None,
    calib: torch.Tensor | None = None,
    factorized: set[str] | None = None,
    act_ranges: dict[str, list[float]] | None = None,
) -> ExportResult:
    """Write ``model`` (float weights, fake quantization stripped) as the ``.pte`` program of
    ``config``: its int8 layers quantized by PT2E with the XNNPACK quantizer on recovery's
    grids (``act_ranges``: the trained activation ranges; without them, ranges observed on
    ``calib``), lowered to XNNPACK. Raises :class:`ExportError` naming what failed."""
    with _quiet():  # torchao, imported by ExecuTorch, warns at import
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = config or CompressionConfig()
    model = model.eval()
    x = example[:1].contiguous()
    int8 = _int8_layers(model, config, factorized or set())
    result = ExportResult(path, 0, exporter="torch.export+xnnpack")
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(model, (x,))
            if int8:
                result.reference = _quantize(program, int8, calib, act_ranges)
                program = torch.export.export(result.reference, (x,))
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            buffer = lowered.to_executorch().buffer
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - export, PT2E and lowering raise many types
        raise ExportError(
            f"ExecuTorch export failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            "try the onnxruntime-cpu backend for this model"
        ) from e
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer)
        os.replace(tmp, path)  # atomic: never a half-written artifact
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for name in sorted(int8):
        result.layers[name] = "int8-weights/int8-activations (XNNPACK)"
    result.size_bytes = path.stat().st_size
    return result


def _quantize(
    program,
    int8: set[str],
    calib: torch.Tensor | None,
    act_ranges: dict[str, list[float]] | None,
) -> nn.Module:
    """PT2E: the int8 layers annotated by the XNNPACK quantizer in the scheme recovery trained
    with: per-channel symmetric weights on the same 7-bit grid (``QRANGE[8]``), per-tensor
    activations whose ranges are the trained ones (``act_ranges``: the observers are MinMax
    ones, observed on ``calib`` and then set to the trained range of the tensor they watch;
    an int8 zero point shifted by 128 from the uint8 one is the same grid)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calib is None:
        raise ExportError("int8 layers need calibration images (calib=...)")
    config = get_symmetric_quantization_config(is_per_channel=True)
    if act_ranges and TRAINED_RANGES:
        minmax = MinMaxObserver.with_args(eps=2**-12)
        config = dataclasses.replace(
            config,
            input_activation=dataclasses.replace(
                config.input_activation, observer_or_fake_quant_ctr=minmax
            ),
            output_activation=dataclasses.replace(
                config.output_activation, observer_or_fake_quant_ctr=minmax
            ),
        )
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(config)

    def keep(node) -> bool:  # float layers (and what follows them) stay float
        layer = _layer_of(node)
        return layer is None or layer in int8

    quantizer.set_filter_function(keep)
    prepared = prepare_pt2e(program.module(), quantizer)
    for img in calib[:CALIBRATION_IMAGES]:
        prepared(img[None].float())
    if act_ranges and TRAINED_RANGES:
        _set_trained_ranges(prepared, act_ranges)
    return convert_pt2e(prepared)


def _set_trained_ranges(prepared: nn.Module, act_ranges: dict[str, list[float]]) -> int:
    """Give every activation observer the range recovery trained for its tensor: the output
    of the layer that makes it, or else the input of a layer that reads it. Returns how many
    were set (the others keep their calibrated range: adds, pools)."""
    done = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in str(node.target):
            continue
        obs = prepared.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) == "get_attr" or hasattr(obs, "ch_axis"):
            continue  # a weight's (per-channel) observer: the weight grid is set by the config
        keys = []
        layer = _layer_of(src, _FOLDED) if hasattr(src, "op") else None
        if layer is not None:
            keys += [f"{layer}:out", f"{layer}:act"]
        for user in node.users:
            target = str(getattr(user, "target", ""))
            if user.op == "call_function" and any(k in target for k in _LAYER_OPS):
                consumer = _layer_of(user)
                if consumer is not None:
                    keys.append(f"{consumer}:in")
        found = next((act_ranges[k] for k in keys if k in act_ranges), None)
        if found is not None and hasattr(obs, "min_val"):
            lo, hi = min(found[0], 0.0), max(found[1], 0.0)
            obs.min_val = torch.tensor(lo, dtype=torch.float32)
            obs.max_val = torch.tensor(hi, dtype=torch.float32)
            done += 1
    return done


class OneByOne(nn.Module):
    """A batch-1 graph (an exported program's module) run image by image on a batch."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> OneByOne:
        self.training = mode  # an exported graph has no modes (PT2E refuses train()/eval())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.graph(x[i : i + 1]) for i in range(len(x))])


def pte_predictions(artifact: str | Path, split: Split, *, batch_size: int = 64) -> torch.Tensor:
    """The split task's compact predictions of the ``.pte`` program (run by ExecuTorch, one
    image per execution) on ``split``, batch by batch."""
    batches = (xb.numpy() for xb in split.batches(batch_size))
    outs = [
        split.task.predictions(torch.from_numpy(np.asarray(o)))
        for o in pte_outputs(artifact, batches)
    ]
    return torch.cat(outs) if outs else torch.empty(0)
