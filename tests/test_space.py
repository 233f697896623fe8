"""Search-space files: shipped spaces bind, rules match first-wins, bad files explain themselves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import SHUFFLENET

from autoslim.artifact import estimate_size, export_onnx
from autoslim.cli import main
from autoslim.config import CompressionConfig
from autoslim.errors import ConfigError
from autoslim.models import build_model, list_models, stem_and_classifier
from autoslim.passes.lowrank import factorize_model
from autoslim.passes.prune import list_groups, prune_model
from autoslim.passes.quantize import fold_batchnorm
from autoslim.space import SPACES_DIR, load_space

X = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18").eval()


@pytest.mark.parametrize("name", ["default", "mixed-precision", "prune-only", "quantize-only"])
def test_shipped_spaces_bind_and_give_valid_configs(name, resnet):
    space = load_space(name)
    bound = space.bind(resnet, X, classifier="fc", stem="conv1")
    assert bound.dims, "a shipped space must search something"
    params = bound.uniform_params(prune=0.5, weight_bits=8, act_bits=8)
    cfg = bound.to_config(params)
    assert CompressionConfig.from_json(cfg.to_json()) == cfg
    if name == "quantize-only":
        assert not cfg.prune
    if name == "prune-only":
        assert set(cfg.prune) == {g.name for g in list_groups(resnet, X, classifier="fc")}


def test_default_space_is_per_stage_int8_for_resnets(resnet):
    bound = load_space("default").bind(resnet, X, classifier="fc", stem="conv1")
    prune = [d for d in bound.dims if d.kind == "prune"]
    # one ratio per ResNet stage (the stem shares layer1's residual channels), 12 groups covered
    assert len(prune) == 4
    assert sorted(t for d in prune for t in d.targets) == sorted(bound.groups)
    assert not bound.int4_layers()  # no int4: ORT CPU has no int4 conv kernels
    # the stages found from the graph are ResNet's layer1..layer4 (the stem with layer1)
    for layer, stage in bound.stages.items():
        want = "stage0" if layer == "conv1" else f"stage{int(layer[5]) - 1}"
        assert stage == want, (layer, stage)
    assert bound.stage_sizes == {
        "stage0": "14x14",
        "stage1": "7x7",
        "stage2": "4x4",
        "stage3": "2x2",
    }


@pytest.mark.parametrize(
    "name",
    [*list_models("classification"), SHUFFLENET],
    ids=[*list_models("classification"), "shufflenet"],
)
def test_default_space_is_small_and_per_stage_for_every_cnn(name):
    """Stages come from the graph (feature-map resolution), not from ResNet's layer names: every
    CNN gets one pruning ratio and one low-rank choice per stage, every group covered once."""
    model = build_model(name).eval()
    stem, cls = stem_and_classifier(name, model)
    bound = load_space("default").bind(model, X, classifier=cls, stem=stem)
    n_stages = len(bound.stage_sizes)
    assert 3 <= n_stages <= 6, bound.stage_sizes
    assert len(bound.dims) <= 2 * n_stages + 2  # prune + rank per stage, KD temperature + alpha
    areas = [int(h) * int(w) for h, w in (v.split("x") for v in bound.stage_sizes.values())]
    assert areas == sorted(areas, reverse=True)  # stage0 is the largest map
    prune = [d for d in bound.dims if d.kind == "prune"]
    covered = [t for d in prune for t in d.targets]
    assert len(covered) == len(set(covered))  # each group in one dimension
    # every prunable group but the head's (the classifier rule fixes its bits, no pruning)
    assert set(covered) == {g for g in bound.groups if not g.startswith(("fc", "classifier"))}
    if name == SHUFFLENET:  # Torch-Pruning cannot trace the channel shuffle
        assert not prune and bound.note and "ZeroDivisionError" in bound.note
        assert [d for d in bound.dims if d.kind == "rank"]  # still searched over ranks


def test_int4_layers_lists_what_may_become_int4(resnet):
    mixed = load_space("mixed-precision").bind(resnet, X, classifier="fc", stem="conv1")
    assert len(mixed.int4_layers()) == 20  # every conv; the classifier is fixed at int8
    assert "fc" not in mixed.int4_layers()


def test_first_match_wins_and_share(tmp_path: Path, resnet):
    f = tmp_path / "s.toml"
    f.write_text(
        '[[rules]]\nmatch = "layer4.*"\nweight_bits = 4\n\n'
        '[[rules]]\nmatch = "*"\nweight_bits = [8, 16]\nshare = true\n'
    )
    bound = load_space(f).bind(resnet, X, classifier="fc")
    assert [d.name for d in bound.dims] == ["weight_bits/rule1"]
    cfg = bound.to_config({"weight_bits/rule1": 16})
    assert cfg.layer("layer4.0.conv1").weight_bits == 4  # first rule won
    assert cfg.layer("layer1.0.conv1").weight_bits == 16


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[[rules]]\nmatch = "*"\nprune = {min = 0.5, max = 0.2}\n', "rules[0].prune"),
        ('[[rules]]\nmatch = "*"\nweight_bits = [8, 3]\n', "rules[0].weight_bits = 3"),
        ('[[rules]]\nmatch = "*"\nprnue = 0.3\n', "rules[0].prnue"),
        ('[[rules]]\nregex = "(("\nprune = 0.3\n', "invalid regex"),
        ('[[rules]]\nmatch = "*"\nact_bits = 4\n', "act_bits = 4"),
        ('[[rules]]\nmatch = "*"\nrank = [0.0]\n', "rules[0].rank"),
        ('[[rules]]\nmatch = "*"\nprune = []\n', "empty choice list"),
        ('colour = "red"\n[[rules]]\nmatch = "*"\nprune = 0.1\n', "colour"),
        ("skip = []\n", "rules"),
        ('[[rules]]\nmatch = "*"\nprune = 0.1\n[distill]\nalpha = 2.0\n', "distill.alpha"),
    ],
)
def test_space_errors_name_file_key_and_value(tmp_path: Path, body: str, needle: str):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_space(f)
    assert str(f) in str(e.value)
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_space_check_cli(capsys):
    assert main(["space", "check", str(SPACES_DIR / "default.toml"), "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "rule0" in out and "fc" in out
    assert "10 dimensions" in out
    assert "stage3 (2x2): 5 conv layers, layer4.0.conv1 .. layer4.1.conv2" in out
    assert main(["space", "check", "no/such/space.toml"]) == 2


@pytest.mark.parametrize(
    "cfg_kw",
    [
        {"prune": 0.0, "weight_bits": 32},
        {"prune": 0.6, "weight_bits": 8},
        {"prune": 0.5, "weight_bits": 8, "rank_ratio": 0.5},
        {"prune": 0.3, "weight_bits": 16},
    ],
)
def test_size_estimate_is_close_or_conservative(tmp_path: Path, resnet, cfg_kw):
    groups = [g.name for g in list_groups(resnet, X, classifier="fc")]
    cfg = CompressionConfig.uniform(groups=groups, **cfg_kw)
    m = copy.deepcopy(resnet)
    prune_model(m, cfg, example=X, classifier="fc")
    facts = {t["layer"] for t in factorize_model(m, cfg).touched}
    est = estimate_size(m, cfg, factorized=facts)
    real = export_onnx(
        fold_batchnorm(m),
        tmp_path / "m.onnx",
        example=X,
        config=cfg,
        calib=torch.randn(16, 1, 28, 28),
        factorized=facts,
    ).size_bytes
    assert est >= real or abs(est - real) / real <= 0.02, (est, real)
    assert abs(est - real) / real <= 0.05, (est, real)
