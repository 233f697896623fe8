"""Mixed-precision quantization for training, matching the exported ONNX QDQ scheme exactly.

The scheme (the same as ``onnxruntime.quantization`` writes into the artifact):
- weights: per-output-channel symmetric, ``scale = 2 * absmax / (qmax - qmin)``, zero point 0;
  int8 uses [-127, 127], int4 [-8, 7]; fp16 is a round trip through half precision;
- activations (input of a layer with ``act_bits=8``): per-tensor asymmetric uint8 with a range
  calibrated on a fixed calibration batch (min/max, 0 included); the same range is handed to the
  exporter as an override, so the artifact uses the scales that were trained.
Batch norm is folded into the preceding conv first (as the ONNX export does), so the weights
that are fake-quantised are the weights that ship. Straight-through estimator for gradients.
PyTorch's own (deprecated, being removed) quantization package is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CompressionConfig, LayerConfig
from . import PassReport

__all__ = [
    "QRANGE",
    "FakeQuantLayer",
    "act_ranges_of",
    "fold_batchnorm",
    "quantize_model",
    "calibrate",
    "strip_fake_quant",
    "fake_quant_weight",
    "fake_quant_act",
    "layer_config",
]

QRANGE = {8: (-127, 127), 4: (-8, 7)}


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise-dequantise ``w`` per output channel as the exporter will; STE gradient."""
    if bits >= 32:
        return w
    if bits == 16:
        wq = w.detach().half().float()
    else:
        qmin, qmax = QRANGE[bits]
        absmax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
        scale = (2 * absmax / (qmax - qmin)).clamp_min(torch.finfo(torch.float32).tiny)
        scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
        wq = torch.clamp(torch.round(w.detach() / scale), qmin, qmax) * scale
    return w + (wq - w).detach()


def act_qparams(rmin: float, rmax: float) -> tuple[float, int]:
    """uint8 scale and zero point for a calibrated range (0 always representable)."""
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    scale = (rmax - rmin) / 255.0
    if scale <= 0:
        return 1.0, 0
    return scale, int(min(255, max(0, round(-rmin / scale))))


def fake_quant_act(x: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    scale, zp = act_qparams(rmin, rmax)
    q = torch.clamp(torch.round(x.detach() / scale) + zp, 0, 255)
    return x + ((q - zp) * scale - x).detach()


class FakeQuantLayer(nn.Module):
    """Wraps a Conv2d/Linear: fake-quantised input (if ``act_bits=8``) and weights."""

    def __init__(self, layer: nn.Module, cfg: LayerConfig) -> None:
        super().__init__()
        self.layer = layer
        self.weight_bits = cfg.weight_bits
        self.act_bits = cfg.act_bits
        self.register_buffer("act_range", torch.tensor([0.0, 0.0]))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 8:
            if self.calibrating:
                lo, hi = float(x.detach().min()), float(x.detach().max())
                cur = self.act_range
                self.act_range = torch.tensor([min(lo, float(cur[0])), max(hi, float(cur[1]))])
            else:
                x = fake_quant_act(x, float(self.act_range[0]), float(self.act_range[1]))
        w = fake_quant_weight(self.layer.weight, self.weight_bits)
        if isinstance(self.layer, nn.Conv2d):
            m = self.layer
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, self.layer.bias)


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
    """Wrap, in place, each Conv2d/Linear whose config stores weights below fp32."""
    report = PassReport("quantize")
    factorized = factorized or set()
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
        setattr(parent, attr, FakeQuantLayer(m, cfg))
        report.touch(name, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits)
    return report


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, list[float]]:
    """Record the input range of every ``act_bits=8`` layer on ``x``; return {layer: [min, max]}."""
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
    for m in wrappers.values():
        m.act_range = torch.tensor([float("inf"), float("-inf")])
        m.calibrating = True
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m in wrappers.values():
            m.calibrating = False
        model.train(was_training)
    return act_ranges_of(model)


def act_ranges_of(model: nn.Module) -> dict[str, list[float]]:
    """The calibrated input range of every ``act_bits=8`` layer: {layer: [min, max]}."""
    return {
        n: [float(m.act_range[0]), float(m.act_range[1])]
        for n, m in model.named_modules()
        if isinstance(m, FakeQuantLayer) and m.act_bits == 8
    }


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Replace, in place, every FakeQuantLayer by the float layer it wraps (names restored)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, m.layer)
    return model
