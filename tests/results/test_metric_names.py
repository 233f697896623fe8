"""Tables, the report and ``pick`` speak the study's metric: ``val_miou`` / "mIoU" for a
segmentation study, today's ``val_accuracy`` names for a classification one (and for a study
recorded before autoslim recorded its task)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import autoslim
from autoslim.cli import main
from autoslim.errors import UsageError
from autoslim.report.data import report_data
from autoslim.report.figures import _final, _history, _scatter
from autoslim.report.text import final_table, front_table, why_no_front
from autoslim.results.selection import NothingQualifies, pick
from autoslim.results.table import (
    DEFAULT_TASK,
    metric_columns,
    output_frame,
    table_records,
    task_of,
)
from autoslim.results.view import StudyView

SEG = {"name": "segmentation", "metric": "miou", "label": "mIoU"}
BASELINE = {"val_accuracy": 0.70, "test_accuracy": 0.69, "size_bytes": 4e6, "latency_ms": 1.0}


def _frame() -> pd.DataFrame:
    """A hand-made trial table: two measured points (one on the front) and an over-budget one."""
    base = {"state": "COMPLETE", "status": "ok", "feasible": True, "latency_source": "measured",
            "summary": "p0.5 w8", "fail_reason": "", "config": "", "size_estimate": np.nan,
            "teacher_latency_ms": 1.0, "speedup": 2.0, "compression": 3.0}  # fmt: skip
    rows = [
        {"trial": 0, "val_accuracy": 0.6512, "test_accuracy": 0.6401, "size_bytes": 1.2e6,
         "latency_ms": 0.5, "front": True},
        {"trial": 1, "val_accuracy": 0.6011, "test_accuracy": 0.5902, "size_bytes": 1.5e6,
         "latency_ms": 0.6, "front": False},
        {"trial": 2, "status": "over_budget", "val_accuracy": np.nan, "test_accuracy": np.nan,
         "size_bytes": np.nan, "latency_ms": np.nan, "front": False, "feasible": False},
    ]  # fmt: skip
    return pd.DataFrame([{**base, **r} for r in rows])


def _view(task: dict | None) -> StudyView:
    return StudyView(
        "hand", "sqlite:///x.db", Path("/nonexistent"), {}, dict(BASELINE), {}, _frame(),
        task_record=dict(task or {}),
    )  # fmt: skip


def test_the_task_of_a_study_and_its_default() -> None:
    assert (
        task_of({})
        == DEFAULT_TASK
        == {
            "name": "classification",
            "metric": "accuracy",
            "label": "accuracy",
        }
    )
    assert task_of({"task": SEG}) == SEG
    assert task_of({"task": {"name": "depth", "metric": "delta1"}})["label"] == "delta1"
    assert _view(None).task == DEFAULT_TASK  # a study from before tasks: classification
    assert _view(SEG).task == SEG


def test_output_columns_are_named_by_the_metric() -> None:
    df = _frame().assign(refined_val_accuracy=np.nan, refined_test_accuracy=np.nan)
    assert metric_columns(df.columns, None) == {}
    assert metric_columns(df.columns, DEFAULT_TASK) == {}
    names = metric_columns(df.columns, SEG)
    assert names["val_accuracy"] == "val_miou" and names["test_accuracy"] == "test_miou"
    assert names["refined_val_accuracy"] == "refined_val_miou"
    seg = table_records(df, SEG)[0]
    assert seg["val_miou"] == pytest.approx(0.6512) and "refined_test_miou" in seg
    assert not any("accuracy" in k for k in seg)
    cls = table_records(df)[0]
    assert "val_accuracy" in cls and "val_miou" not in cls
    renamed = list(output_frame(df, SEG).columns)
    assert renamed == [names.get(c, c) for c in df.columns]  # same order, metric renamed
    assert "val_miou" in renamed and "val_accuracy" not in renamed
    assert output_frame(df, None) is df  # nothing to rename: the same table
    assert "val_accuracy" in df.columns  # the input untouched


def test_text_tables_name_the_metric() -> None:
    df = _frame()
    seg = front_table(df, BASELINE, {}, SEG)
    assert "teacher (fp32 ONNX): val mIoU 0.7000  test mIoU 0.6900" in seg
    assert "val_mIoU" in seg and "test_mIoU" in seg and "val_acc" not in seg
    assert "0.6512" in seg
    cls = front_table(df, BASELINE, {})
    assert "teacher (fp32 ONNX): val 0.7000  test 0.6900" in cls
    assert "val_acc" in cls and "test_acc" in cls and "mIoU" not in cls
    # the final front: the same headers
    fin = df.assign(
        final=df["trial"] == 0, final_front=df["trial"] == 0, refined_epochs=3,
        refined_val_accuracy=0.66, refined_test_accuracy=0.65, refined_size_bytes=1.2e6,
        refined_latency_ms=0.5, refined_teacher_latency_ms=1.0,
    )  # fmt: skip
    assert "val_mIoU" in final_table(fin, task=SEG)
    assert "val_acc " in final_table(fin) and "mIoU" not in final_table(fin)


def test_why_no_front_speaks_the_metric() -> None:
    df = _frame()
    df = df.assign(front=False)
    spec = {"max_accuracy_drop": 0.01}
    seg = why_no_front(df, BASELINE, spec, SEG)
    assert "outside the mIoU floor" in seg, seg
    assert "best -4.9 pt mIoU vs the teacher" in seg, seg
    cls = why_no_front(df, BASELINE, spec)
    assert "outside the accuracy floor" in cls and "best -4.9 pt vs the teacher" in cls, cls
    assert "the mIoU floor" in front_table(df, BASELINE, spec, SEG)


def test_pick_by_the_metric() -> None:
    view = _view(SEG)
    assert int(pick(view, min_metric=0.65).trial) == 0
    assert int(pick(view, min_metric=0.6, prefer="size").trial) == 0
    assert int(pick(view, min_accuracy=0.65).trial) == 0  # the older name: the same constraint
    assert int(pick(view, prefer="metric").trial) == 0
    with pytest.raises(NothingQualifies, match="mIoU: 2 fail"):
        pick(view, min_metric=0.9)
    with pytest.raises(UsageError, match="not both"):
        pick(view, min_metric=0.6, min_accuracy=0.6)
    with pytest.raises(UsageError, match="--min-metric is a fraction"):
        pick(view, min_metric=65)
    with pytest.raises(NothingQualifies, match="accuracy: 2 fail"):
        pick(_view(None), min_metric=0.9)  # classification: as ever


def test_figures_name_the_metric() -> None:
    df = _frame()
    data = {"baseline": BASELINE, "budget": 2_000_000, "max_latency_ms": None,
            "accuracy_floor": 0.69, "task": SEG}  # fmt: skip
    fig = _scatter(data, df)
    assert fig.layout.yaxis.title.text == "validation mIoU (artifact)"
    titles = [a.text for a in fig.layout.annotations]
    assert "mIoU vs size" in titles and "mIoU vs latency" in titles and "mIoU floor" in titles
    hover = next(t.hovertext[0] for t in fig.data if t.name == "front")
    assert "val mIoU 0.6512 test mIoU 0.6401" in hover
    cls = _scatter({**data, "task": None}, df)
    assert cls.layout.yaxis.title.text == "validation accuracy (artifact)"
    hover = next(t.hovertext[0] for t in cls.data if t.name == "front")
    assert "val 0.6512 test 0.6401" in hover
    fin = df.assign(
        final=df["trial"] < 2, final_front=df["trial"] == 0, refined_epochs=3,
        refined_val_accuracy=0.66, refined_test_accuracy=0.65, refined_size_bytes=1.2e6,
        refined_latency_ms=0.5,
    )  # fmt: skip
    final = _final(data, fin)
    assert final.layout.yaxis.title.text == "validation mIoU (final artifact)"
    hover = next(t.hovertext[0] for t in final.data if t.name == "final front")
    assert "val mIoU 0.6600 test mIoU 0.6500 (search-time val mIoU 0.6512)" in hover
    hv = {"hv_history": [(0, 0.1)], "objectives": ["accuracy", "latency"],
          "hv_reference": [0.5, 2.0], "task": SEG}  # fmt: skip
    assert "mIoU 0.5, latency 2" in _history(hv).layout.title.text


# -- a real stored study: the tiny classification search, and a copy marked segmentation ------


@pytest.fixture(scope="module")
def seg_study(tiny_study, tmp_path_factory) -> Path:
    """A copy of the tiny study's folder whose study records a segmentation task (the shared
    study is left as it is)."""
    run = tmp_path_factory.mktemp("seg") / tiny_study.run_dir.name
    shutil.copytree(tiny_study.run_dir, run)
    study = optuna.load_study(study_name=tiny_study.spec.name, storage=f"sqlite:///{run}/study.db")
    study.set_user_attr("task", SEG)
    return run


def test_a_segmentation_study_speaks_miou(seg_study, capsys) -> None:
    view = autoslim.load_study(seg_study)
    assert view.task == SEG and view.run_dir == seg_study
    assert "val_accuracy" in view.trials.columns  # the table itself keeps its names
    run = str(seg_study)
    assert main(["report", run, "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert "val_miou" in header and "test_miou" in header and "val_accuracy" not in header
    assert main(["report", run, "--format", "json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert "val_miou" in rec and "val_accuracy" not in rec
    assert main(["report", run, "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out and "val_mIoU" in out and "val_acc " not in out
    assert main(["report", run]) == 0
    capsys.readouterr()
    html = (seg_study / "report.html").read_text()
    assert "validation mIoU (artifact)" in html and "val_miou" in html
    assert "objectives mIoU, latency" in html
    csv = pd.read_csv(seg_study / "trials.csv")
    assert "val_miou" in csv.columns and "val_accuracy" not in csv.columns
    assert "val_miou" in pd.read_parquet(seg_study / "trials.parquet").columns
    # pick by the metric: the library and the CLI
    ok = view.trials[(view.trials.status == "ok") & view.trials.feasible]
    floor = float(ok.val_accuracy.median())
    r = pick(view, min_metric=floor, prefer="size")
    assert r.val_accuracy >= floor
    assert main(["pick", run, "--min-metric", f"{floor}", "--prefer", "size", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trial"] == int(r.trial) and out["val_miou"] == pytest.approx(r.val_accuracy)
    assert main(["pick", run, "--min-metric", "0.999"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mIoU: " in err[0], err
    assert main(["pick", run, "--min-metric", "0.5", "--min-accuracy", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not both" in err[0], err


def test_a_classification_study_keeps_its_names(tiny_study, capsys) -> None:
    view = autoslim.load_study(tiny_study.run_dir)
    assert view.task == DEFAULT_TASK
    run = str(tiny_study.run_dir)
    assert main(["report", run, "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert "val_accuracy" in header and "test_accuracy" in header
    assert not any("miou" in c for c in header)
    assert main(["report", run, "--format", "json"]) == 0
    assert "val_accuracy" in json.loads(capsys.readouterr().out)[0]
    assert main(["report", run, "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "val_acc" in out and "mIoU" not in out
    # --min-metric is --min-accuracy for a classification study
    ok = view.trials[(view.trials.status == "ok") & view.trials.feasible]
    floor = float(ok.val_accuracy.median())
    assert int(pick(view, min_metric=floor).trial) == int(pick(view, min_accuracy=floor).trial)
    data = report_data(view)
    assert data["task"] == DEFAULT_TASK and "val_accuracy" in data["table"][0]
