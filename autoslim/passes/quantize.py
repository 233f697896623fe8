"""Mixed-precision quantization for training, matching the exported ONNX QDQ scheme exactly.

The scheme (the same as ``onnxruntime.quantization`` writes into the artifact):
- weights: per-output-channel symmetric, ``scale = 2 * absmax / (qmax - qmin)``, zero point 0;
  int8 uses [-64, 64] (7 bits of range, see ``QRANGE``), int4 [-8, 7]; fp16 is a round trip
  through half precision;
- activations: per-tensor asymmetric uint8 with a range calibrated on a fixed calibration batch
  (min/max, 0 included), on exactly the tensors the exported file quantises: the input and the
  output of every ``act_bits=8`` conv (the output of its ReLU/ReLU6 when one alone follows it:
  ONNX Runtime folds it into the conv), the input of every ``act_bits=8`` linear and the output
  of every residual add of two such tensors. Each range
  is handed to the exporter as an override for that tensor, and the exporter quantises no other
  tensor, so the artifact computes what was trained, with the scales that were trained.
Batch norm is folded into the preceding conv first (as the ONNX export does), so the weights
that are fake-quantised are the weights that ship. Straight-through estimator for gradients.
PyTorch's own (deprecated, being removed) quantization package is not used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import CompressionConfig, LayerConfig
from . import PassReport

__all__ = [
    "QRANGE",
    "FakeQuantLayer",
    "ActQuant",
    "act_ranges_of",
    "fold_batchnorm",
    "quantize_model",
    "calibrate",
    "strip_fake_quant",
    "snap_biases",
    "fake_quant_weight",
    "fake_quant_act",
    "layer_config",
]

# int8 weights use 7 bits of range ([-64, 64], ONNX Runtime's reduce_range): x86 CPUs without VNNI
# (AVX2, AVX-512F) multiply uint8 x int8 pairs into int16 with saturation (vpmaddubsw), so full-range
# int8 weights make the CPU kernel compute something else than the QDQ graph (measured on RegNetX:
# logits 276 apart instead of 33); 255 * 64 * 2 fits in int16 on every x86 CPU.
QRANGE = {8: (-64, 64), 4: (-8, 7)}


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise-dequantise ``w`` per output channel as the exporter will; STE gradient."""
    if bits >= 32:
        return w
    if bits == 16:
        wq = w.detach().half().float()
    else:
        qmin, qmax = QRANGE[bits]
        scale = _weight_scale(w, bits).reshape(-1, *([1] * (w.dim() - 1)))
        wq = torch.clamp(torch.round(w.detach() / scale), qmin, qmax) * scale
    return w + (wq - w).detach()


def _weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale; 1.0 for an all-zero channel (as ONNX Runtime does,
    so the int32 bias grid ``input scale x weight scale`` is the same on both sides)."""
    qmin, qmax = QRANGE[bits]
    absmax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    scale = 2 * absmax / (qmax - qmin)
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def act_qparams(rmin: float, rmax: float) -> tuple[float, int]:
    """uint8 scale and zero point for a calibrated range (0 always representable).

    The scale is a float32 value (what the file stores), and these exact values are written
    into the artifact, so training and ONNX Runtime round at the same points.
    """
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    scale = float(np.float32((rmax - rmin) / 255.0))
    if scale <= 0:
        return 1.0, 0
    return scale, int(min(255, max(0, round(-rmin / scale))))


def fake_quant_act(x: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    scale, zp = act_qparams(rmin, rmax)
    q = torch.clamp(torch.round(x.detach() / scale) + zp, 0, 255)
    return x + ((q - zp) * scale - x).detach()


class FakeQuantLayer(nn.Module):
    """Wraps a Conv2d/Linear: fake-quantised weights and, when ``quantize_input``, its input.

    On a traced model (:func:`fold_batchnorm` returns one) the activations are quantised per
    tensor by :class:`ActQuant` nodes instead, and ``quantize_input`` is False.
    """

    def __init__(self, layer: nn.Module, cfg: LayerConfig, *, quantize_input: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.weight_bits = cfg.weight_bits
        self.act_bits = cfg.act_bits
        self.quantize_input = quantize_input and cfg.act_bits == 8
        self.register_buffer("act_range", torch.tensor([0.0, 0.0]))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            if self.calibrating:
                self.act_range = _widen(self.act_range, x)
            else:
                x = fake_quant_act(x, float(self.act_range[0]), float(self.act_range[1]))
        w = fake_quant_weight(self.layer.weight, self.weight_bits)
        if isinstance(self.layer, nn.Conv2d):
            m = self.layer
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, self.layer.bias)


def _widen(cur: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lo, hi = float(x.detach().min()), float(x.detach().max())
    return torch.tensor([min(lo, float(cur[0])), max(hi, float(cur[1]))])


class ActQuant(nn.Module):
    """uint8 fake quantization of one activation tensor, for every op that reads it.

    ``keys`` name the tensor the way the exporter finds it in the ONNX graph: ``LAYER:in`` (the
    input of LAYER's Conv/Gemm), ``LAYER:out`` (its output) or ``LAYER:act`` (the output of the
    ReLU/ReLU6 that alone follows LAYER, which ONNX Runtime folds into the conv); for a residual
    add of two quantised tensors ``add(KEY_A|KEY_B):out`` / ``:act``. The calibrated
    range is handed to the exporter for exactly that tensor, so the file quantises what was
    trained, with the ranges that were trained.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = tuple(keys)
        self.register_buffer("act_range", torch.tensor([0.0, 0.0]))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.act_range = _widen(self.act_range, x)
            return x
        return fake_quant_act(x, float(self.act_range[0]), float(self.act_range[1]))

    def extra_repr(self) -> str:
        return ", ".join(self.keys)


