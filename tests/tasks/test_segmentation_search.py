"""Segmentation end to end: a tiny search from the CLI stores measured, gated trials and a final
front; the exported file's mIoU is the recorded one; replay, pick on the metric, refine and the
report work on it. One test: every step reuses the teacher trained once (32 px mosaics)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import run_cli

import autoslim
from autoslim import load_dataset
from autoslim.artifact import artifact_scores

SPACE = """
[distill]
temperature = [1.0, 4.0]
alpha = 0.9

[[rules]]
match = "*"
prune = {min = 0.0, max = 0.5, step = 0.25}
weight_bits = 8
act_bits = 8
"""
DATA = {"val_size": 200, "limit_train": 600, "limit_test": 100, "image_size": 32}


def _study(tmp: Path) -> Path:
    (tmp / "space.toml").write_text(SPACE)
    f = tmp / "seg.toml"
    f.write_text(
        f'name = "seg"\nmodel = "unet_tiny"\ndataset = "fashion-mnist-seg"\n'
        f'space = "{tmp / "space.toml"}"\ntrials = 2\nlatency_runs = 20\ngate_images = 100\n'
        + "".join(f"{k} = {v}\n" for k, v in DATA.items())
        + f'out_dir = "{tmp / "seg"}"\n'
        "[teacher]\nmax_steps = 80\nbatch_size = 32\n"
        "[recovery]\nsteps = 8\nbatch_size = 32\nsubset = 300\n"
        "[fidelity]\nfinal_points = 1\nfinal_epochs = 1\nfinal_steps_per_epoch = 6\n"
    )
    return f


def test_segmentation_search_export_pick_refine_report(tmp_path: Path, autoslim_cache) -> None:
    r = run_cli("search", str(_study(tmp_path)), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["front"] and "val_miou" in doc["front"][0]  # the metric's own name
    assert doc["final_front"]
    run = tmp_path / "seg"
    view = autoslim.load_study(str(run))
    study = optuna.load_study(study_name="seg", storage=f"sqlite:///{run / 'study.db'}")
    assert study.user_attrs["task"] == {"name": "segmentation", "metric": "miou", "label": "mIoU"}
    measured = [t for t in study.trials if t.user_attrs.get("status") == "ok"]
    assert len(measured) == 2
    for t in measured:  # gated on pixel agreement, the figure recorded
        assert t.user_attrs["agreement"] >= 0.99
    final = set(study.user_attrs["final"]["trials"])
    trial = next(t for t in measured if t.number not in final)

    # the exported file (verified against the record) scores the recorded mIoU
    out = tmp_path / "picked.onnx"
    autoslim.export_trial(view, trial.number, out)
    data = load_dataset("fashion-mnist-seg", **DATA)
    scores, _ = artifact_scores(out, data.val)
    assert scores["miou"] == pytest.approx(trial.user_attrs["val_accuracy"], abs=1e-6)
    assert 0 < scores["miou"] <= scores["pixel_accuracy"] <= 1

    # replayed from the recorded recipe: the same architecture and bits, the same bytes
    autoslim.export_trial(view, trial.number, tmp_path / "replay.onnx", replay=True, data=data)
    assert (tmp_path / "replay.onnx").stat().st_size == out.stat().st_size

    # pick on the task's metric (API and CLI)
    assert int(autoslim.pick(view, min_metric=0.0).trial) in {t.number for t in measured}
    none = run_cli("pick", str(run), "--min-metric", "0.9999")
    assert none.returncode != 0 and "mIoU" in none.stderr

    # refine, recorded on the study
    rec = autoslim.refine(
        view,
        trial.number,
        tmp_path / "r.onnx",
        recipe=autoslim.RefineRecipe(epochs=1, max_steps_per_epoch=4),
        progress=False,
    )
    assert (tmp_path / "r.onnx").stat().st_size == out.stat().st_size
    assert 0 <= rec["val_accuracy"] <= 1

    # the report speaks mIoU
    csv = run_cli("report", str(run), "--format", "csv")
    assert csv.returncode == 0, csv.stderr
    assert "val_miou" in csv.stdout.splitlines()[0]
    assert "mIoU" in (run / "report.html").read_text()
