"""The deployable artifact: one self-contained ONNX file, built from a compressed model.

- float export with ``torch.onnx.export(..., external_data=False)`` at opset 21 (dynamic batch);
- layers with int8/int4 weights and uint8 activations: ONNX Runtime's ``quantize_static`` in QDQ
  format, per-channel symmetric weights, with the activation ranges that recovery trained with
  passed as overrides (so what was trained is what ships);
- weight-only layers (int8/int4 weights, float activations): the weight stored as an integer
  initializer with a per-channel ``DequantizeLinear``;
- fp16 layers: the weight stored as float16 with a ``Cast`` back to float (half the bytes; ORT
  CPU computes in fp32);
- everything else stays float. The file is written to a temp name and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .config import CompressionConfig, LayerConfig
from .data import Split, batched
from .errors import ExportError
from .measure.backends import artifact_kind
from .measure.executorch import pte_outputs
from .measure.ort import ort_session
from .passes.quantize import QRANGE, act_qparams, layer_config, split_add_key
from .tasks import Classification, Task

__all__ = [
    "ExportResult",
    "export_onnx",
    "estimate_size",
    "latency_features",
    "calibrate_size",
    "SizeCalibration",
    "ort_session",
    "onnx_predict",
    "artifact_accuracy",
    "artifact_scores",
    "artifact_predictions",
    "runtime_agreement",
    "agreement",
    "diagnose_divergence",
    "OPSET",
    "EXPORTERS",
]

OPSET = 21


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    layers: dict[str, str] = field(default_factory=dict)  # layer -> scheme in the file
    skipped: list[dict] = field(default_factory=list)
    agreement: float | None = None  # top-1 agreement with the PyTorch model, when gated
    exporter: str = "dynamo"  # which exporter wrote the float graph (see EXPORTERS)
    tensors: dict[str, str] = field(default_factory=dict)  # act-range key -> ONNX tensor
    # what the file is gated against when not the trained model itself: an ExecuTorch
    # program's quantized PyTorch graph (PT2E), batch 1
    reference: nn.Module | None = field(default=None, repr=False)


EXPORTERS = ("dynamo", "dynamo-static-batch", "torchscript")


@contextlib.contextmanager
def _quiet_logs():
    """Silence the root and torch loggers for a block, then restore their levels (the
    exporters and ORT's quantizer log tracebacks and hints that are not the user's business)."""
    loggers = [logging.getLogger(), logging.getLogger("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _out_of_place(model: nn.Module):
    """In-place activations (``Hardswish(inplace=True)``, ``ReLU(inplace=True)``) off for a
    block, then restored. torch.export decomposes ``hardswish_`` op by op: exporting
    MobileNetV3-small took 92.6 s in place and 12.8 s out of place, with the same ONNX graph
    (52 Conv, 19 HardSwish, 9 HardSigmoid, ...) and identical outputs."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


