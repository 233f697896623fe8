"""Measurements on the artifact: one contract for every latency backend, accuracy, agreement."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from autoslim import UsageError
from autoslim.artifact import agreement, artifact_accuracy
from autoslim.measure import Latency, get_backend, list_backends
from autoslim.measure.backends import backend_kind
from autoslim.teacher import evaluate_accuracy

# the backends that run ONNX files (ExecuTorch's .pte programs: tests/measure/test_runtimes.py)
ONNX_BACKENDS = [n for n in list_backends() if backend_kind(n) == "onnx"]


@pytest.mark.parametrize("name", ONNX_BACKENDS)
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


def test_the_protocol_times_for_its_least_duration_and_the_suite_turns_it_off() -> None:
    """A short measurement lands in one regime of a shared machine: the protocol times at least
    ``min_s`` seconds, past ``runs``, paired blocks included; ``MIN_S`` is 2 s unless
    $AUTOSLIM_LATENCY_MIN_S says otherwise (the suite's conftest sets 0)."""
    import subprocess
    import sys
    import time

    from autoslim.measure import latency, time_runs

    t0 = time.perf_counter()
    lat = time_runs(
        lambda: time.sleep(0.001), backend="t", runs=5, warmup=0, warmup_s=0, min_s=0.3,
        reference=lambda: time.sleep(0.002),
    )  # fmt: skip
    assert time.perf_counter() - t0 >= 0.3 and lat.runs > 5 and 0.3 < lat.ratio < 0.7
    quick = time_runs(lambda: time.sleep(0.001), backend="t", runs=5, warmup=0, warmup_s=0)
    assert quick.runs == 5 and latency.MIN_S == 0  # this suite's setting
    with pytest.raises(UsageError, match="min_s must be within 0 and max_s"):
        time_runs(lambda: None, backend="t", min_s=30)
    env = {k: v for k, v in os.environ.items() if k != "AUTOSLIM_LATENCY_MIN_S"}
    code = "from autoslim.measure import latency; print(latency.MIN_S)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "2.0", out.stderr


def test_unknown_backend() -> None:
    with pytest.raises(UsageError, match="unknown latency backend 'nope'.*remote:HOST:PORT") as e:
        get_backend("nope")
    assert e.value.exit_code == 2
    assert "onnxruntime-cpu" in str(e.value)


def test_every_backend_times_the_artifact() -> None:
    """No backend times the PyTorch module: what ships is what is measured."""
    assert list_backends() == [
        "executorch-xnnpack",
        "onnxruntime-cpu",
        "onnxruntime-cuda",
        "openvino-cpu",
    ]
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


# -- the latency predictor -----------------------------------------------------------------


def _points(n: int, seed: int, *, law: bool = True) -> tuple[list[dict], list[float]]:
    """Feature dicts shaped like ``latency_features`` and latency ratios that follow a cost
    law (per-MAC costs by kind, per-element and per-layer overheads, 3% noise) or not at all."""
    from autoslim.measure.predictor import _ADDITIVE

    rng = np.random.default_rng(seed)
    feats, ratios = [], []
    for _ in range(n):
        f = {k: 0.0 for k in _ADDITIVE}
        f["mmacs_dense_int8"] = rng.uniform(5, 120)
        f["mmacs_dense_fp"] = rng.uniform(0, 20) * (rng.random() < 0.3)
        f["kact_int8"] = rng.uniform(20, 130)
        f["layers"] = float(rng.integers(18, 26))
        f["boundaries"] = float(rng.integers(0, 4))
        cost = (
            0.002 * f["mmacs_dense_int8"]
            + 0.01 * f["mmacs_dense_fp"]
            + 0.0005 * f["kact_int8"]
            + 0.001 * f["layers"]
            + 0.004 * f["boundaries"]
        )
        feats.append(f)
        ratios.append(cost * rng.normal(1, 0.03) if law else rng.uniform(0.02, 0.3))
    return feats, ratios


@pytest.mark.parametrize("kind", ["additive", "gbt"])
def test_the_predictor_learns_a_cost_law_and_calibrates_on_held_out_points(kind: str) -> None:
    from autoslim.measure.predictor import LatencyPredictor, spearman

    feats, ratios = _points(90, 0)
    p = LatencyPredictor(kind=kind).fit(feats[:40], ratios[:40])
    cal = p.calibration
    assert cal.n == 40 and cal.folds == 5 and cal.usable, cal.line()
    assert cal.rho >= 0.9 and "used (margin" in cal.line()
    pred = p.predict(feats[40:])
    err = np.abs(pred / np.array(ratios[40:]) - 1)
    assert spearman(pred, ratios[40:]) >= 0.9
    # the additive model is the law's own form; trees approximate it from 40 points
    assert np.mean(err <= 0.10) >= (0.9 if kind == "additive" else 0.4)
    # the held-out calibration says how far off new points are: it is not over-optimistic
    assert np.quantile(err, 0.9) <= 2 * cal.margin


def test_an_uncalibrated_predictor_is_reported_and_not_used() -> None:
    from autoslim.measure.predictor import MIN_POINTS, LatencyPredictor

    feats, ratios = _points(40, 1, law=False)  # latency unrelated to the features
    noise = LatencyPredictor().fit(feats, ratios).calibration
    assert not noise.usable and noise.rho < 0.9 and "not used" in noise.line()
    feats, ratios = _points(MIN_POINTS - 1, 2)  # a perfect law, too few points to trust
    few = LatencyPredictor().fit(feats, ratios).calibration
    assert not few.usable and f">= {MIN_POINTS} measured trials" in few.line()
    with pytest.raises(ValueError, match="positive ratios"):
        LatencyPredictor().fit(feats, [-1.0] * len(feats))


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_paired_timing_gives_the_ratio_to_the_reference(name: str, resnet_artifact, fmnist) -> None:
    """With ``reference=``, candidate and reference blocks interleave: the ratio of a file to
    itself is ~1, a 30% pruned int8 file to the fp32 one well below, and the reference's own
    median is reported."""
    try:
        backend = get_backend(name)
    except UsageError:
        pytest.skip(f"{name} is not available on this machine")
    fp32 = resnet_artifact(0.0).result.path
    small = resnet_artifact(0.3, 8, 8).result.path
    same = backend.measure(fp32, input_shape=fmnist.input_shape, runs=60, reference=fp32)
    assert same.ratio == pytest.approx(1.0, abs=0.15) and same.reference_ms > 0
    paired = backend.measure(small, input_shape=fmnist.input_shape, runs=60, reference=fp32)
    assert 0 < paired.ratio < 0.6 and paired.reference_ms > paired.median_ms
    unpaired = backend.measure(small, input_shape=fmnist.input_shape, runs=20)
    assert unpaired.ratio == 0.0 and unpaired.reference_ms == 0.0


def test_files_timed_side_by_side_give_ratios_to_the_first(resnet_artifact, fmnist, tmp_path):
    """`autoslim measure` / :func:`time_files`: interleaved rounds, the first file is the base
    (ratio 1), the pruned int8 file a fraction of it, and a byte-identical copy shares its
    numbers (timed once per round)."""
    import json
    import shutil

    from conftest import run_cli

    from autoslim.measure import time_files

    fp32 = resnet_artifact(0.0).result.path
    small = resnet_artifact(0.3, 8, 8).result.path
    copy = shutil.copy(small, tmp_path / "copy.onnx")
    got = time_files([fp32, small, copy], rounds=2, runs=30)
    assert [g.ratio for g in got][0] == 1.0 and len(got[1].rounds) == 2
    assert got[1].ratio < 0.6, got
    assert got[2].median_ms == got[1].median_ms and got[2].sha256 == got[1].sha256
    assert got[1].size_bytes == os.path.getsize(small) < got[0].size_bytes
    r = run_cli("measure", str(fp32), str(small), "--rounds", "1", "--runs", "20", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == [str(fp32), str(small)]
    assert rows[0]["ratio"] == 1.0 and 0 < rows[1]["ratio"] < 0.6
    assert rows[1]["rounds"][0]["device"]["cores"] >= 1