def layer_config(config: CompressionConfig, name: str, factorized: set[str]) -> LayerConfig:
    """Config of module ``name``; parts ``NAME.0``/``NAME.1`` of a factorised layer use NAME's."""
    parent = name.rpartition(".")[0]
    if name not in config.layers and parent in factorized:
        return config.layer(parent)
    return config.layer(name)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into it (eval mode, torch.fx).

    Returns a module with the same submodule names; BN folded away, as the ONNX export does.
    """
    from torch.fx.experimental.optimization import fuse

    model.eval()
    return fuse(model, inplace=False)


def quantize_model(
    model: nn.Module,
    config: CompressionConfig,
    *,
    factorized: set[str] | None = None,
    skip: tuple[str, ...] = (),
) -> PassReport:
    """Fake-quantise, in place, each Conv2d/Linear whose config stores weights below fp32.

    On a traced model (``torch.fx.GraphModule``, what :func:`fold_batchnorm` returns) every
    activation tensor the exported file quantises gets one :class:`ActQuant` node, seen by every
    op that reads the tensor (as in the ONNX QDQ graph): the input of each ``act_bits=8`` layer,
    the output of each such conv (or of the ReLU/ReLU6 that alone follows it). On a plain module
    only the layer inputs are simulated.
    """
    report = PassReport("quantize")
    factorized = factorized or set()
    traced = isinstance(model, fx.GraphModule)
    static: dict[str, nn.Module] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        cfg = layer_config(config, name, factorized)
        if not cfg.quantized:
            continue
        if name in skip:
            report.skip(name, "layer kept in float (listed as skipped)")
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FakeQuantLayer(m, cfg, quantize_input=not traced))
        report.touch(name, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits)
        if cfg.act_bits == 8:
            static[name] = m
    if traced and static:
        _insert_act_quant(model, static)
    return report


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU or ReLU6 (what the ONNX graph shows as Relu / Clip(0, 6))."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.ReLU):
            return True
        return isinstance(m, nn.Hardtanh) and m.min_val == 0.0
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu6)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _ref(keys: list[str]) -> str:
    """The shortest key naming a tensor (a layer key rather than a nested add's)."""
    return min(keys, key=lambda k: (k.startswith("add("), len(k)))


def split_add_key(layer: str) -> tuple[str, str]:
    """``add(A|B)`` -> (A, B), where A and B may themselves be ``add(...)`` keys."""
    depth = 0
    inner = layer[4:-1]
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            return inner[:i], inner[i + 1 :]
    raise ValueError(f"not an add key: {layer!r}")


def _is_add(node: fx.Node) -> bool:
    import operator

    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def _insert_act_quant(gm: fx.GraphModule, static: dict[str, nn.Module]) -> None:
    """Insert one ActQuant after every tensor that ONNX Runtime will quantise."""
    keys: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in static or not node.args:
            continue
        src = node.args[0]
        if isinstance(src, fx.Node):
            keys.setdefault(src, []).append(f"{node.target}:in")
        if isinstance(static[node.target], nn.Conv2d):  # Gemm outputs (logits) stay float
            users = list(node.users)
            if len(users) == 1 and _is_relu(gm, users[0]):
                keys.setdefault(users[0], []).append(f"{node.target}:act")
            elif not any(u.op == "output" for u in users):  # a model's output stays float
                keys.setdefault(node, []).append(f"{node.target}:out")
    # residual adds whose inputs are both quantised: ONNX Runtime runs them as int8 adds (a
    # float add between dequantize/quantize pairs measured 1.4x slower on ResNet-18), so their
    # output is quantised too, once (after the ReLU that alone follows, which it folds in)
    for node in gm.graph.nodes:
        if not _is_add(node) or len(node.args) != 2:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in keys and b in keys):
            continue
        name = f"add({_ref(keys[a])}|{_ref(keys[b])})"
        users = list(node.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            keys.setdefault(users[0], []).insert(0, f"{name}:act")
        else:
            keys.setdefault(node, []).insert(0, f"{name}:out")
    count = 0
    for node in list(gm.graph.nodes):
        if node not in keys:
            continue
        qname = f"act_quant_{count}"
        gm.add_submodule(qname, ActQuant(tuple(keys[node])))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(qname, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
        count += 1
    gm.graph.lint()
    gm.recompile()


def _act_quantizers(model: nn.Module) -> list[tuple[tuple[str, ...], nn.Module]]:
    """Every module that fake-quantises an activation, with the keys naming its tensor."""
    out: list[tuple[tuple[str, ...], nn.Module]] = []
    for n, m in model.named_modules():
        if isinstance(m, ActQuant):
            out.append((m.keys, m))
        elif isinstance(m, FakeQuantLayer) and m.quantize_input:
            out.append(((f"{n}:in",), m))
    return out


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, list[float]]:
    """Record the range of every fake-quantised activation on ``x``; return :func:`act_ranges_of`."""
    mods = [m for _, m in _act_quantizers(model)]
    for m in mods:
        m.act_range = torch.tensor([float("inf"), float("-inf")])
        m.calibrating = True
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m in mods:
            m.calibrating = False
        model.train(was_training)
    return act_ranges_of(model)


def act_ranges_of(model: nn.Module) -> dict[str, list[float]]:
    """The calibrated range of every fake-quantised activation tensor: {key: [min, max]}.

    Keys are ``LAYER:in`` / ``LAYER:out`` / ``LAYER:act`` (see :class:`ActQuant`); one tensor
    may carry several keys (the output of one conv is the input of the next).
    """
    return {
        k: [float(m.act_range[0]), float(m.act_range[1])]
        for keys, m in _act_quantizers(model)
        for k in keys
    }


@torch.no_grad()
def snap_biases(model: nn.Module) -> int:
    """Round, in place, the bias of every int8-activation layer to its int32 grid.

    The file stores such a bias as int32 with scale ``input scale x weight scale`` (per output
    channel); rounded here, the model the gate compares with is the model the file holds.
    Call after the last training step. Returns the number of layers snapped.
    """
    in_scale = {
        k[: -len(":in")]: act_qparams(*m.act_range.tolist())[0]
        for keys, m in _act_quantizers(model)
        for k in keys
        if k.endswith(":in")
    }
    count = 0
    for n, m in model.named_modules():
        if not (isinstance(m, FakeQuantLayer) and m.act_bits == 8 and n in in_scale):
            continue
        b = m.layer.bias
        if b is None or m.weight_bits not in QRANGE:
            continue
        s_w = _weight_scale(m.layer.weight, m.weight_bits).numpy().astype(np.float32)
        s_b = (np.float32(in_scale[n]) * s_w).astype(np.float32)
        bias = b.numpy().astype(np.float32)
        with np.errstate(all="ignore"):
            snapped = (np.round(bias / s_b) * s_b).astype(np.float32)
        # a vanishing grid (denormal scale) or an int32 overflow: ORT keeps such a bias as is
        usable = (
            (s_b > 1e-30) & np.isfinite(snapped) & (np.abs(bias / np.maximum(s_b, 1e-30)) < 2**31)
        )
        b.copy_(torch.from_numpy(np.where(usable, snapped, bias)))
        count += 1
    return count


def strip_fake_quant(model: nn.Module, *, snap: bool = False) -> nn.Module:
    """Replace, in place, every FakeQuantLayer by the float layer it wraps (names restored)
    and remove the ActQuant nodes: the float model the exporter quantises.

    ``snap`` replaces int8 weights by their fake-quantised values (on the int8 grid): ONNX
    Runtime's quantizer then recomputes the very same scales and integers, bit for bit.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if snap and m.weight_bits == 8:
                with torch.no_grad():
                    m.layer.weight.copy_(fake_quant_weight(m.layer.weight, 8))
            setattr(parent, attr, m.layer)
    if isinstance(model, fx.GraphModule):
        for node in list(model.graph.nodes):
            if node.op == "call_module" and isinstance(
                model.get_submodule(str(node.target)), ActQuant
            ):
                node.replace_all_uses_with(node.args[0])
                model.graph.erase_node(node)
                model.delete_submodule(str(node.target))
        model.graph.lint()
        model.recompile()
    return model