def _float_export(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write the float ONNX file; return which exporter wrote it.

    ``torch.export`` with a dynamic batch first; where that fails (ConvNeXt's ranges, some
    user models) the same exporter with a static batch of 1 (the deployed shape), then the
    TorchScript exporter with a dynamic batch. Raises :class:`ExportError` naming each failure.
    """
    import warnings

    model.eval()
    errors = []
    for how in EXPORTERS:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_logs(), _out_of_place(model):
            warnings.simplefilter("ignore")
            try:
                if how == "torchscript":
                    torch.onnx.export(
                        model,
                        (example,),
                        str(path),
                        dynamo=False,
                        opset_version=OPSET,
                        input_names=["x"],
                        output_names=["logits"],
                        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                    )
                else:
                    dyn = ({0: torch.export.Dim("batch")},) if how == "dynamo" else None
                    prog = torch.onnx.export(
                        model,
                        (example,),
                        None,
                        dynamo=True,
                        external_data=False,
                        opset_version=OPSET,
                        dynamic_shapes=dyn,
                        verbose=False,
                    )
                    prog.save(str(path), external_data=False)
                return how
            except Exception as e:  # noqa: BLE001 - torch.onnx raises many types
                errors.append(f"{how}: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
    raise ExportError("ONNX export failed with every exporter (" + "; ".join(errors) + ")")


class _Reader:
    """CalibrationDataReader over a float32 array."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 64) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i : self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def _weight_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv/Gemm/MatMul nodes keyed by the torch module name of their weight initializer."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            w = node.input[1]
            if w in inits and w.endswith(".weight"):
                out[w[: -len(".weight")]] = node
    return out


def _pack(q: np.ndarray, bits: int) -> bytes:
    """Raw bytes of integer values: int8 as is, int4 two per byte (low nibble first)."""
    flat = q.astype(np.int8).ravel()
    if bits == 8:
        return flat.tobytes()
    nib = (flat & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def _store_weight(model: onnx.ModelProto, wname: str, bits: int) -> None:
    """Replace float initializer ``wname`` by fp16+Cast or int8/int4+DequantizeLinear."""
    g = model.graph
    idx = next(i for i, t in enumerate(g.initializer) if t.name == wname)
    w = numpy_helper.to_array(g.initializer[idx]).astype(np.float32)
    del g.initializer[idx]
    if bits == 16:
        g.initializer.append(numpy_helper.from_array(w.astype(np.float16), wname + "_fp16"))
        g.node.insert(
            0,
            helper.make_node(
                "Cast", [wname + "_fp16"], [wname], to=TensorProto.FLOAT, name=wname + "_cast"
            ),
        )
        return
    qmin, qmax = QRANGE[bits]
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(1)
    scale = np.maximum(2 * absmax / (qmax - qmin), np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), qmin, qmax)
    dtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    g.initializer.append(helper.make_tensor(wname + "_q", dtype, q.shape, _pack(q, bits), raw=True))
    g.initializer.append(numpy_helper.from_array(scale, wname + "_scale"))
    g.initializer.append(
        helper.make_tensor(
            wname + "_zp", dtype, scale.shape, _pack(np.zeros(scale.shape), bits), raw=True
        )
    )
    g.node.insert(
        0,
        helper.make_node(
            "DequantizeLinear",
            [wname + "_q", wname + "_scale", wname + "_zp"],
            [wname],
            axis=0,
            name=wname + "_dq",
        ),
    )


def _fixed_width(model: onnx.ModelProto) -> None:
    """Store every initializer as raw bytes, in place.

    ORT's quantizer writes zero points as ``int32_data`` (varints: 1 or 2 bytes per value,
    10 for a negative one), so the file size would move with the calibrated activation ranges.
    Raw storage makes the size a function of the architecture and bit-widths only: a retrained
    (refined, replayed) model of the same config has exactly the same size.
    """
    from onnx import numpy_helper

    for i, t in enumerate(model.graph.initializer):
        if t.raw_data or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        fixed = numpy_helper.from_array(numpy_helper.to_array(t), t.name)
        model.graph.initializer[i].CopyFrom(fixed)


def drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces, in place.

    They name the source files of the installation (``.../site-packages/torch/...``), so the same
    model exported from two virtual environments gave files a few bytes apart, and they tell
    whoever receives the artifact where it was built. Op metadata that depends only on the graph
    (namespace, FX node, class hierarchy) stays.
    """
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip")  # op types the file quantises


def _readers(om: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in om.graph.node:
        for t in node.input:
            out.setdefault(t, []).append(node)
    return out


def _activation_tensors(
    om: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], act_ranges: dict[str, list[float]]
) -> dict[str, str]:
    """Key of ``act_ranges`` -> ONNX tensor name, for every activation training fake-quantised.

    ``act_ranges`` keys are ``LAYER:in`` (the input of LAYER's node), ``LAYER:out`` (its output)
    and ``LAYER:act`` (the output of the Relu/Clip that alone reads LAYER's output: ONNX
    Runtime's quantizer removes that activation and quantises its output in the conv's place).
    """
    readers = _readers(om)
    adds = {frozenset(n.input): n for n in om.graph.node if n.op_type == "Add"}
    out: dict[str, str] = {}
    pending = sorted(act_ranges, key=lambda k: k.startswith("add("))  # layers, then adds
    for _ in range(len(pending) + 1):  # an add may read another add's output
        later = []
        for key in pending:
            layer, _, role = key.rpartition(":")
            if layer.startswith("add("):
                a, b = split_add_key(layer)
                if a not in out or b not in out:
                    later.append(key)
                    continue
                node = adds.get(frozenset((out[a], out[b])))
                tensor = node.output[0] if node is not None else None
            else:
                node = nodes.get(layer)
                tensor = None if node is None else node.input[0] if role == "in" else node.output[0]
            if tensor is None:
                continue
            if role == "act":
                after = readers.get(tensor, [])
                if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
                    tensor = after[0].output[0]
            out[key] = tensor
        if not later or later == pending:
            break
        pending = later
    return out


def _simulated_adds(om: onnx.ModelProto, tensors: dict[str, str]) -> set[str]:
    """Names of the Add nodes whose output training quantised (the others stay float)."""
    made = {t for k, t in tensors.items() if k.startswith("add(")}
    readers = _readers(om)
    out = set()
    for node in om.graph.node:
        if node.op_type != "Add":
            continue
        after = readers.get(node.output[0], [])
        folded = len(after) == 1 and after[0].op_type in ("Relu", "Clip")
        if node.output[0] in made or (folded and after[0].output[0] in made):
            out.add(node.name)
    return out


def _float_outputs(om: onnx.ModelProto) -> None:
    """Keep the graph's outputs float, in place: where ONNX Runtime's quantizer put a
    Quantize/Dequantize pair on an output (a conv writing a segmentation model's logits; it
    renames the producer's tensor ``NAME_QuantizeLinear_Input``), the pair is removed and the
    producer writes the output again. Rounding the logits to 8 bits flips near-tied argmaxes
    and saves no compute; training never simulates it."""
    outputs = {o.name for o in om.graph.output}
    dq = {n.output[0]: n for n in om.graph.node if n.op_type == "DequantizeLinear"}
    q_by_out = {n.output[0]: n for n in om.graph.node if n.op_type == "QuantizeLinear"}
    drop = []
    for name in outputs:
        d = dq.get(name)
        q = q_by_out.get(d.input[0]) if d is not None else None
        if q is None:
            continue
        producer = next((n for n in om.graph.node if q.input[0] in n.output), None)
        if producer is None:
            continue
        readers = [n for n in om.graph.node if q.input[0] in n.input and n is not q]
        if readers:  # the float tensor has other readers: leave the graph alone
            continue
        producer.output[list(producer.output).index(q.input[0])] = name
        drop += [q, d]
    for n in drop:
        om.graph.node.remove(n)


def _check_quantized_tensors(om: onnx.ModelProto, simulated: set[str]) -> None:
    """Refuse a file that quantises an activation training did not simulate (with its range)."""
    inits = {i.name for i in om.graph.initializer}
    extra = sorted(
        n.input[0]
        for n in om.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] not in simulated
    )
    if extra:
        raise ExportError(
            f"ONNX Runtime quantised {len(extra)} activation tensors that training did not "
            f"simulate ({', '.join(extra[:4])}); the file would not compute the trained model. "
            "Set act_bits=32 for the layers around them"
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example: torch.Tensor,
    config: CompressionConfig | None = None,
    act_ranges: dict[str, list[float]] | None = None,
    calib: torch.Tensor | None = None,
    factorized: set[str] | None = None,
) -> ExportResult:
    """Write ``model`` (float weights, fake quantization stripped) as the artifact of ``config``.

    ``act_ranges`` (from :func:`~autoslim.passes.quantize.act_ranges_of`) are the activation
    ranges training simulated; every activation the file quantises must be one of them, or
    :class:`ExportError` is raised. Without them (None) int8 layers are post-training quantised
    with ONNX Runtime's own MinMax calibration on ``calib``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = config or CompressionConfig()
    strict = act_ranges is not None  # None: plain post-training quantization by ORT
    act_ranges = act_ranges or {}
    factorized = factorized or set()
    result = ExportResult(path, 0)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmpd:
        fp = Path(tmpd) / "float.onnx"
        result.exporter = _float_export(model, example[:1], fp)
        om = onnx.load(str(fp))
        nodes = _weight_nodes(om)
        torch_layers = [
            n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        static: dict[str, int] = {}
        storage: dict[str, int] = {}
        for name in torch_layers:
            cfg = layer_config(config, name, factorized)
            if not cfg.quantized:
                continue
            if name not in nodes:
                result.skipped.append(
                    {
                        "layer": name,
                        "reason": "no ONNX node uses its weight "
                        "(folded or renamed by the exporter); left float",
                    }
                )
                continue
            if cfg.act_bits == 8:
                static[name] = cfg.weight_bits
            else:
                storage[name] = cfg.weight_bits
        out = Path(tmpd) / "out.onnx"
        if static:
            if calib is None:
                raise ExportError("int8 activations need calibration images (calib=...)")
            input_name = om.graph.input[0].name
            fixed = om.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0: dynamic
            overrides: dict[str, list[dict]] = {}
            for name, bits in static.items():
                wq = QuantType.QInt4 if bits == 4 else QuantType.QInt8
                overrides[nodes[name].input[1]] = [
                    {
                        "quant_type": wq,
                        "axis": 0,
                        "symmetric": True,
                        "reduce_range": bits == 8,  # QRANGE[8]: 7-bit range, see there
                    }
                ]
            result.tensors = _activation_tensors(om, nodes, act_ranges)
            simulated = {t: act_ranges[k] for k, t in result.tensors.items()}
            for tensor, (lo, hi) in simulated.items():
                scale, zp = act_qparams(lo, hi)  # the very values training rounded with
                overrides[tensor] = [
                    {"scale": np.array(scale, np.float32), "zero_point": np.array(zp, np.uint8)}
                ]
            mine = {nodes[name].name for name in static}
            exclude = [
                n.name
                for n in om.graph.node
                if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in mine
            ]
            keep = _simulated_adds(om, result.tensors)
            exclude += [n.name for n in om.graph.node if n.op_type == "Add" and n.name not in keep]
            try:
                with _quiet_logs():  # ORT logs "consider pre-processing" on the root logger
                    quantize_static(
                        str(fp),
                        str(out),
                        _Reader(input_name, calib.numpy().astype(np.float32), batch=fixed or 64),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        nodes_to_exclude=exclude,
                        # only what training simulates: conv/linear inputs, conv and residual-add
                        # outputs (ReLU, ReLU6 folded in); pools, SE multiplies, other adds: float
                        op_types_to_quantize=list(QUANTIZED_OPS),
                        extra_options={
                            "TensorQuantOverrides": overrides,
                            "WeightSymmetric": True,
                            "ActivationSymmetric": False,
                            # keep the logits float: quantizing them flips near-tied predictions
                            "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                        },
                    )
            except Exception as e:  # noqa: BLE001 - ORT raises AssertionError and others
                raise ExportError(
                    f"ONNX Runtime quantization failed ({type(e).__name__}: {str(e)[:200]}) for "
                    f"{len(static)} int8/int4 layers; try act_bits=32 or weight_bits=8 for them"
                ) from e
            om = onnx.load(str(out))
            _float_outputs(om)
            if strict:
                _check_quantized_tensors(om, set(simulated))
            for name, bits in static.items():
                result.layers[name] = f"int{bits}-weights/uint8-activations QDQ"
        for name, bits in storage.items():
            _store_weight(om, name + ".weight", bits)
            result.layers[name] = "fp16 weights" if bits == 16 else f"int{bits} weight-only DQ"
        _fixed_width(om)
        drop_stack_traces(om)
        onnx.checker.check_model(om)
        final = Path(tmpd) / "final.onnx"
        onnx.save_model(om, str(final), save_as_external_data=False)
        os.replace(final, path)  # atomic: never a half-written artifact
    result.size_bytes = path.stat().st_size
    return result


def onnx_outputs(session, x: torch.Tensor | Split, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The artifact's raw outputs on the images ``x`` or a split's, batch by batch (in the
    file's own batch size if it is fixed)."""
    inp = session.get_inputs()[0]
    if isinstance(inp.shape[0], int) and inp.shape[0] > 0:
        batch_size = inp.shape[0]
    for xb in batched(x, batch_size):
        yield torch.from_numpy(session.run(None, {inp.name: xb.numpy()})[0])


def onnx_predict(session, x: torch.Tensor | Split, batch_size: int = 256) -> torch.Tensor:
    """Logits of the artifact on the images ``x`` or a split's, all at once."""
    return torch.cat(list(onnx_outputs(session, x, batch_size)))


def diagnose_divergence(
    model: nn.Module, path: str | Path, x: torch.Tensor, tensors: dict[str, str]
) -> str:
    """Where the artifact stops computing what ``model`` (fake-quantised) computes, in one line.

    Every quantised activation of the file is compared with the same tensor in PyTorch, in
    graph order (the file run without graph optimizations, so each tensor exists); the first
    whose relative error exceeds 5% is named. If the unoptimized file matches and the optimized
    one does not, the runtime's integer kernels are to blame, not the quantization.
    """
    import onnxruntime as ort

    from .passes.quantize import ActQuant

    feats: dict[str, torch.Tensor] = {}
    order: list[tuple[str, tuple[str, ...]]] = []
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, ActQuant):
            order.append((n, m.keys))
            hooks.append(
                m.register_forward_hook(
                    # cloned: an in-place activation (SiLU, ReLU) overwrites it next
                    lambda _m, _i, o, n=n: feats.__setitem__(n, o.detach().clone())
                )
            )
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    om = onnx.load(str(path))
    dq_of = {n.input[0]: n.output[0] for n in om.graph.node if n.op_type == "DequantizeLinear"}
    q_of = {n.input[0]: n.output[0] for n in om.graph.node if n.op_type == "QuantizeLinear"}
    probes: dict[str, str] = {}
    for n, keys in order:
        t = next((tensors[k] for k in keys if k in tensors), None)
        v = dq_of.get(q_of.get(t, ""), None) if t else None
        if v:
            probes[n] = v
    om.graph.output.extend(
        helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in probes.values()
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(om.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()}), strict=True))

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))

    for n, keys in order:
        if n in probes and rel(got[probes[n]], feats[n].numpy()) > 0.05:
            return (
                f"first diverging tensor: {' = '.join(keys)} (relative error "
                f"{rel(got[probes[n]], feats[n].numpy()):.1%})"
            )
    opt = onnx_predict(ort_session(path), x).numpy()
    plain, fast = rel(got[names[0]], ref), rel(opt, ref)
    if fast > 2 * plain + 0.01:
        return (
            f"the QDQ graph matches (logits {plain:.1%} apart) but ONNX Runtime's optimized "
            f"int8 kernels do not ({fast:.1%}): the runtime computes the file differently"
        )
    return f"no single tensor diverges; logits {plain:.1%} apart (accumulated rounding)"


_NODE_OVERHEAD = 1200  # bytes per conv/linear layer: names, shapes, Q/DQ nodes and scalars
_FILE_OVERHEAD = 16_000  # graph, opset imports, pooling/add nodes, input/output


@dataclass(frozen=True)
class SizeCalibration:
    """The bytes of an architecture's file that are not its conv/linear tensors: node protos,
    names, shapes, activation Q/DQ scalars, pooling and SE nodes. Measured once per study on two
    reference files of the unpruned model (fp32 and int8): pruning changes tensor sizes, not
    the graph, so the estimate of any candidate is exact up to its per-layer tensor bytes.

    ``fp32_graph``, ``int8_graph``: those bytes in each reference; ``layers``: its conv/linear
    count; ``int8_layers``: how many of them the int8 reference quantises; ``layer_node``:
    the mean bytes of one conv/linear node with its output's shape record (what a low-rank
    factorisation adds per split layer, besides the Q/DQ nodes of an int8 layer).
    """

    fp32_graph: int
    int8_graph: int
    layers: int
    int8_layers: int
    layer_node: int

    def graph_bytes(self, layers: int, quantized: int) -> int:
        """Graph bytes of a candidate with ``layers`` conv/linear layers, ``quantized`` int."""
        per_int8 = (self.int8_graph - self.fp32_graph) / max(1, self.int8_layers)
        added = max(0, layers - self.layers)  # each split layer's new node
        return round(self.fp32_graph + per_int8 * quantized + self.layer_node * added)


def _layer_tensor_bytes(m: nn.Module, cfg: LayerConfig) -> int:
    """Bytes of one conv/linear layer's tensors in the file: weight at its width, (folded)
    bias, per-channel weight scales and zero points, int32 bias with its scales."""
    e, o = m.weight.numel(), m.weight.shape[0]
    if cfg.weight_bits == 32:
        return 4 * e + 4 * o
    if cfg.weight_bits == 16:
        return 2 * e + 4 * o
    w = (e * cfg.weight_bits + 7) // 8 + o * (4 + 1)
    return w + (12 * o if cfg.act_bits == 8 else 4 * o)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def estimate_size(
    model: nn.Module,
    config: CompressionConfig,
    *,
    factorized: set[str] | None = None,
    calibration: SizeCalibration | None = None,
) -> int:
    """Analytic size in bytes of the artifact of ``model`` (already pruned and factorised).

    With ``calibration`` (:func:`calibrate_size`, measured on the architecture): its graph
    bytes plus each conv/linear layer's tensor bytes at its stored width: exact on the
    reference files, within 0.5% on pruned candidates, within 3% with low-rank layers (tests).
    Without: fixed per-layer and
    per-file overheads measured on ResNets, which undercount architectures with many non-conv
    nodes (MobileNetV3 at 80% pruning: 18% under).
    """
    factorized = factorized or set()
    layers = _layers(model)
    cfgs = [layer_config(config, n, factorized) for n, _ in layers]
    tensors = sum(_layer_tensor_bytes(m, c) for (_, m), c in zip(layers, cfgs, strict=True))
    if calibration is not None:
        quantized = sum(1 for c in cfgs if c.weight_bits < 16)
        return tensors + calibration.graph_bytes(len(layers), quantized)
    total = _FILE_OVERHEAD + tensors
    for c in cfgs:
        if c.weight_bits == 16:
            total += 600  # Cast node
        elif c.weight_bits < 16:
            # activation Q/DQ pairs with their scales (~1.4 kB per layer on trained ResNets),
            # or the DequantizeLinear node of a weight-only layer
            total += 1400 if c.act_bits == 8 else 2400
        total += _NODE_OVERHEAD
    return total


@torch.no_grad()
def latency_features(
    model: nn.Module,
    config: CompressionConfig,
    *,
    example: torch.Tensor,
    factorized: set[str] | None = None,
) -> dict[str, float]:
    """What the artifact of ``model`` (already pruned and factorised; untrained is fine) costs
    to run, as a fixed set of numbers for a latency predictor: per-layer MACs, weight bytes,
    output elements, bit widths, channel widths and op kinds, summed by kind.

    Kinds: ``dense``/``dw`` (grouped) convolutions and ``fc`` layers, each ``int8`` (int8
    activations, ORT's QLinear kernels), ``wq`` (weight-only integer: dequantised, fp compute)
    or ``fp``. ``boundaries`` counts neighbouring layers (in execution order) of different
    kinds of compute: each is a Quantize/Dequantize pair in the file. Channel widths that are
    small or not multiples of 8 leave vector lanes idle, hence their own counts. One forward
    at batch 1: milliseconds.
    """
    factorized = factorized or set()
    rows: list[tuple[str, nn.Module, torch.Tensor]] = []

    def hook(name: str):
        def fn(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            rows.append((name, m, out))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _layers(model)]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    f: dict[str, float] = {"layers": float(len(rows)), "factorized": float(len(factorized))}
    for op in ("dense", "dw", "fc"):
        for q in ("int8", "wq", "fp"):
            f[f"mmacs_{op}_{q}"] = 0.0
    for k in ("mparams_int", "mparams_fp", "kact_int8", "kact_fp", "boundaries"):
        f[k] = 0.0
    widths, prev = [], None
    for name, m, out in rows:
        cfg = layer_config(config, name, factorized)
        q = "fp" if cfg.weight_bits >= 16 else ("int8" if cfg.act_bits == 8 else "wq")
        if isinstance(m, nn.Conv2d):
            op = "dw" if m.groups > 1 else "dense"
            macs = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            widths.append(m.out_channels)
        else:
            op, macs = "fc", m.in_features * m.out_features
        f[f"mmacs_{op}_{q}"] += macs / 1e6
        f["mparams_int" if q != "fp" else "mparams_fp"] += m.weight.numel() / 1e6
        f["kact_int8" if q == "int8" else "kact_fp"] += out.numel() / 1e3
        f["boundaries"] += float(prev is not None and (q == "int8") != (prev == "int8"))
        prev = q
    w = np.array(widths or [0], dtype=float)
    f["mmacs"] = sum(v for k, v in f.items() if k.startswith("mmacs_"))
    f["width_min"], f["width_mean"] = float(w.min()), float(w.mean())
    f["narrow"] = float((w < 16).sum())
    f["unaligned"] = float((w % 8 != 0).sum())
    return f


def calibrate_size(
    model: nn.Module,
    *,
    fp32_file: Path,
    int8_file: Path,
    int8_config: CompressionConfig,
) -> SizeCalibration:
    """Measure ``model``'s graph bytes from its fp32 and uniform-int8 files (unpruned)."""
    layers = _layers(model)
    fp32 = CompressionConfig()
    t32 = sum(_layer_tensor_bytes(m, fp32.layer(n)) for n, m in layers)
    t8 = sum(_layer_tensor_bytes(m, int8_config.layer(n)) for n, m in layers)
    n8 = sum(1 for n, _ in layers if int8_config.layer(n).weight_bits < 16)
    fp32_graph = fp32_file.stat().st_size - t32
    if artifact_kind(fp32_file) == "pte":  # a program's per-layer bytes: its mean share
        node, nodes = max(0, fp32_graph), layers
    else:
        g = onnx.load(str(fp32_file), load_external_data=False).graph
        shapes = {v.name: v.ByteSize() for v in g.value_info}
        nodes = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        node = sum(n.ByteSize() + sum(shapes.get(o, 0) for o in n.output) for n in nodes)
    return SizeCalibration(
        fp32_graph=fp32_graph,
        int8_graph=int8_file.stat().st_size - t8,
        layers=len(layers),
        int8_layers=n8,
        layer_node=round(node / max(1, len(nodes))),
    )


def artifact_predictions(
    artifact: str | Path, split: Split, *, threads: int = 2, batch_size: int = 256
) -> torch.Tensor:
    """The split task's compact predictions of the artifact on ``split``, batch by batch: an
    ONNX file run by ONNX Runtime (in the file's own batch size if it is fixed), or an
    ExecuTorch ``.pte`` program run by ExecuTorch (one image per execution, its shape)."""
    if artifact_kind(artifact) == "pte":
        batches = (xb.numpy() for xb in split.batches(batch_size))
        raw: Iterator[torch.Tensor] = (torch.from_numpy(o) for o in pte_outputs(artifact, batches))
    else:
        raw = onnx_outputs(ort_session(artifact, threads=threads), split, batch_size)
    outs = [split.task.predictions(o) for o in raw]
    return torch.cat(outs) if outs else torch.empty(0)


def runtime_agreement(artifact: str | Path, split: Split, *, runtime: str) -> float:
    """How far ``runtime``'s outputs of the ONNX file agree with ONNX Runtime's on ``split``, by
    the split's task (1.0 for ONNX Runtime itself). OpenVINO reads the same file but fuses and
    rounds on its own: a candidate it runs differently is refused by the search."""
    if not runtime.startswith("openvino"):
        return 1.0
    from .measure.openvino import openvino_outputs

    batches = (xb.numpy() for xb in split.batches(64))
    ov = torch.cat(
        [split.task.predictions(torch.from_numpy(o)) for o in openvino_outputs(artifact, batches)]
    )
    return split.task.agreement(ov, artifact_predictions(artifact, split))


def artifact_scores(
    artifact: str | Path, split: Split, *, threads: int = 2
) -> tuple[dict[str, float], torch.Tensor]:
    """Every metric of the split's task for the ONNX file on ``split``, and its predictions."""
    pred = artifact_predictions(artifact, split, threads=threads)
    return split.task.score(pred, split.y), pred


def artifact_accuracy(
    artifact: str | Path, split: Split, *, threads: int = 2
) -> tuple[float, torch.Tensor]:
    """The split task's metric of the ONNX file on ``split`` (top-1 accuracy for a classifier,
    mIoU for segmentation), and its predictions."""
    scores, pred = artifact_scores(artifact, split, threads=threads)
    return scores[split.task.metric], pred


def agreement(a: torch.Tensor, b: torch.Tensor, task: Task | None = None) -> float:
    """How far two prediction sets agree, by ``task`` (default: share of equal top-1)."""
    return (task or Classification()).agreement(a, b)
