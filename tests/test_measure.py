"""Measurements on the artifact: one contract for every latency backend, accuracy, agreement."""

from __future__ import annotations

import pytest
import torch

from autoslim import UsageError
from autoslim.artifact import agreement, artifact_accuracy
from autoslim.measure import Latency, get_backend, list_backends
from autoslim.teacher import evaluate_accuracy


@pytest.mark.parametrize("name", list_backends())
def test_latency_backend_contract(name: str, resnet_artifact, fmnist) -> None:
    try:
        backend = get_backend(name)
    except UsageError as e:
        assert "not available" in str(e)
        pytest.skip(f"{name} is not available on this machine")
    assert backend.available() and backend.name == name
    built = resnet_artifact(0.0)
    lat = backend.measure(
        built.result.path,
        input_shape=fmnist.input_shape,
        runs=7,
        warmup=2,
    )
    assert isinstance(lat, Latency)
    assert lat.backend == name
    assert lat.runs == 7  # the cap: fewer than one block of the protocol
    assert 0 < lat.median_ms <= lat.p90_ms < 10_000
    assert lat.ci_low_ms <= lat.median_ms <= lat.ci_high_ms
    assert lat.cold_ms > 0 and lat.blocks and lat.device["cores"] >= 1
    assert Latency.from_dict(lat.to_dict()) == lat  # what an agent sends back


def test_the_protocol_stops_when_the_median_is_known_and_flags_noise() -> None:
    """Timed blocks stop once the median's 95% CI is within +-2% (a steady function: well
    before the cap); a function that slows down run by run is flagged as drifting."""
    import time

    from autoslim.measure import time_runs

    steady = time_runs(lambda: time.sleep(0.002), backend="t", runs=2000, warmup=2, warmup_s=0)
    assert steady.runs < 2000 and len(steady.blocks) >= 3
    assert (steady.ci_high_ms - steady.ci_low_ms) / 2 <= 0.02 * steady.median_ms
    assert not any("drift" in r for r in steady.noise)
    calls = {"n": 0}

    def slower() -> None:
        calls["n"] += 1
        time.sleep(0.0005 * (1 + calls["n"] / 20))

    drifting = time_runs(slower, backend="t", runs=120, warmup=0, warmup_s=0)
    assert drifting.noisy and any("drift" in r for r in drifting.noise), drifting.noise


def test_unknown_backend() -> None:
    with pytest.raises(UsageError, match="unknown latency backend 'nope'.*remote:HOST:PORT") as e:
        get_backend("nope")
    assert e.value.exit_code == 2
    assert "onnxruntime-cpu" in str(e.value)


def test_every_backend_times_the_artifact() -> None:
    """No backend times the PyTorch module: what ships is what is measured."""
    assert list_backends() == ["onnxruntime-cpu", "onnxruntime-cuda"]
    with pytest.raises(UsageError, match="unknown latency backend 'torch-cpu'"):
        get_backend("torch-cpu")


def test_pruned_int8_artifact_is_faster_than_fp32(resnet_artifact, fmnist) -> None:
    """Side by side on one machine: 30% pruning + int8 QDQ runs in a fraction of fp32 time."""
    backend = get_backend("onnxruntime-cpu")
    fp32 = resnet_artifact(0.0).result.path
    small = resnet_artifact(0.3, 8, 8).result.path
    t_fp32 = backend.measure(fp32, input_shape=fmnist.input_shape, runs=50, warmup=5)
    t_small = backend.measure(small, input_shape=fmnist.input_shape, runs=50, warmup=5)
    assert t_small.median_ms / t_fp32.median_ms < 0.6, (t_small, t_fp32)


def test_artifact_accuracy_matches_pytorch_for_float(resnet_artifact, fmnist) -> None:
    built = resnet_artifact(0.0)
    split = fmnist.val.subset(200)
    acc, pred = artifact_accuracy(built.result.path, split)
    assert pred.shape == (200,)
    assert acc == pytest.approx(evaluate_accuracy(built.compressed.model, split))
    assert acc == pytest.approx(float((pred == split.y).float().mean()))


def test_agreement_is_the_share_of_equal_predictions() -> None:
    a = torch.tensor([0, 1, 2, 3])
    assert agreement(a, a) == 1.0
    assert agreement(a, torch.tensor([0, 1, 0, 0])) == 0.5
