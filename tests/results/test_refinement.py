"""``autoslim refine``: longer recovery of a picked trial, recorded on the study, resumable."""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_cli, start_cli

import autoslim
from autoslim.artifact import onnx_predict, ort_session
from autoslim.cli import main
from autoslim.errors import ExportError, UsageError
from autoslim.results.refinement import RefineRecipe, refine
from autoslim.results.view import StudyView

QUICK = RefineRecipe(epochs=2, max_steps_per_epoch=8, batch_size=64)


@pytest.fixture
def study_copy(tiny_study, tmp_path: Path) -> Path:
    """A private copy of the tiny study folder: refine writes into it."""
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.run_dir, dst, ignore=shutil.ignore_patterns("refined"))
    return dst


def _front_trial(view: StudyView) -> int:
    return int(view.front.sort_values("val_accuracy").iloc[-1].trial)


def test_refined_artifact_is_recorded_on_the_study_and_stored(
    study_copy: Path, fmnist, tmp_path
) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    before = view.trials.set_index("trial")
    out = tmp_path / "final.onnx"
    r = refine(view, t, out, recipe=QUICK, progress=False)
    # the artifact loads and runs in ONNX Runtime and has exactly the trial's size
    assert out.stat().st_size == before.loc[t, "size_bytes"] == r["size_bytes"]
    logits = onnx_predict(ort_session(out), fmnist.val.x[:32])
    assert logits.shape == (32, 10) and torch.isfinite(logits).all()
    assert len(r["history"]) == QUICK.epochs and r["history"][-1]["qat"]
    # recorded next to, not over, the search-time values
    after = autoslim.load_study(study_copy).trials.set_index("trial")
    assert after.loc[t, "val_accuracy"] == before.loc[t, "val_accuracy"]
    assert after.loc[t, "test_accuracy"] == before.loc[t, "test_accuracy"]
    assert after.loc[t, "refined_val_accuracy"] == pytest.approx(r["val_accuracy"])
    assert after.loc[t, "refined_size_bytes"] == before.loc[t, "size_bytes"]
    assert r["search_val_accuracy"] == pytest.approx(before.loc[t, "val_accuracy"])
    assert not (view.refined_dir(t) / "checkpoint.pt").exists()
    # the file is in the study's store (readable wherever the store is), not left beside it
    rec = autoslim.load_study(study_copy).refined[t]
    assert (study_copy / "artifacts" / rec["artifact_id"]).read_bytes() == out.read_bytes()
    assert not (view.refined_dir(t) / "model.onnx").exists()
    # a second call with the same recipe reuses the result; export --refined verifies it
    again = refine(view, t, None, recipe=QUICK, progress=False)
    assert again["reused"] and again["sha256"] == r["sha256"]
    res = autoslim.export_trial(view, t, tmp_path / "e.onnx", refined=True)
    assert res["source"] == "refined" and (tmp_path / "e.onnx").read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    "changes",
    [{"augment": True}, {"temperature": 2.0, "alpha": 0.7}, {"seed": 1}],
    ids=["augment", "kd-override", "seed"],
)
def test_another_recipe_is_its_own_record_with_the_trials_size(study_copy: Path, changes) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    assert (view.config(t).distill.temperature, view.config(t).distill.alpha) != (2.0, 0.7)
    plain = refine(view, t, None, recipe=QUICK, progress=False)
    other = refine(view, t, None, recipe=replace(QUICK, **changes), progress=False)
    # not served from the plain result: trained on other batches or another loss, so another
    # file of the same size, and the recipe it was made with is what the study records
    assert not other["reused"] and changes.items() <= other["recipe"].items()
    assert other["size_bytes"] == plain["size_bytes"] and other["sha256"] != plain["sha256"]
    assert autoslim.load_study(study_copy).refined[t]["recipe"] == other["recipe"]
    with pytest.raises(UsageError, match="--alpha must be in"):
        RefineRecipe(alpha=1.5)


def test_interrupted_refine_continues_from_its_checkpoint(study_copy: Path) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    ckpt = view.refined_dir(t) / "checkpoint.pt"
    args = ["refine", str(study_copy), "--trial", str(t), "--epochs", "40", "--batch-size", "64",
            "--quiet"]  # fmt: skip
    p = start_cli(*args)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 40
    assert t not in autoslim.load_study(study_copy).refined
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    resumed = int(r.stderr.split("resuming after epoch ")[1].split()[0])
    assert resumed >= done
    result = json.loads(r.stdout)
    assert [h["epoch"] for h in result["history"]] == list(range(1, 41))
    # a refine with another recipe is not served from that result (it runs and replaces it)
    assert not refine(view, t, None, recipe=QUICK, progress=False)["reused"]


def test_refining_an_unusable_trial_is_a_usage_error(study_copy: Path, capsys) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    df = view.trials.copy()
    df.loc[df.trial == t, "feasible"] = False
    with pytest.raises(UsageError, match="infeasible"):
        refine(replace(view, trials=df), t, recipe=QUICK, progress=False)
    df = view.trials.copy()
    df.loc[df.trial == t, ["status", "fail_reason"]] = ["failed", "export error: scale issue"]
    with pytest.raises(UsageError, match="no measured artifact .export error: scale issue."):
        refine(replace(view, trials=df), t, recipe=QUICK, progress=False)
    assert main(["refine", str(study_copy), "--trial", "999", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no trial 999" in err[0]
    assert main(["refine", str(study_copy), "--quiet"]) == 2  # neither --trial nor --front


def test_a_size_difference_is_an_error_not_an_update(study_copy: Path) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    df = view.trials.copy()
    df.loc[df.trial == t, "size_bytes"] += 1  # as if the trial's record said another size
    with pytest.raises(ExportError, match="same architecture and bits"):
        refine(replace(view, trials=df), t, recipe=QUICK, progress=False)
    assert t not in autoslim.load_study(study_copy).refined
    assert "refined_val_accuracy" not in autoslim.load_study(study_copy).trials.columns


def test_refine_front_refines_every_front_point(study_copy: Path, tmp_path, capsys) -> None:
    view = autoslim.load_study(study_copy)
    args = ["refine", str(study_copy), "--front", "--epochs", "1", "--max-steps-per-epoch", "4",
            "--quiet", "-o", str(tmp_path / "models")]  # fmt: skip
    assert main(args) == 0
    front = view.front["trial"].astype(int).tolist()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        f"model-t{t}.onnx" for t in front
    )
    assert main(args) == 0  # resumable point by point: finished points are reused
    assert capsys.readouterr().out.count("reused") == len(front)


def test_a_diverging_refine_says_to_lower_the_learning_rate(study_copy: Path, capsys) -> None:
    view = autoslim.load_study(study_copy)
    t = _front_trial(view)
    args = ["refine", str(study_copy), "--trial", str(t), "--epochs", "1", "--lr", "1e9",
            "--max-steps-per-epoch", "8", "--quiet"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "--lr" in err[0]
    assert t not in autoslim.load_study(study_copy).refined
