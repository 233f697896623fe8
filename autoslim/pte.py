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

__all__ = ["export_pte", "pte_predictions"]

_LAYER_OPS = ("conv", "linear", "addmm")
# ops that take a layer's output without changing which layer it belongs to (the quantizer
# fuses them with it and asks about the last one)
_FOLLOWERS = ("batch_norm", "relu", "hardtanh", "clamp", "hardswish", "silu", "sigmoid")
CALIBRATION_IMAGES = 64  # PT2E observers' images (batch 1 each: the program's shape)


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


def _layer_of(node) -> str | None:
    """The conv/linear module a graph node computes or directly follows (None: neither)."""
    for _ in range(4):
        if node.op != "call_function":
            return None
        target = str(node.target)
        if any(k in target for k in _LAYER_OPS):
            stack = node.meta.get("nn_module_stack") or {}
            return list(stack.values())[-1][0] if stack else None
        if not any(k in target for k in _FOLLOWERS) or not node.args:
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
) -> ExportResult:
    """Write ``model`` (float weights, fake quantization stripped) as the ``.pte`` program of
    ``config``: its int8 layers quantized by PT2E with the XNNPACK quantizer (calibrated on
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
                program = torch.export.export(_quantize(program, int8, calib, x), (x,))
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


def _quantize(program, int8: set[str], calib: torch.Tensor | None, x: torch.Tensor) -> nn.Module:
    """PT2E: the int8 layers annotated by the XNNPACK quantizer, observed on ``calib``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calib is None:
        raise ExportError("int8 layers need calibration images (calib=...)")
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))

    def keep(node) -> bool:  # float layers (and what follows them) stay float
        layer = _layer_of(node)
        return layer is None or layer in int8

    quantizer.set_filter_function(keep)
    prepared = prepare_pt2e(program.module(), quantizer)
    for img in calib[:CALIBRATION_IMAGES]:
        prepared(img[None].float())
    return convert_pt2e(prepared)


def pte_predictions(artifact: str | Path, split: Split, *, batch_size: int = 64) -> torch.Tensor:
    """The split task's compact predictions of the ``.pte`` program (run by ExecuTorch, one
    image per execution) on ``split``, batch by batch."""
    batches = (xb.numpy() for xb in split.batches(batch_size))
    outs = [
        split.task.predictions(torch.from_numpy(np.asarray(o)))
        for o in pte_outputs(artifact, batches)
    ]
    return torch.cat(outs) if outs else torch.empty(0)
