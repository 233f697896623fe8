"""One contract for every compression pass (prune, low-rank, quantize):

- identity settings change nothing (same outputs, nothing touched);
- a real setting does what the report claims, and the model shows it;
- layers a pass cannot or must not change are reported as skipped, with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLE_28, TINY
from torch import nn

from autoslim import CompressionConfig, LayerConfig, build_model
from autoslim.passes import PassReport
from autoslim.passes.lowrank import factorize_model
from autoslim.passes.prune import kept_channels, prune_model
from autoslim.passes.quantize import QRANGE, FakeQuantLayer, fake_quant_weight, quantize_model

Model = nn.Module


def _prune(model: Model, cfg: CompressionConfig) -> PassReport:
    return prune_model(model, cfg, example=torch.zeros(EXAMPLE_28), classifier="fc")


def _lowrank(model: Model, cfg: CompressionConfig) -> PassReport:
    return factorize_model(model, cfg, skip=("conv1",))


def _quantize(model: Model, cfg: CompressionConfig) -> PassReport:
    return quantize_model(model, cfg)


def _num_params(model: Model) -> int:
    return sum(p.numel() for p in model.parameters())


def _weight_layers(model: Model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _width(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.num_features  # batch norm


def _check_prune(before: Model, after: Model, report: PassReport, groups: list[str]) -> None:
    assert {t["layer"] for t in report.touched} == set(groups)
    mods = dict(after.named_modules())
    for t in report.touched:
        assert t["kept"] < t["channels"]
        assert t["kept"] == kept_channels(t["channels"], t["ratio"], 8)
        assert t["kept"] % 8 == 0
        for name in t["modules"]:  # every module of the coupled group really lost the channels
            assert _width(mods[name]) == t["kept"], name
    assert mods["conv1"].out_channels == 40  # 64 * 0.7 = 44.8 -> 44 -> multiple of 8
    assert mods["fc"].out_features == 10  # the classifier's outputs are never pruned
    assert _num_params(after) < 0.6 * _num_params(before)
    assert after(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _check_lowrank(before: Model, after: Model, report: PassReport, groups: list[str]) -> None:
    assert _num_params(after) < _num_params(before)
    touched = {t["layer"]: t for t in report.touched}
    assert "layer1.0.conv1" in touched and "fc" in touched
    assert "conv1" not in touched
    old = dict(before.named_modules())
    for name, t in touched.items():
        seq = after.get_submodule(name)
        assert isinstance(seq, nn.Sequential) and len(seq) == 2
        first, second = seq
        assert t["rank"] < t["full_rank"]
        assert _width(first) == t["rank"]
        assert first.weight.numel() + second.weight.numel() == t["params_after"]
        assert t["params_after"] < t["params_before"] == old[name].weight.numel()
        assert _width(second) == _width(old[name])
    # The split is the best rank-r approximation: its error is the discarded singular values.
    name = "layer2.0.conv2"
    w = old[name].weight.detach().reshape(old[name].out_channels, -1).double()
    first, second = after.get_submodule(name)
    r = touched[name]["rank"]
    a, b = second.weight.detach().reshape(-1, r), first.weight.detach().reshape(r, -1)
    approx = a.double() @ b.double()
    s = torch.linalg.svdvals(w)
    assert float(torch.linalg.norm(w - approx)) == pytest.approx(
        float(s[r:].pow(2).sum().sqrt()), rel=1e-4
    )


def _check_quantize(bits: int):
    def check(before: Model, after: Model, report: PassReport, groups: list[str]) -> None:
        assert [t["layer"] for t in report.touched] == _weight_layers(before)
        assert all(t["weight_bits"] == bits for t in report.touched)
        wrappers = {n: m for n, m in after.named_modules() if isinstance(m, FakeQuantLayer)}
        assert set(wrappers) == set(_weight_layers(before))
        torch.manual_seed(0)
        for name, m in wrappers.items():
            layer = m.layer
            w = layer.weight.detach()
            wq = fake_quant_weight(layer.weight, bits).detach()
            if isinstance(layer, nn.Conv2d):
                x = torch.randn(1, layer.in_channels, 6, 6)
                ref = F.conv2d(x, wq, layer.bias, layer.stride, layer.padding, 1, layer.groups)
            else:
                x = torch.randn(2, layer.in_features)
                ref = F.linear(x, wq, layer.bias)
            with torch.no_grad():
                out = m(x)
            assert torch.allclose(out, ref, atol=1e-5), name  # forward uses these weights
            if bits == 16:
                assert torch.equal(wq, w.half().float())
                continue
            rows = wq.reshape(wq.shape[0], -1)
            distinct = max(len(torch.unique(row)) for row in rows)
            assert 2 < distinct <= 2**bits, name
            qmin, qmax = QRANGE[bits]  # int8: 7 bits of range (see QRANGE)
            step = w.abs().reshape(w.shape[0], -1).amax(1) * 2 / (qmax - qmin)
            err = (wq - w).abs().reshape(w.shape[0], -1).amax(1)
            assert torch.all(err <= step / 2 + 1e-6), name  # round to nearest level
            assert not torch.equal(wq, w)

    return check


@dataclass(frozen=True)
class PassCase:
    id: str
    apply: Callable[[Model, CompressionConfig], PassReport]
    identity: Callable[[list[str]], CompressionConfig]
    change: Callable[[list[str]], CompressionConfig]
    check: Callable[[Model, Model, PassReport, list[str]], None]


CASES = [
    PassCase(
        "prune",
        _prune,
        lambda g: CompressionConfig.uniform(prune=0.0, groups=g),
        lambda g: CompressionConfig.uniform(prune=0.3, groups=g),
        _check_prune,
    ),
    PassCase(
        "lowrank",
        _lowrank,
        lambda g: CompressionConfig(),
        lambda g: CompressionConfig.uniform(rank_ratio=0.25),
        _check_lowrank,
    ),
    *[
        PassCase(
            f"quantize-{label}",
            _quantize,
            lambda g: CompressionConfig.uniform(weight_bits=32),
            lambda g, bits=bits: CompressionConfig.uniform(weight_bits=bits, act_bits=32),
            _check_quantize(bits),
        )
        for label, bits in (("int8", 8), ("int4", 4), ("fp16", 16))
    ],
]


@pytest.fixture(scope="module")
def batch(fmnist) -> torch.Tensor:
    return fmnist.val.x[:8]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_identity_settings_change_nothing(case, resnet18, resnet_groups, batch) -> None:
    model = copy.deepcopy(resnet18)
    cfg = case.identity(resnet_groups)
    assert cfg.is_identity
    report = case.apply(model, cfg)
    assert report.touched == []
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch), resnet18(batch), atol=1e-5)
    assert _num_params(model) == _num_params(resnet18)
    assert [type(m) for m in model.modules()] == [type(m) for m in resnet18.modules()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_setting_does_what_the_report_says(case, resnet18, resnet_groups, batch) -> None:
    model = copy.deepcopy(resnet18)
    cfg = case.change(resnet_groups)
    assert not cfg.is_identity
    report = case.apply(model, cfg)
    assert report.touched, str(report)
    assert report.to_dict()["touched"] == report.touched
    case.check(resnet18, model, report, resnet_groups)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (len(batch), 10) and torch.isfinite(out).all()


def _tiny_prune_8_channels() -> tuple[Model, PassReport, str, str]:
    model = build_model(TINY).eval()
    report = prune_model(
        model,
        CompressionConfig(prune={"conv1": 0.5}, round_to=8),
        example=torch.zeros(EXAMPLE_28),
        classifier="fc",
    )
    assert model.conv1.out_channels == 8
    return model, report, "conv1", "rounds to 0 removed (multiple of 8)"


def _prune_unknown_group() -> tuple[Model, PassReport, str, str]:
    model = build_model(TINY).eval()
    report = _prune(model, CompressionConfig(prune={"no.such.group": 0.5}))
    return model, report, "no.such.group", "no prunable channel group has this name"


def _lowrank_depthwise() -> tuple[Model, PassReport, str, str]:
    model = build_model("mobilenet_v2").eval()
    report = factorize_model(model, CompressionConfig.uniform(rank_ratio=0.5))
    dw = model.get_submodule("features.1.conv.0.0")
    assert isinstance(dw, nn.Conv2d) and dw.groups == 32  # left as it was
    assert any(t["layer"] == "features.1.conv.1" for t in report.touched)  # its 1x1 neighbour
    return model, report, "features.1.conv.0.0", "grouped/depthwise conv (groups=32)"


def _lowrank_full_rank(resnet18: Model) -> tuple[Model, PassReport, str, str]:
    model = copy.deepcopy(resnet18)
    cfg = CompressionConfig(layers={"layer1.0.conv1": LayerConfig(rank_ratio=1.0)})
    report = factorize_model(model, cfg)
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)
    return model, report, "layer1.0.conv1", "would not reduce parameters"


def _lowrank_stem(resnet18: Model) -> tuple[Model, PassReport, str, str]:
    model = copy.deepcopy(resnet18)
    ranks = {n: LayerConfig(rank_ratio=0.25) for n in ("conv1", "layer1.0.conv1")}
    report = _lowrank(model, CompressionConfig(layers=ranks))
    assert isinstance(model.conv1, nn.Conv2d)
    assert isinstance(model.layer1[0].conv1, nn.Sequential)  # the other listed layer is split
    return model, report, "conv1", "excluded from factorisation"


def _quantize_listed_skip(resnet18: Model) -> tuple[Model, PassReport, str, str]:
    model = copy.deepcopy(resnet18)
    report = quantize_model(model, CompressionConfig.uniform(weight_bits=8), skip=("fc",))
    assert isinstance(model.fc, nn.Linear) and isinstance(model.conv1, FakeQuantLayer)
    return model, report, "fc", "kept in float"


SKIPS = {
    "prune-8-channel-group-round-to-8": lambda r: _tiny_prune_8_channels(),
    "prune-unknown-group": lambda r: _prune_unknown_group(),
    "lowrank-depthwise-conv": lambda r: _lowrank_depthwise(),
    "lowrank-rank-ratio-1": _lowrank_full_rank,
    "lowrank-stem": _lowrank_stem,
    "quantize-listed-layer": _quantize_listed_skip,
}


@pytest.mark.parametrize("make", list(SKIPS.values()), ids=list(SKIPS))
def test_report_names_skipped_layers_with_reasons(make, resnet18) -> None:
    _, report, layer, reason = make(resnet18)
    skipped = [s for s in report.skipped if s["layer"] == layer]
    assert len(skipped) == 1, report.skipped
    assert reason in skipped[0]["reason"]
    assert layer not in {t["layer"] for t in report.touched}
    assert f"{len(report.skipped)} skipped" in str(report)
