"""Picking and exporting trials of a stored study (``autoslim.load_study / pick / export_trial``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import autoslim
from autoslim._files import sha256_file
from autoslim.cli import main
from autoslim.errors import ExportError, UsageError
from autoslim.results.export import export_trial
from autoslim.results.selection import NothingQualifies, pick
from autoslim.results.view import StudyView


def _view(rows: list[dict]) -> StudyView:
    """A study view over a hand-written trial table (the pick rules in isolation)."""
    base = {
        "status": "ok",
        "feasible": True,
        "front": False,
        "test_accuracy": np.nan,
        "fail_reason": "",
        "summary": "",
        "config": "",
    }
    df = pd.DataFrame([{**base, **r} for r in rows])
    return StudyView("hand", "sqlite:///x.db", Path("/nonexistent"), {}, {}, {}, df)


ROWS = [
    {"trial": 0, "val_accuracy": 0.92, "size_bytes": 2_500_000, "latency_ms": 0.30},
    {"trial": 1, "val_accuracy": 0.915, "size_bytes": 1_900_000, "latency_ms": 0.12},
    {"trial": 2, "val_accuracy": 0.905, "size_bytes": 1_200_000, "latency_ms": 0.10},
    {"trial": 3, "val_accuracy": 0.93, "size_bytes": 1_800_000, "latency_ms": 2.50},
    {"trial": 4, "val_accuracy": 0.95, "size_bytes": 1_000_000, "latency_ms": 0.05, "feasible": False},
    {"trial": 5, "status": "over_budget", "val_accuracy": np.nan, "size_bytes": np.nan,
     "latency_ms": np.nan},
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_size": 2_000_000, "min_accuracy": 0.91, "prefer": "latency"}, 1),
        ({"max_size": 2_000_000, "prefer": "latency"}, 2),
        ({"max_size": 2_000_000, "prefer": "accuracy"}, 3),
        ({"prefer": "size"}, 2),
        ({"max_latency_ms": 0.2, "prefer": "accuracy"}, 1),
        ({"prefer": "latency", "feasible_only": False}, 4),
    ],
)
def test_pick_obeys_constraints_and_preference(kwargs: dict, expected: int) -> None:
    view = _view(ROWS)
    r = pick(view, **kwargs)
    assert int(r.trial) == expected
    if "max_size" in kwargs:
        assert r.size_bytes <= kwargs["max_size"]
    if "min_accuracy" in kwargs:
        assert r.val_accuracy >= kwargs["min_accuracy"]
    if "max_latency_ms" in kwargs:
        assert r.latency_ms <= kwargs["max_latency_ms"]


def test_pick_none_qualifies_says_why_with_exit_code_3() -> None:
    with pytest.raises(NothingQualifies, match="accuracy: 4 fail") as e:
        pick(_view(ROWS), min_accuracy=0.99)
    assert e.value.exit_code == 3
    with pytest.raises(UsageError, match="--prefer"):
        pick(_view(ROWS), prefer="speed")


def test_unmeasured_or_missing_trial_is_a_usage_error() -> None:
    view = _view(ROWS)
    with pytest.raises(UsageError, match="no measured artifact"):
        view.measured_row(5)
    with pytest.raises(UsageError, match="has no trial 17 .trials: 0..5."):
        view.row(17)


def test_load_study_gives_a_dataframe_of_trials(tiny_study) -> None:
    view = autoslim.load_study(tiny_study.run_dir)
    df = view.trials
    assert isinstance(df, pd.DataFrame) and len(df) == len(tiny_study.result.frame)
    for col in ("trial", "status", "val_accuracy", "test_accuracy", "size_bytes", "latency_ms"):
        assert col in df.columns
    assert view.baseline["size_bytes"] > 0 and view.spec["budget"] == tiny_study.spec.budget
    ok = df[df.status == "ok"]
    assert (ok.size_bytes > 0).all() and ok.val_accuracy.between(0, 1).all()


def test_pick_on_a_real_study_and_cli_exit_codes(tiny_study, capsys) -> None:
    view = autoslim.load_study(tiny_study.run_dir)
    ok = view.trials[(view.trials.status == "ok") & view.trials.feasible]
    cap = int(ok.size_bytes.median())
    r = pick(view, max_size=cap, prefer="accuracy")
    assert r.size_bytes <= cap
    assert r.val_accuracy == ok[ok.size_bytes <= cap].val_accuracy.max()
    run = str(tiny_study.run_dir)
    assert main(["pick", run, "--max-size", f"{cap}B", "--prefer", "accuracy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trial"] == int(r.trial)
    assert (
        out["export_command"]
        == f"autoslim export {run} --trial {int(r.trial)} -o model-t{int(r.trial)}.onnx"
    )
    assert main(["pick", run, "--min-accuracy", "0.999"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qualifies" in err[0]


def _best(tiny_study) -> pd.Series:
    f = tiny_study.result.frame
    return f[f.front].iloc[0]


def test_export_copies_the_stored_artifact_and_verifies_it(tiny_study, tmp_path, capsys) -> None:
    view = autoslim.load_study(tiny_study.run_dir)
    row = _best(tiny_study)
    out = tmp_path / "m.onnx"
    res = export_trial(view, int(row.trial), out)
    assert res["source"] == "stored"
    assert out.stat().st_size == row.size_bytes == res["recorded_size_bytes"]
    assert sha256_file(out) == row.artifact_sha256 == res["sha256"]  # the recorded file
    assert abs(res["val_accuracy"] - row.val_accuracy) <= 0.001
    assert res["test_accuracy"] == pytest.approx(row.test_accuracy, abs=0.001)
    # through the CLI: prints recorded and measured values side by side
    out2 = tmp_path / "cli.onnx"
    rc = main(["export", str(tiny_study.run_dir), "--trial", str(int(row.trial)), "-o", str(out2)])
    assert rc == 0 and out2.stat().st_size == row.size_bytes
    text = capsys.readouterr().out
    assert f"{int(row.size_bytes):,} bytes (recorded {int(row.size_bytes):,})" in text


def test_export_by_replay_reproduces_size_and_accuracy(tiny_study, tmp_path) -> None:
    view = autoslim.load_study(tiny_study.run_dir)
    row = _best(tiny_study)
    out = tmp_path / "replayed.onnx"
    res = export_trial(view, int(row.trial), out, replay=True)
    assert res["source"] == "replayed"
    assert out.stat().st_size == row.size_bytes  # same architecture and bits: exact
    assert abs(res["val_accuracy"] - row.val_accuracy) <= 0.001  # within 0.1 pt


def test_export_refuses_a_changed_artifact_and_writes_nothing(tiny_study, tmp_path) -> None:
    import shutil

    row = _best(tiny_study)
    # a copy of the study folder (its store inside) whose stored artifact was modified
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study.run_dir, copy)
    art = copy / "artifacts" / row.artifact_id
    art.write_bytes(art.read_bytes() + b"\0")
    changed = autoslim.load_study(copy)
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match="changed since the study recorded it"):
        export_trial(changed, int(row.trial), out)
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no partial file either
    art.unlink()  # a missing one is refused too (no silent retraining)
    with pytest.raises(ExportError, match="missing from the store"):
        export_trial(changed, int(row.trial), out)
    view = autoslim.load_study(tiny_study.run_dir)
    with pytest.raises(UsageError, match=r"\.onnx"):
        export_trial(view, int(row.trial), tmp_path / "model.bin")


def test_replay_of_a_trial_stored_with_exporter_stack_traces(tiny_study, tmp_path) -> None:
    """Artifacts written before autoslim dropped the exporter's stack traces (which name the
    venv's source files) are larger by them; a replay or refine of such a trial is checked
    against the size the exporter writes now."""
    import shutil

    import onnx

    view = autoslim.load_study(tiny_study.run_dir)
    row = _best(tiny_study)
    t = int(row.trial)
    copy = tmp_path / "old"
    shutil.copytree(tiny_study.run_dir, copy)
    art = copy / "trials" / f"{t:05d}" / "model.onnx"  # where old studies kept their files
    view.fetch(t, art)
    model = onnx.load(str(art))
    for node in model.graph.node:
        node.metadata_props.add(
            key="pkg.torch.onnx.stack_trace", value='File "/old/venv/torch/nn/conv.py", line 1'
        )
    onnx.save_model(model, str(art))
    df = view.trials.copy()
    df.loc[df.trial == t, "size_bytes"] = art.stat().st_size  # what the old version recorded
    df.loc[df.trial == t, "artifact_id"] = ""  # and no store
    old = replace(view, run_dir=copy, trials=df)
    assert art.stat().st_size > row.size_bytes
    assert old.artifact_size(t) == row.size_bytes
    res = export_trial(old, t, tmp_path / "replayed.onnx", replay=True)
    assert res["size_bytes"] == row.size_bytes
