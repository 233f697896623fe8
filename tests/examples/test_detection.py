"""The detection example (examples/detection/detection.py) end to end through the public API,
the same task as a file through the CLI, and a task that raises: one failed trial, not the
study. One test: the searches share the teacher they train once (a test worker's cache)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import onnx
import optuna
import pytest
from conftest import run_cli

import autoslim
from autoslim.artifact import artifact_scores
from autoslim.record import OK

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "detection" / "detection.py"


def _example():
    if "detection_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("detection_example", EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["detection_example"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["detection_example"]


def _study_file(tmp: Path, name: str, trials: int) -> Path:
    """The example's quick settings as a study file (same data and teacher recipe)."""
    (tmp / "space.toml").write_text(_example().SPACE)
    f = tmp / f"{name}.toml"
    f.write_text(
        f'name = "{name}"\nmodel = "{EXAMPLE}:build_small"\ntask = "{EXAMPLE}:task"\n'
        f'dataset = "fashion-mnist-boxes"\nspace = "{tmp / "space.toml"}"\n'
        f"trials = {trials}\nval_size = 200\nlimit_train = 1200\nlimit_test = 200\n"
        f'latency_runs = 20\ngate_images = 100\ngate_agreement = 0.9\nout_dir = "{tmp / name}"\n'
        "[teacher]\nmax_steps = 120\nbatch_size = 64\nmax_lr = 0.05\n"
        "[recovery]\nsteps = 10\nbatch_size = 64\nsubset = 1000\n"
    )
    return f


def test_detection_example_end_to_end(tmp_path: Path, autoslim_cache: Path) -> None:
    ex = _example()
    # 1. the example's search, through the public API
    r = ex.search(tmp_path / "api", quick=True, progress=False)
    attrs = r.study.user_attrs
    assert attrs["task"] == {"name": "detection", "metric": "map", "label": "mAP"}
    assert attrs["baseline"]["val_accuracy"] > 0.2  # the teacher's mAP: it learned to detect
    ok = r.frame[r.frame["status"] == OK]
    assert len(ok) == 2
    assert (ok["agreement"] >= 0.9).all()  # every measured trial passed the gate
    assert (ok["size_bytes"] < attrs["baseline"]["size_bytes"]).all()
    assert r.frame["final_front"].any()

    # 2. a picked trial's file, exported again, scores the mAP its trial recorded
    view = autoslim.load_study(str(tmp_path / "api" / "study"))
    trial = int(r.front.iloc[0]["trial"])
    path = tmp_path / "picked.onnx"
    autoslim.export_trial(view, trial, str(path))
    data = ex.load_boxes(val_size=200, limit_train=1200, limit_test=200)
    scores, pred = artifact_scores(path, data.val)
    recorded = float(r.frame.set_index("trial").loc[trial, "val_accuracy"])
    assert scores["map"] == pytest.approx(recorded, abs=1e-6)
    assert pred.shape == (200, ex.TOP_K, 6)  # boxes decoded after the file
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"NonMaxSuppression", "TopK"}  # no post-processing in the graph

    # 3. --task FILE:factory through the CLI (the same teacher, from the cache)
    cli = run_cli("search", str(_study_file(tmp_path, "det-cli", 1)), "--quiet", "--json")
    assert cli.returncode == 0, cli.stderr
    assert "training teacher" not in cli.stderr
    assert json.loads(cli.stdout)["baseline"]["val_accuracy"] > 0.2
    study = optuna.load_study(
        study_name="det-cli", storage=f"sqlite:///{tmp_path / 'det-cli' / 'study.db'}"
    )
    assert study.user_attrs["task"]["metric"] == "map"
    assert study.trials[0].user_attrs["status"] == OK

    # 4. a task object whose loss raises: that trial fails with one line, the study stands
    class Broken(ex.DetectionTask):
        def distill_loss(self, student, teacher, target, *, temperature, alpha):
            raise ValueError("the user's distillation loss is broken")

    spec = autoslim.load_study_spec(_study_file(tmp_path, "broken", 1), final_points=0)
    b = autoslim.search(spec, task=Broken(), progress=False)
    (t,) = b.study.trials
    assert t.state == optuna.trial.TrialState.FAIL
    reason = t.user_attrs["fail_reason"]
    assert "ValueError: the user's distillation loss is broken" in reason
    assert "\n" not in reason
    assert b.study.user_attrs["spec"]["task"] == "object:detection"
    assert b.study.user_attrs["baseline"]["val_accuracy"] > 0.2
