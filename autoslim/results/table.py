"""The trial table: one row per trial, refined results joined, JSON records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..pareto import OBJECTIVE_COLUMNS, OBJECTIVES, pareto_mask
from ..record import OK, REFINED_PREFIX

TABLE_COLUMNS = [
    "trial",
    "state",
    "status",
    "val_accuracy",
    "test_accuracy",
    "size_bytes",
    "size_estimate",
    "latency_ms",
    "latency_source",
    "latency_predicted_ms",
    "teacher_latency_ms",
    "speedup",
    "compression",
    "feasible",
    "front",
    "seconds",
    "summary",
    "fail_reason",
    "agreement",
    "host",
]


# the task of a study recorded before autoslim recorded one (study attribute "task")
DEFAULT_TASK = {"name": "classification", "metric": "accuracy", "label": "accuracy"}


def task_info(task: Mapping[str, Any] | None) -> dict[str, str]:
    """A recorded task description (``Task.describe()``: name, metric key, label) with the
    defaults filled in: none recorded is classification by accuracy; no label is the key."""
    task = task or {}
    metric = str(task.get("metric") or DEFAULT_TASK["metric"])
    default_label = DEFAULT_TASK["label"] if metric == DEFAULT_TASK["metric"] else metric
    return {
        "name": str(task.get("name") or DEFAULT_TASK["name"]),
        "metric": metric,
        "label": str(task.get("label") or default_label),
    }


def task_of(user_attrs: Mapping[str, Any]) -> dict[str, str]:
    """The task of a study from its user attributes (:func:`task_info` of ``task``)."""
    return task_info(user_attrs.get("task"))


def metric_columns(columns: Any, task: Mapping[str, Any] | None) -> dict[str, str]:
    """How the output tables (CSV, Parquet, JSON) name the trial table's metric columns.

    The table keeps the task's metric in its ``*_accuracy`` columns whatever the task (so
    studies of every autoslim version read alike); outputs name them by the metric key:
    ``val_miou``, ``test_miou``, ``refined_val_miou``. Empty for an accuracy metric.
    """
    metric = task_info(task)["metric"]
    if metric == "accuracy":
        return {}
    return {c: f"{c[: -len('accuracy')]}{metric}" for c in columns if c.endswith("_accuracy")}


def output_frame(df: pd.DataFrame, task: Mapping[str, Any] | None) -> pd.DataFrame:
    """The trial table with its metric columns named as outputs name them (:func:`metric_columns`)."""
    names = metric_columns(df.columns, task)
    return df.rename(columns=names) if names else df


_FRAME_COLUMNS = [
    "trial", "state", "status", "val_accuracy", "test_accuracy", "size_bytes", "size_estimate",
    "latency_ms", "latency_source", "latency_predicted_ms", "teacher_latency_ms", "host",
    "latency_noise", "agreement", "screen_accuracy", "feasible", "summary", "fail_reason",
    "seconds", "config", "params", "artifact_sha256", "artifact_id",
]  # fmt: skip


def trials_frame(study: Any, run_dir: Path | None = None) -> pd.DataFrame:
    """One row per trial: state, metrics on the artifact, ratios vs the teacher, front flag.

    ``study`` is anything with Optuna's ``user_attrs`` / ``get_trials`` shape. Refined results
    (the study's records; with ``run_dir`` also older ones stored beside the trials) are joined
    as ``refined_*`` columns.
    """
    base = study.user_attrs.get("baseline", {})
    spec = study.user_attrs.get("spec", {})
    objectives = spec.get("objectives", ["accuracy", "latency"])
    drift = study.user_attrs.get("latency_drift", {})  # canary flags (runner._flag_drift)
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("surplus"):  # a worker's trial past the global budget: never run
            continue
        row = {
            "trial": t.number,
            "state": t.state.name,
            "status": a.get("status", "failed" if t.state.name == "FAIL" else t.state.name.lower()),
            "val_accuracy": a.get("val_accuracy", np.nan),
            "test_accuracy": a.get("test_accuracy", np.nan),
            "size_bytes": a.get("size_bytes", np.nan),
            "size_estimate": a.get("size_estimate", np.nan),
            "latency_ms": a.get("latency_ms", np.nan),
            # "measured" on the device, or "predicted" (not timed: behind a measured trial)
            "latency_source": a.get("latency_source", "measured" if "latency_ms" in a else ""),
            "latency_predicted_ms": a.get("latency_predicted_ms", np.nan),
            "teacher_latency_ms": a.get("teacher_latency_ms") or np.nan,
            "host": a.get("host", ""),
            # why this latency may be off: the protocol's noise reasons, the canary's drift
            "latency_noise": "; ".join(
                x for x in (a.get("latency_noise", ""), drift.get(str(t.number), "")) if x
            ),
            "agreement": a.get("agreement", np.nan),
            "screen_accuracy": a.get("screen_accuracy", np.nan),  # level 0: the BN proxy
            "feasible": bool(a.get("feasible", False)),
            "summary": a.get("summary", ""),
            "fail_reason": a.get("fail_reason", ""),
            "seconds": a.get("seconds", np.nan),
            "config": a.get("config", ""),
            "params": json.dumps(t.params, sort_keys=True),
            "artifact_sha256": a.get("artifact_sha256", ""),
            "artifact_id": a.get("artifact_id", ""),  # in the study's store (autoslim.study.store)
        }
        rows.append(row)
    # a study with no trial yet (stopped during its set-up) has every column too
    df = pd.DataFrame(rows, columns=_FRAME_COLUMNS)
    if df.empty:
        df = df.astype({"trial": int, "feasible": bool})
    # each trial against the teacher timed in its own process (older trials: the baseline's)
    teacher_ms = df["teacher_latency_ms"].astype(float).fillna(base.get("latency_ms", np.nan))
    df["speedup"] = teacher_ms / df["latency_ms"]
    df["compression"] = base.get("size_bytes", np.nan) / df["size_bytes"]
    # the front is made of measured latencies only (a predicted one is never the number of record)
    ok = (df["status"] == OK) & df["feasible"] & (df["latency_source"] != "predicted")
    df["front"] = False
    if ok.any():
        cols = [OBJECTIVE_COLUMNS[o] for o in objectives]
        mask = pareto_mask(df.loc[ok, cols].to_numpy(), [OBJECTIVES[o] for o in objectives])
        df.loc[df.index[ok][mask], "front"] = True
    return _join_refined(df, study.user_attrs, run_dir)


def _join_refined(df: pd.DataFrame, attrs: dict[str, Any], run_dir: Path | None) -> pd.DataFrame:
    pass

    ref = load_refined(attrs, run_dir)
    df = df.assign(final=False, final_front=False)
    if ref.empty:
        return df
    cols = {
        c: f"refined_{c}"
        for c in (
            "val_accuracy", "test_accuracy", "size_bytes", "latency_ms", "epochs",
            "teacher_latency_ms",
        )
        if c in ref.columns
    }  # fmt: skip
    recipe = ref["recipe"].map(lambda r: json.dumps(r, sort_keys=True))
    ref = ref[["trial", *cols]].rename(columns=cols).assign(refined_recipe=recipe)
    df = df.drop(columns=["final", "final_front"]).merge(ref, on="trial", how="left")
    # the final level: the trials the search refined with its final recipe (study "final")
    final = attrs.get("final") or {}
    want = json.dumps(final.get("recipe"), sort_keys=True)
    df["final"] = df["trial"].isin(final.get("trials", [])) & (df["refined_recipe"] == want)
    df["final_front"] = False
    objectives = attrs.get("spec", {}).get("objectives", ["accuracy", "latency"])
    if df["final"].any():
        cols = [f"refined_{OBJECTIVE_COLUMNS[o]}" for o in objectives]
        fin = df.index[df["final"]]
        mask = pareto_mask(df.loc[fin, cols].to_numpy(), [OBJECTIVES[o] for o in objectives])
        df.loc[fin[mask], "final_front"] = True
    return df


def _clean(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def table_records(df: pd.DataFrame, task: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trial table as JSON-ready records (NaN -> None), for ``--format json`` and the HTML;
    ``task``: the study's (:func:`task_of`), whose metric names the metric keys
    (:func:`metric_columns`; classification by default: ``val_accuracy``)."""
    cols = [c for c in TABLE_COLUMNS if c in df.columns] + [
        c for c in df.columns if c.startswith("refined_")
    ]
    names = metric_columns(cols, task)
    keys = [names.get(c, c) for c in cols]
    return [
        {k: _clean(v) for k, v in zip(keys, row, strict=True)}
        for row in df[cols].itertuples(index=False)
    ]


FINAL_COLUMNS = ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms")


def final_numbers(rows: pd.DataFrame) -> pd.DataFrame:
    """Trial rows with their final (level 2) numbers in the usual columns, the search-time
    ones kept as ``search_*``, ``speedup`` against the teacher timed with the final file."""
    out = rows.copy()
    for c in FINAL_COLUMNS:
        out[f"search_{c}"] = out[c]
        out[c] = out[f"refined_{c}"]
    teacher = out["refined_teacher_latency_ms"] if "refined_teacher_latency_ms" in out else np.nan
    out["speedup"] = teacher / out["latency_ms"]
    out["numbers"] = "final"
    return out


def refined_records(attrs: dict[str, Any], run_dir: Path | None = None) -> dict[int, dict]:
    """Refined results by trial: the study's ``refined:NNNNN`` attributes, and for studies
    refined before those, the records stored beside the trials (``refined/NNNNN/result.json``)."""
    out: dict[int, dict] = {}
    for f in sorted((run_dir / "refined").glob("*/result.json")) if run_dir else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written record cannot exist (atomic write); skip foreign files
        out[int(rec["trial"])] = rec
    for k in sorted(attrs):
        if k.startswith(REFINED_PREFIX):
            out[int(attrs[k]["trial"])] = attrs[k]
    return out


def load_refined(attrs: dict[str, Any], run_dir: Path | None = None) -> pd.DataFrame:
    """:func:`refined_records` as a table, one row per refined trial."""
    return pd.DataFrame(list(refined_records(attrs, run_dir).values()))
