"""CompressionConfig: JSON round trip and validation that names the field and the bad value."""

from __future__ import annotations

import json

import pytest

from autoslim import CompressionConfig, ConfigError, DistillConfig, LayerConfig


def _full_config() -> CompressionConfig:
    return CompressionConfig(
        prune={"conv1": 0.25, "layer2.0.conv2": 0.5},
        layers={
            "fc": LayerConfig(weight_bits=4, act_bits=8),
            "layer1.0.conv1": LayerConfig(weight_bits=16, rank_ratio=0.5),
        },
        default=LayerConfig(weight_bits=8, act_bits=32, rank_ratio=None),
        distill=DistillConfig(temperature=2.5, alpha=0.7),
        round_to=4,
        importance="lamp",
    )


def test_json_round_trip() -> None:
    cfg = _full_config()
    text = cfg.to_json()
    back = CompressionConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert isinstance(back.layers["fc"], LayerConfig)
    assert back.layer("fc").weight_bits == 4
    assert back.layer("not-listed") == LayerConfig(8, 32, None)  # falls back to the default
    assert json.loads(text)["prune"] == {"conv1": 0.25, "layer2.0.conv2": 0.5}


def test_default_round_trip_and_identity() -> None:
    cfg = CompressionConfig()
    assert CompressionConfig.from_json(cfg.to_json()) == cfg
    assert cfg.is_identity
    assert CompressionConfig(prune={"conv1": 0.0}).is_identity
    assert not CompressionConfig(prune={"conv1": 0.1}).is_identity
    assert not CompressionConfig(layers={"fc": LayerConfig(weight_bits=16)}).is_identity
    assert not CompressionConfig(default=LayerConfig(rank_ratio=0.5)).is_identity


def test_uniform_defaults_activation_bits_by_weight_bits() -> None:
    assert CompressionConfig.uniform(weight_bits=8).default.act_bits == 8
    assert CompressionConfig.uniform(weight_bits=4).default.act_bits == 8
    assert CompressionConfig.uniform(weight_bits=16).default.act_bits == 32
    cfg = CompressionConfig.uniform(prune=0.3, weight_bits=8, act_bits=32, groups=["a", "b"])
    assert cfg.prune == {"a": 0.3, "b": 0.3}
    assert cfg.default == LayerConfig(8, 32)
    assert "prune 0.30" in cfg.summary() and "w8" in cfg.summary()


@pytest.mark.parametrize(
    "build,fragments",
    [
        (lambda: LayerConfig(weight_bits=3), ["weight_bits", "got 3"]),
        (lambda: LayerConfig(weight_bits=8, act_bits=16), ["act_bits", "got 16"]),
        (lambda: LayerConfig(weight_bits=32, act_bits=8), ["act_bits=8", "weight_bits=32"]),
        (lambda: LayerConfig(weight_bits=16, act_bits=8), ["act_bits=8", "weight_bits=16"]),
        (lambda: LayerConfig(rank_ratio=0), ["rank_ratio", "got 0"]),
        (lambda: LayerConfig(rank_ratio=1.5), ["rank_ratio", "got 1.5"]),
        (lambda: CompressionConfig(prune={"conv1": 1.0}), ["prune['conv1']", "got 1.0"]),
        (lambda: CompressionConfig(prune={"conv1": -0.1}), ["prune['conv1']", "got -0.1"]),
        (lambda: CompressionConfig(prune={"conv1": float("nan")}), ["prune['conv1']", "nan"]),
        (lambda: CompressionConfig(prune={"conv1": True}), ["prune['conv1']", "got True"]),
        (lambda: CompressionConfig(prune={"": 0.5}), ["prune keys", "''"]),
        (lambda: CompressionConfig(round_to=0), ["round_to", "got 0"]),
        (lambda: CompressionConfig(importance="random"), ["importance", "'random'"]),
        (lambda: DistillConfig(temperature=0), ["distill.temperature", "got 0"]),
        (lambda: DistillConfig(alpha=1.5), ["distill.alpha", "got 1.5"]),
        (
            lambda: CompressionConfig(layers={"fc": {"weight_bits": 8}}),
            ["layers['fc']", "LayerConfig", "dict"],
        ),
    ],
)
def test_invalid_values_raise_config_error(build, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.exit_code == 2
    for f in fragments:
        assert f in str(e.value)


@pytest.mark.parametrize(
    "doc,fragments",
    [
        ({"prune": {}, "colour": "red"}, ["unknown config keys", "colour"]),
        ({"default": {"weight_bits": 3}}, ["weight_bits", "got 3"]),
        ({"default": {"bits": 8}}, ["default", "bits"]),
        ({"layers": {"fc": {"weight_bits": 32, "act_bits": 8}}}, ["act_bits=8"]),
        ({"layers": {"fc": 8}}, ["layers.fc", "8"]),
        ({"distill": {"temperature": 0}}, ["distill.temperature", "got 0"]),
        ({"distill": {"temp": 2}}, ["distill", "temp"]),
        ({"prune": {"conv1": 1.0}}, ["prune['conv1']", "got 1.0"]),
        ([1, 2], ["JSON object", "list"]),
    ],
)
def test_invalid_json_documents_raise_config_error(doc, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        CompressionConfig.from_json(json.dumps(doc))
    for f in fragments:
        assert f in str(e.value)


def test_not_json_at_all() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompressionConfig.from_json("{prune: 0.5")


@pytest.mark.parametrize(
    "doc",
    [{"prune": [0.5]}, {"layers": [1]}],
    ids=["prune-list", "layers-list"],
)
def test_wrongly_typed_sections_raise_config_error(doc) -> None:
    """A JSON config file with a section of the wrong type is a user input error (exit 2),
    not a crash with a traceback."""
    with pytest.raises(ConfigError):
        CompressionConfig.from_json(json.dumps(doc))
