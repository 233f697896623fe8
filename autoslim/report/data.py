"""The report's data step: a stored study as plain tables and dicts."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd

from ..pareto import OBJECTIVE_COLUMNS, OBJECTIVES, hypervolume
from ..record import OK
from ..results.table import table_records, task_info


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _hv_reference(df: pd.DataFrame, objectives: list[str], baseline: dict) -> list[float]:
    ok = df[(df["status"] == OK) & df["feasible"]] if len(df) else df
    ref = []
    for o in objectives:
        col = OBJECTIVE_COLUMNS[o]
        if o == "accuracy":
            low = float(ok[col].min()) if len(ok) else 0.5
            ref.append(min(0.5, low - 0.01))
        else:  # the teacher's value, or beyond the worst feasible point if that is worse
            worst = float(ok[col].max()) * 1.05 if len(ok) else np.nan
            ref.append(float(np.nanmax([baseline.get(col, np.nan), worst])))
    return ref


def hypervolume_history(
    df: pd.DataFrame, objectives: list[str], reference: list[float]
) -> list[tuple[int, float]]:
    """Hypervolume of the feasible measured trials up to each trial number."""
    dirs = [OBJECTIVES[o] for o in objectives]
    cols = [OBJECTIVE_COLUMNS[o] for o in objectives]
    out, pts = [], np.empty((0, len(cols)))
    for _, r in df.sort_values("trial").iterrows():
        if r["status"] == OK and r["feasible"]:
            pts = np.vstack([pts, r[cols].to_numpy(dtype=float)])
        out.append((int(r["trial"]), hypervolume(pts, dirs, reference) if len(pts) else 0.0))
    return out


def _configs(df: pd.DataFrame) -> list[tuple[int, dict]]:
    out = []
    for _, r in df.iterrows():
        try:
            out.append((int(r["trial"]), json.loads(r["config"]) if r["config"] else {}))
        except json.JSONDecodeError:
            continue
    return out


def layer_knobs(df: pd.DataFrame, columns_from: pd.DataFrame | None = None) -> dict[str, Any]:
    """Per-layer knobs of the trials in ``df``: prune ratio per group, weight bits and rank.

    Returns ``{"trials": [...], "prune": {"columns", "values"}, "weight_bits": ..., "rank": ...}``
    with one row per trial. Columns are every group / layer named by any config in
    ``columns_from`` (default ``df``); a layer a config does not name takes its default knobs.
    """
    configs = _configs(df)
    named = _configs(columns_from) if columns_from is not None else configs
    groups = sorted({g for _, c in named for g in c.get("prune", {})}, key=_natural)
    layers = sorted({n for _, c in named for n in c.get("layers", {})}, key=_natural)

    def layer_value(c: dict, name: str, key: str) -> Any:
        lc = c.get("layers", {}).get(name, c.get("default", {}))
        v = lc.get(key)
        return 1.0 if key == "rank_ratio" and v is None else v  # full rank = low-rank off

    return {
        "trials": [t for t, _ in configs],
        "prune": {
            "columns": groups,
            "values": [[c.get("prune", {}).get(g, 0.0) for g in groups] for _, c in configs],
        },
        "weight_bits": {
            "columns": layers,
            "values": [[layer_value(c, n, "weight_bits") for n in layers] for _, c in configs],
        },
        "rank": {
            "columns": layers,
            "values": [[layer_value(c, n, "rank_ratio") for n in layers] for _, c in configs],
        },
    }


def report_data(view: Any) -> dict[str, Any]:
    """The pure data step of the report: everything the HTML shows, as plain data.

    ``task``: the study's (name, metric key, label); ``table`` and ``details`` name the metric
    columns by its key (``val_miou``; ``val_accuracy`` for accuracy), while ``baseline``,
    ``accuracy_floor`` and the objectives keep the study's own names (``accuracy``)."""
    df = view.trials
    spec = view.study_spec
    task = task_info(getattr(view, "task", None))
    objectives = spec.objectives
    ref = _hv_reference(df, objectives, view.baseline) if len(df) else []
    table = table_records(df, task) if len(df) else []
    details = {}
    for rec, config in zip(table, df["config"] if len(df) else [], strict=True):
        d = {**rec, "config": json.loads(config) if config else None}
        if rec["status"] == OK:
            d["export_command"] = view.export_command(rec["trial"])
        details[str(rec["trial"])] = d
    measured = df[df["status"] == OK] if len(df) else df
    return {
        "study": view.name,
        "cli_ref": view.cli_ref,
        "task": task,
        "objectives": objectives,
        "budget": spec.budget,
        "max_latency_ms": spec.max_latency_ms,
        "accuracy_floor": (
            view.baseline["val_accuracy"] - spec.max_accuracy_drop
            if spec.max_accuracy_drop is not None and view.baseline
            else None
        ),
        "baseline": view.baseline,
        "teacher": view.teacher,
        "device": view.device,
        "latency_predictor": view.latency_predictor,
        "table": table,
        "details": details,
        "front_knobs": layer_knobs(df[df["front"]], df) if len(df) else layer_knobs(df),
        "hv_reference": ref,
        "hv_history": hypervolume_history(df, objectives, ref) if len(df) else [],
        "params": [json.loads(p) for p in measured["params"]] if len(measured) else [],
        "importances": view.importances,
    }
