"""Tiny searches against OpenVINO and ExecuTorch (XNNPACK): measured, gated trials of the
runtime's artifact kind; the fingerprint holds the runtime's version; a trial's file exports
and re-scores as recorded. And the default space's precision: what the runtime runs well."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, tiny_study_file

import autoslim
from autoslim.artifact import artifact_accuracy
from autoslim.measure.backends import artifact_kind, available_runtimes
from autoslim.record import OK


def _small(f: Path) -> Path:
    """The tiny study on 300 validation and 300 test images (a .pte runs one image a time)."""
    f.write_text(f.read_text().replace("val_size = 500\n", "val_size = 300\nlimit_test = 300\n"))
    return f


@pytest.mark.parametrize("runtime", ["openvino-cpu", "executorch-xnnpack"])
def test_a_search_on_the_runtime_stores_measured_gated_trials_of_its_kind(
    runtime: str, tmp_path: Path
) -> None:
    if runtime not in available_runtimes():
        pytest.skip(f"{runtime} is not installed here")
    f = _small(tiny_study_file(tmp_path, "rt", 1))
    r = run_cli("search", str(f), "--backend", runtime, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    ext = "pte" if runtime == "executorch-xnnpack" else "onnx"
    study = optuna.load_study(study_name="rt", storage=f"sqlite:///{tmp_path / 'rt' / 'study.db'}")
    assert study.user_attrs["fingerprint"]["runtime"] == available_runtimes()[runtime]
    ok = [t for t in study.trials if t.user_attrs.get("status") == OK]
    assert ok, [t.user_attrs.get("fail_reason") for t in study.trials]
    for t in ok:
        assert t.user_attrs["agreement"] >= 0.95  # the export gate, run in the runtime's file
        assert t.user_attrs["latency_source"] == "measured" and t.user_attrs["latency_ms"] > 0
    assert (tmp_path / "rt" / f"teacher_fp32.{ext}").is_file()
    doc = json.loads(r.stdout)
    assert doc["baseline"]["size_bytes"] > 0

    # a trial's artifact, written out and verified against its record
    view = autoslim.load_study(str(tmp_path / "rt"))
    trial = ok[0].number
    with pytest.raises(autoslim.UsageError, match=rf"output must be an \.{ext} file"):
        autoslim.export_trial(view, trial, str(tmp_path / ("x.pte" if ext == "onnx" else "x.onnx")))
    out = tmp_path / f"picked.{ext}"
    got = autoslim.export_trial(view, trial, str(out))
    assert got["size_bytes"] == ok[0].user_attrs["size_bytes"] == out.stat().st_size
    assert artifact_kind(out) == ext  # the runtime's own kind of file, from the study's store
    acc, _ = artifact_accuracy(out, view.study_spec.load_data().val)
    assert acc == pytest.approx(ok[0].user_attrs["val_accuracy"], abs=1e-6)


def test_runtime_precision_is_int8_only_where_int8_runs_clearly_faster(
    tmp_path: Path, monkeypatch
) -> None:
    """``weight_bits = "runtime"``: the teacher's int8/fp32 latency ratio on the study's runtime
    is timed at setup and recorded; where int8 is not under ``INT8_GAIN`` of fp32, each stage
    also offers fp32 (forced here by a gain no runtime reaches)."""
    from autoslim.study import task as task_mod
    from autoslim.study.spec import load_study_spec

    f = tiny_study_file(tmp_path, "p", 1)
    (tmp_path / "space.toml").write_text(
        '[[rules]]\nmatch = "fc"\nweight_bits = 8\nact_bits = 8\n\n'
        '[[rules]]\nmatch = "*"\nprune = {min = 0.0, max = 0.5, step = 0.25}\n'
        'weight_bits = "runtime"\nact_bits = 8\nshare = "stage"\n'
    )
    spec = load_study_spec(f)
    t = task_mod.build_task(spec, progress=False)
    assert 0 < t.int8_ratio < 10  # measured on this runtime
    bits = [d for d in t.space.dims if d.kind == "weight_bits"]
    assert bool(bits) == (t.int8_ratio > task_mod.INT8_GAIN)
    monkeypatch.setattr(task_mod, "INT8_GAIN", 0.0)  # int8 never "clearly faster"
    t2 = task_mod.build_task(spec, progress=False)
    assert t2.int8_ratio == t.int8_ratio  # read from the cache, not timed again
    bits = [d for d in t2.space.dims if d.kind == "weight_bits"]
    assert bits and all(set(d.knob.choices) == {8, 32} for d in bits)
    monkeypatch.setattr(task_mod, "INT8_GAIN", float("inf"))  # int8 always clearly faster
    t3 = task_mod.build_task(spec, progress=False)
    assert not [d for d in t3.space.dims if d.kind == "weight_bits"]
    assert all(v == 8 for v in t3.space.fixed["weight_bits"].values())
    assert t3.space.fingerprint() != t2.space.fingerprint()  # another space: another study


def test_a_study_of_the_earlier_int8_only_default_resumes(tmp_path: Path) -> None:
    """A study made when ``default`` was int8 only (its text is ``default-int8``) resumes under
    ``space = "default"`` with its trials kept."""
    from autoslim.study.spec import load_study_spec
    from autoslim.workflow import search

    f = _small(tiny_study_file(tmp_path, "old", 1))
    search(load_study_spec(f, space="default-int8"), progress=False)
    res = search(load_study_spec(f, space="default", trials=2), progress=False)
    assert res.task.space.space.name == "default"  # the file's own name: the int8-only text
    assert [d.kind for d in res.task.space.dims].count("weight_bits") == 0
    study = optuna.load_study(
        study_name="old", storage=f"sqlite:///{tmp_path / 'old' / 'study.db'}"
    )
    assert len(study.trials) == 2  # the first trial kept, one more run
