"""The study report: trial tables (pandas), CSV/Parquet/JSON, one self-contained HTML file.

Two steps, each testable on its own: the data step (:func:`trials_frame`, :func:`report_data`)
turns a stored study into plain tables and dicts; the rendering step (:func:`front_table`,
:func:`render_html`) draws them. The HTML has plotly.js inline and makes no network requests.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UsageError, one_line
from .pareto import OBJECTIVE_COLUMNS, OBJECTIVES, hypervolume, pareto_mask

__all__ = [
    "trials_frame",
    "front_table",
    "report_data",
    "render_html",
    "write_outputs",
    "TABLE_COLUMNS",
]

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


# what the report names of the device that timed the study (host_identity, agent identity)
_DEVICE_KEYS = (
    "backend",
    "host",
    "cpu",
    "cores",
    "agent",
    "onnxruntime",
    "provider",
    "threads",
    "ort_optimization",
)


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
            "artifact_id": a.get("artifact_id", ""),  # in the study's store (autoslim.store)
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
    ok = (df["status"] == "ok") & df["feasible"] & (df["latency_source"] != "predicted")
    df["front"] = False
    if ok.any():
        cols = [OBJECTIVE_COLUMNS[o] for o in objectives]
        mask = pareto_mask(df.loc[ok, cols].to_numpy(), [OBJECTIVES[o] for o in objectives])
        df.loc[df.index[ok][mask], "front"] = True
    return _join_refined(df, study.user_attrs, run_dir)


def _join_refined(df: pd.DataFrame, attrs: dict[str, Any], run_dir: Path | None) -> pd.DataFrame:
    from .results import load_refined

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


def final_table(df: pd.DataFrame, baseline: dict | None = None) -> str:
    """The final front (level 2: the finally-recovered models, measured on their files) as a
    fixed-width text table, best accuracy first, with each point's search-time accuracy."""
    if "final" not in df.columns or not df["final"].any():
        return ""
    fin = df[df["final_front"]].sort_values("refined_val_accuracy", ascending=False)
    epochs = int(fin["refined_epochs"].iloc[0])
    lines = [f"final front ({epochs}-epoch recovery of {int(df['final'].sum())} level-1 points):"]
    hdr = (
        f"{'trial':>5} {'val_acc':>8} {'test_acc':>8} {'size_MB':>8} {'lat_ms':>7} "
        f"{'speedup':>7} {'search_val':>10}  config"
    )
    lines += [hdr, "-" * len(hdr)]
    for _, r in fin.iterrows():
        teacher = r.refined_teacher_latency_ms if "refined_teacher_latency_ms" in r else np.nan
        lines.append(
            f"{int(r.trial):>5} {r.refined_val_accuracy:>8.4f} {r.refined_test_accuracy:>8.4f} "
            f"{r.refined_size_bytes / 1e6:>8.3f} {r.refined_latency_ms:>7.3f} "
            f"{teacher / r.refined_latency_ms:>6.1f}x {r.val_accuracy:>10.4f}  {r.summary}"
        )
    return "\n".join(lines)


def why_no_front(df: pd.DataFrame, baseline: dict | None, spec: dict | None) -> str:
    """Why a study has no feasible measured trial, in one line: the binding constraint, the
    best value measured against it, and the flag that moves it."""
    spec = spec or {}
    if df.empty:
        return "no trial yet: the search stopped during its set-up; run `autoslim search` again"
    status = df["status"]
    ok = df[(status == "ok") & (df["latency_source"] != "predicted")]
    if ok.empty:
        parts = []
        over = df[status == "over_budget"]
        if len(over):
            parts.append(
                f"{len(over)} over the size budget by the estimate (smallest "
                f"{int(over['size_estimate'].min()):,} B of {int(spec.get('budget') or 0):,} B)"
            )
        for name, what in (("over_latency", "over --max-latency by the predictor"),
                           ("screened", "screened and not trained (level 0)")):  # fmt: skip
            if (status == name).any():
                parts.append(f"{int((status == name).sum())} {what}")
        failed = df[df["state"] == "FAIL"]
        if len(failed):
            top = failed["fail_reason"].replace("", "unknown").value_counts().index[0]
            parts.append(f"{len(failed)} failed (most often: {one_line(top, 160)})")
        fix = (
            "raise --budget"
            if len(over) >= len(df) / 2
            else "run more trials (--trials) or see `autoslim report --format table --all`"
        )
        return f"no trial measured: {', '.join(parts) or 'none finished'}; {fix}"
    base_acc = (baseline or {}).get("val_accuracy")
    checks = []  # (constraint, violated by each measured trial, best value line, fix)
    if spec.get("max_accuracy_drop") is not None and base_acc is not None:
        drop = base_acc - ok["val_accuracy"]
        best = float(ok["val_accuracy"].max() - base_acc) * 100
        checks.append((
            "the accuracy floor",
            drop > spec["max_accuracy_drop"] + 1e-12,
            f"best {best:+.1f} pt vs the teacher, floor {-100 * spec['max_accuracy_drop']:.1f} pt",
            "raise --recovery-steps or --max-accuracy-drop",
        ))  # fmt: skip
    if spec.get("budget") is not None:
        checks.append((
            "the size budget",
            ok["size_bytes"] > spec["budget"],
            f"smallest {int(ok['size_bytes'].min()):,} B, budget {int(spec['budget']):,} B",
            "raise --budget",
        ))  # fmt: skip
    if spec.get("max_latency_ms") is not None:
        checks.append((
            "the latency limit",
            ok["latency_ms"] > spec["max_latency_ms"],
            f"fastest {float(ok['latency_ms'].min()):.3f} ms, limit {spec['max_latency_ms']} ms",
            "raise --max-latency",
        ))  # fmt: skip
    if not checks:
        return f"no feasible trial among {len(ok)} measured; run more trials"
    name, bad, best, fix = max(checks, key=lambda c: int(c[1].sum()))
    every = "all" if int(bad.sum()) == len(ok) else f"{int(bad.sum())}"
    return f"no feasible trial: {len(ok)} measured, {every} outside {name}: {best}; {fix}"


def front_table(df: pd.DataFrame, baseline: dict | None = None, spec: dict | None = None) -> str:
    """The feasible Pareto front as a fixed-width text table, best accuracy first (or, when
    it is empty, why: :func:`why_no_front`)."""
    front = df[df["front"]].sort_values("val_accuracy", ascending=False)
    lines = []
    if baseline:
        lines.append(
            f"teacher (fp32 ONNX): val {baseline['val_accuracy']:.4f}  test "
            f"{baseline['test_accuracy']:.4f}  {baseline['size_bytes'] / 1e6:.2f} MB  "
            f"{baseline['latency_ms']:.3f} ms"
        )
    if front.empty:
        lines.append(why_no_front(df, baseline, spec))
        return "\n".join(lines)
    hdr = (
        f"{'trial':>5} {'val_acc':>8} {'test_acc':>8} {'size_MB':>8} {'lat_ms':>7} "
        f"{'speedup':>7} {'compr':>6}  config"
    )
    lines += [hdr, "-" * len(hdr)]
    for _, r in front.iterrows():
        lines.append(
            f"{int(r.trial):>5} {r.val_accuracy:>8.4f} {r.test_accuracy:>8.4f} "
            f"{r.size_bytes / 1e6:>8.3f} {r.latency_ms:>7.3f} {r.speedup:>6.1f}x "
            f"{r.compression:>5.1f}x  {r.summary}"
        )
        if "refined_val_accuracy" in r.index and pd.notna(r.refined_val_accuracy):
            lines.append(
                f"{'':>5} {r.refined_val_accuracy:>8.4f} {r.refined_test_accuracy:>8.4f} "
                f"{r.refined_size_bytes / 1e6:>8.3f} {r.refined_latency_ms:>7.3f}  "
                f"^ refined ({int(r.refined_epochs)} epochs; search-time values above)"
            )
    return "\n".join(lines)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _hv_reference(df: pd.DataFrame, objectives: list[str], baseline: dict) -> list[float]:
    ok = df[(df["status"] == "ok") & df["feasible"]] if len(df) else df
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
        if r["status"] == "ok" and r["feasible"]:
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


def _clean(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def table_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The trial table as JSON-ready records (NaN -> None), for ``--format json`` and the HTML."""
    cols = [c for c in TABLE_COLUMNS if c in df.columns] + [
        c for c in df.columns if c.startswith("refined_")
    ]
    return [
        {c: _clean(v) for c, v in zip(cols, row, strict=True)}
        for row in df[cols].itertuples(index=False)
    ]


def report_data(view: Any) -> dict[str, Any]:
    """The pure data step of the report: everything the HTML shows, as plain data."""
    df = view.trials
    spec = view.spec
    objectives = spec.get("objectives", ["accuracy", "latency"])
    ref = _hv_reference(df, objectives, view.baseline) if len(df) else []
    table = table_records(df) if len(df) else []
    details = {}
    for rec, config in zip(table, df["config"] if len(df) else [], strict=True):
        d = {**rec, "config": json.loads(config) if config else None}
        if rec["status"] == "ok":
            d["export_command"] = view.export_command(rec["trial"])
        details[str(rec["trial"])] = d
    measured = df[df["status"] == "ok"] if len(df) else df
    return {
        "study": view.name,
        "cli_ref": view.cli_ref,
        "objectives": objectives,
        "budget": spec.get("budget"),
        "max_latency_ms": spec.get("max_latency_ms"),
        "accuracy_floor": (
            view.baseline["val_accuracy"] - spec["max_accuracy_drop"]
            if spec.get("max_accuracy_drop") is not None and view.baseline
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


def _two_panels():
    """A figure of two panels side by side: accuracy vs size (MB, log), vs latency (ms, log)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs size", "accuracy vs latency"))
    fig.update_xaxes(title_text="artifact size (MB, log)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="latency (ms, log)", type="log", row=1, col=2)
    return fig


def _on_both(fig, name: str, size_mb, latency_ms, y, **trace: Any) -> None:
    """One group of points on both panels (x: size, then latency), one legend entry."""
    import plotly.graph_objects as go

    for col, x in ((1, size_mb), (2, latency_ms)):
        fig.add_trace(
            go.Scatter(x=x, y=y, name=name, legendgroup=name, showlegend=col == 1, **trace),
            row=1,
            col=col,
        )


def _points(fig, name: str, g: pd.DataFrame, prefix: str, hover: list[str], marker: dict) -> None:
    """Trials of ``g`` as clickable markers (``prefix``: "" for search-time columns,
    "refined_" for the final ones)."""
    _on_both(
        fig,
        name,
        g[f"{prefix}size_bytes"] / 1e6,
        g[f"{prefix}latency_ms"],
        g[f"{prefix}val_accuracy"],
        mode="markers",
        hovertext=hover,
        hoverinfo="text",
        customdata=g["trial"].astype(int).tolist(),
        marker=marker,
    )


def _teacher(fig, base: dict | None) -> None:
    """The fp32 teacher as a star on both panels."""
    if base:
        _on_both(
            fig,
            "teacher (fp32)",
            [base["size_bytes"] / 1e6],
            [base["latency_ms"]],
            [base["val_accuracy"]],
            mode="markers",
            hovertext=f"teacher fp32: val {base['val_accuracy']:.4f}, "
            f"{base['size_bytes'] / 1e6:.2f} MB, {base['latency_ms']:.3f} ms",
            hoverinfo="text",
            marker={"color": "black", "symbol": "star", "size": 13},
        )


def _scatter(data: dict, df: pd.DataFrame):
    fig = _two_panels()
    ok = df[df["status"] == "ok"] if len(df) else df
    groups = [
        ("front", ok[ok["front"]], "#d62728", "circle"),
        ("dominated", ok[~ok["front"] & ok["feasible"]], "#1f77b4", "circle-open"),
        ("infeasible", ok[~ok["feasible"]], "#999999", "x"),
    ]
    for name, g, color, symbol in groups:
        hover = [
            f"trial {int(r.trial)}<br>val {r.val_accuracy:.4f} test {r.test_accuracy:.4f}"
            f"<br>{r.size_bytes / 1e6:.3f} MB, {r.latency_ms:.3f} ms<br>"
            f"{r.speedup:.1f}x faster, {r.compression:.1f}x smaller<br>{r.summary}"
            for _, r in g.iterrows()
        ]
        _points(fig, name, g, "", hover, {"color": color, "symbol": symbol, "size": 9})
    if "refined_val_accuracy" in ok.columns:
        ref = ok[ok["refined_val_accuracy"].notna()]
        hover = [
            f"trial {int(r.trial)} refined ({int(r.refined_epochs)} epochs)<br>val "
            f"{r.refined_val_accuracy:.4f} test {r.refined_test_accuracy:.4f} (search-time val "
            f"{r.val_accuracy:.4f})<br>{r.refined_size_bytes / 1e6:.3f} MB, "
            f"{r.refined_latency_ms:.3f} ms"
            for _, r in ref.iterrows()
        ]
        marker = {"color": "#2ca02c", "symbol": "diamond", "size": 11}
        _points(fig, "refined", ref, "refined_", hover, marker)
    _teacher(fig, data["baseline"])
    if data["budget"]:
        fig.add_vline(x=data["budget"] / 1e6, line_dash="dash", line_color="green", row=1, col=1)
        fig.add_annotation(
            x=np.log10(data["budget"] / 1e6),
            y=1,
            yref="y domain",
            text="size budget",
            showarrow=False,
            row=1,
            col=1,
        )
    if data["max_latency_ms"]:
        fig.add_vline(x=data["max_latency_ms"], line_dash="dash", line_color="green", row=1, col=2)
    if data.get("accuracy_floor") is not None:
        for col in (1, 2):
            fig.add_hline(
                y=data["accuracy_floor"], line_dash="dot", line_color="green", row=1, col=col
            )
        fig.add_annotation(
            x=0,
            xref="x domain",
            y=data["accuracy_floor"],
            text="accuracy floor",
            showarrow=False,
            yshift=-9,
            xanchor="left",
            row=1,
            col=1,
        )
    fig.update_yaxes(title_text="validation accuracy (artifact)", row=1, col=1)
    fig.update_layout(title="Pareto front (click a point for its config and export command)")
    fig.update_layout(height=520, clickmode="event")
    return fig


def _final(data: dict, df: pd.DataFrame):
    """The front of the finally-recovered models (level 2), with a line from each one's
    search-time numbers; None when the study has no final level."""
    if "final" not in df.columns or not df["final"].any():
        return None
    fin = df[df["final"]]
    epochs = int(fin["refined_epochs"].iloc[0])
    fig = _two_panels()
    paths = {}
    for key, then, now in (
        ("size", fin["size_bytes"] / 1e6, fin["refined_size_bytes"] / 1e6),
        ("latency", fin["latency_ms"], fin["refined_latency_ms"]),
        ("accuracy", fin["val_accuracy"], fin["refined_val_accuracy"]),
    ):  # one segment per point, from its search-time numbers to its final ones
        paths[key] = [v for a, b in zip(then, now, strict=True) for v in (a, b, None)]
    _on_both(
        fig,
        "search time -> final",
        paths["size"],
        paths["latency"],
        paths["accuracy"],
        mode="lines",
        hoverinfo="skip",
        line={"color": "#bbbbbb", "dash": "dot"},
    )
    for name, g, color, symbol in (
        ("final front", fin[fin["final_front"]], "#d62728", "diamond"),
        ("final, dominated", fin[~fin["final_front"]], "#1f77b4", "diamond-open"),
    ):
        hover = [
            f"trial {int(r.trial)} final ({epochs} epochs)<br>val {r.refined_val_accuracy:.4f} "
            f"test {r.refined_test_accuracy:.4f} (search-time val {r.val_accuracy:.4f})<br>"
            f"{r.refined_size_bytes / 1e6:.3f} MB, {r.refined_latency_ms:.3f} ms<br>{r.summary}"
            for _, r in g.iterrows()
        ]
        _points(fig, name, g, "refined_", hover, {"color": color, "symbol": symbol, "size": 12})
    _teacher(fig, data["baseline"])
    fig.update_yaxes(title_text="validation accuracy (final artifact)", row=1, col=1)
    fig.update_layout(
        title=f"Final front: {len(fin)} points after the {epochs}-epoch final recovery "
        "(dotted: from their search-time numbers)",
        height=520,
        clickmode="event",
    )
    return fig


def _heatmap(data: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    k = data["front_knobs"]
    rows = [f"trial {t}" for t in k["trials"]]
    panels = [
        ("prune ratio per channel group", k["prune"], "Reds"),
        ("weight bits per layer", k["weight_bits"], "Blues_r"),
        ("low-rank ratio per layer (1 = off)", k["rank"], "Greens_r"),
    ]
    panels = [p for p in panels if p[1]["columns"]]
    if not rows or not panels:
        return None
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[p[0] for p in panels])
    for i, (title, d, scale) in enumerate(panels, start=1):
        fig.add_trace(
            go.Heatmap(
                z=d["values"],
                x=d["columns"],
                y=rows,
                colorscale=scale,
                showscale=False,
                texttemplate="%{z}",
                hovertemplate="%{y}<br>%{x}: %{z}<extra>" + title + "</extra>",
            ),
            row=i,
            col=1,
        )
    fig.update_layout(
        title="Knobs chosen by the front's models", height=260 * len(panels) + 40 * len(rows)
    )
    return fig


def _history(data: dict):
    import plotly.graph_objects as go

    h = data["hv_history"]
    if not h:
        return None
    ref = ", ".join(
        f"{o} {v:.4g}" for o, v in zip(data["objectives"], data["hv_reference"], strict=True)
    )
    fig = go.Figure(
        go.Scatter(x=[t for t, _ in h], y=[v for _, v in h], mode="lines+markers", name="HV")
    )
    fig.update_layout(
        title=f"Hypervolume of the feasible front over trials (reference point: {ref})",
        xaxis_title="trial",
        yaxis_title="hypervolume",
        height=380,
    )
    return fig


def _parcoords(data: dict, df: pd.DataFrame):
    import plotly.graph_objects as go

    ok = df[df["status"] == "ok"] if len(df) else df
    params = data["params"]
    if len(ok) < 2 or not params:
        return None
    dims = []
    names = sorted({k for p in params for k in p}, key=_natural)
    for n in names:
        vals = [p.get(n) for p in params]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            dims.append({"label": n, "values": vals})
        else:  # categorical: codes with the choices as tick labels
            cats = sorted({str(v) for v in vals})
            dims.append(
                {
                    "label": n,
                    "values": [cats.index(str(v)) for v in vals],
                    "tickvals": list(range(len(cats))),
                    "ticktext": cats,
                }
            )
    for o in data["objectives"]:
        col = OBJECTIVE_COLUMNS[o]
        dims.append({"label": col, "values": ok[col].tolist()})
    fig = go.Figure(
        go.Parcoords(
            line={"color": ok["val_accuracy"].tolist(), "colorscale": "Viridis", "showscale": True},
            dimensions=dims,
            labelangle=-20,
        )
    )
    fig.update_layout(
        title="Parameters and objectives of the measured trials (drag on an axis to filter)",
        height=520,
        margin={"l": 80, "r": 80, "t": 140},
    )
    return fig


def _importance(data: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    imp = data["importances"]
    if not imp:
        return None
    fig = make_subplots(rows=1, cols=len(imp), subplot_titles=list(imp))
    for i, (obj, vals) in enumerate(imp.items(), start=1):
        top = sorted(vals.items(), key=lambda kv: kv[1])[-12:]
        fig.add_trace(
            go.Bar(x=[v for _, v in top], y=[k for k, _ in top], orientation="h", name=obj),
            row=1,
            col=i,
        )
    fig.update_layout(
        title="Parameter importance per objective (PED-ANOVA over measured trials)",
        height=420,
        showlegend=False,
    )
    return fig


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
#details{background:#f6f6f6;border:1px solid #ddd;padding:.8em;white-space:pre-wrap;
 font-size:.85em;max-height:28em;overflow:auto}
#export-cmd{display:block;background:#222;color:#eee;padding:.5em;margin:.4em 0;
 font-family:monospace}
table{border-collapse:collapse;font-size:.82em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#eee;cursor:pointer;position:sticky;top:0}
td.text{text-align:left}
tr.front td{background:#fde8e8}
"""

_JS = """
const TRIALS = JSON.parse(document.getElementById('trial-data').textContent);
function showTrial(n) {
  const t = TRIALS[String(n)];
  if (!t) return;
  const cmd = t.export_command || '(no artifact: ' + (t.fail_reason || t.status) + ')';
  document.getElementById('export-cmd').textContent = cmd;
  const shown = Object.assign({}, t); delete shown.export_command;
  document.getElementById('details').textContent = JSON.stringify(shown, null, 1);
  document.getElementById('picked').textContent = 'trial ' + n;
}
function copyCmd() {
  const c = document.getElementById('export-cmd').textContent;
  if (navigator.clipboard) navigator.clipboard.writeText(c);
}
window.addEventListener('load', function () {
  ['final', 'scatter'].forEach(function (id) {
    const sc = document.getElementById(id);
    if (sc && sc.on) sc.on('plotly_click', function (e) {
      if (e.points.length && e.points[0].customdata !== undefined) showTrial(e.points[0].customdata);
    });
  });
  document.querySelectorAll('#trials th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      const body = document.querySelector('#trials tbody');
      const rows = Array.from(body.rows);
      const asc = th.dataset.dir !== 'asc';
      th.dataset.dir = asc ? 'asc' : 'desc';
      rows.sort(function (a, b) {
        const x = a.cells[i].dataset.v, y = b.cells[i].dataset.v;
        if (x === '' || y === '') return (x === '') - (y === '');  // blanks last either way
        const nx = Number(x), ny = Number(y);
        const c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  document.querySelectorAll('#trials tbody tr').forEach(function (tr) {
    tr.addEventListener('click', function () { showTrial(tr.dataset.trial); });
  });
});
"""


def _fmt(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if col in ("size_bytes", "size_estimate", "refined_size_bytes"):
        return f"{v / 1e6:.3f} MB"
    if col in ("speedup", "compression"):
        return f"{v:.1f}x"
    if isinstance(v, float):
        return f"{v:.4f}" if "accuracy" in col else f"{v:.3f}"
    return str(v)


def _table_html(records: list[dict[str, Any]]) -> str:
    if not records:
        return "<p>no trials yet</p>"
    cols = list(records[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in records:
        cells = []
        for c in cols:
            v = r[c]
            cls = ' class="text"' if isinstance(v, str) else ""
            dv = "" if v is None else html.escape(str(v), quote=True)
            cells.append(f'<td{cls} data-v="{dv}">{html.escape(_fmt(c, v))}</td>')
        row_cls = ' class="front"' if r.get("front") else ""
        body.append(f'<tr{row_cls} data-trial="{r["trial"]}">{"".join(cells)}</tr>')
    return (
        f'<table id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def render_html(data: dict[str, Any], df: pd.DataFrame, path: Path) -> Path:
    """The rendering step: one self-contained HTML file (atomic write), plotly.js inline."""
    final = _final(data, df)
    scatter = _scatter(data, df)
    top = (  # above the picked trial's details; what the user keeps (the final front) first
        [("scatter", "Pareto front", scatter)]
        if final is None
        else [
            ("final", "Final front (what the search ends with)", final),
            ("scatter", "Pareto front (search time)", scatter),
        ]
    )
    rest = [
        ("heatmap", "Per-layer knobs of the front", _heatmap(data)),
        ("hypervolume", "Hypervolume over trials", _history(data)),
        ("parcoords", "Parallel coordinates", _parcoords(data, df)),
        ("importance", "Parameter importance", _importance(data)),
    ]
    parts, first = [], True
    for div_id, title, fig in top + rest:
        if fig is None:
            parts.append(f"<h2>{title}</h2><p>not enough measured trials yet</p>")
            continue
        parts.append(f"<h2>{title}</h2>")
        parts[-1] += fig.to_html(
            full_html=False,
            include_plotlyjs=first,  # the one inline copy of plotly.js
            div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        first = False
    base = data["baseline"]
    teacher = (
        f"teacher (fp32 ONNX): val {base['val_accuracy']:.4f}, test {base['test_accuracy']:.4f},"
        f" {base['size_bytes'] / 1e6:.2f} MB, {base['latency_ms']:.3f} ms"
        if base
        else ""
    )
    dev = data.get("device") or {}
    device = (
        "latency measured on "
        + ", ".join(f"{k} {v}" for k, v in dev.items() if k in _DEVICE_KEYS and v not in ("", None))
        + "."
        if dev
        else ""
    )
    predictor = (data.get("latency_predictor") or {}).get("line", "")
    budget = f"size budget {data['budget']:,} bytes" if data["budget"] else "no size budget"
    if data.get("accuracy_floor") is not None:
        budget += f"; accuracy floor {data['accuracy_floor']:.4f} (val)"
    # "</" inside the JSON would end the script element: escape it
    payload = json.dumps(data["details"], default=str).replace("</", "<\\/")
    n_front = sum(1 for r in data["table"] if r.get("front"))
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>autoslim report: {html.escape(data["study"])}</title>
<style>{_CSS}</style></head><body>
<h1>autoslim study <code>{html.escape(data["study"])}</code></h1>
<p>{len(data["table"])} trials, {n_front} on the feasible front; {budget};
objectives {", ".join(data["objectives"])}. {html.escape(teacher)}</p>
<p id="device">{html.escape(device)} {html.escape(predictor + "." if predictor else "")}</p>
{"".join(parts[: len(top)])}
<h2>Picked: <span id="picked">click a point or a table row</span></h2>
<p>Export it: <code id="export-cmd">-</code>
<button onclick="copyCmd()">copy command</button></p>
<pre id="details"></pre>
{"".join(parts[len(top) :])}
<h2>All trials (click a header to sort, a row to pick)</h2>
{_table_html(data["table"])}
<script type="application/json" id="trial-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_outputs(view: Any, data: dict[str, Any] | None = None) -> dict[str, Path]:
    """trials.csv, trials.parquet and report.html in the study folder (each written atomically).

    ``data``: the view's :func:`report_data`, if the caller already has it.
    """
    run_dir = view.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    df = view.trials
    out = {}
    for name, fn in (
        ("csv", lambda p: df.to_csv(p, index=False)),
        ("parquet", lambda p: df.to_parquet(p, index=False)),
    ):
        p = run_dir / f"trials.{name}"
        tmp = run_dir / f".trials.{name}.tmp"
        fn(tmp)
        os.replace(tmp, p)
        out[name] = p
    out["html"] = render_html(data or report_data(view), df, run_dir / "report.html")
    return out


IMAGE_TRIES = 3  # kaleido renders in a fresh Chromium tab; its start can race under load


def check_folder(folder: Path, flag: str) -> None:
    """``folder`` is, or can be made as, a folder: nothing on its path is a file."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(
                    f"{flag} {folder} cannot be a folder: {p} is a file; pass a folder path"
                )
            return


def write_images(data: dict[str, Any], df: pd.DataFrame, folder: Path) -> list[Path]:
    """Static PNG + SVG of the Pareto scatter (kaleido, with the system's Chromium). Optional."""
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise UsageError(
            "static images need kaleido: pip install 'autoslim[images]' (it drives the "
            "system's Chromium: apt-get install chromium)"
        ) from e
    check_folder(folder, "--images")
    folder.mkdir(parents=True, exist_ok=True)
    fig = _scatter(data, df)
    out = []
    for ext in ("png", "svg"):
        p = folder / f"pareto.{ext}"
        for attempt in range(IMAGE_TRIES):
            try:
                fig.write_image(str(p), width=1200, height=520)
                break
            except Exception as e:  # kaleido reports a missing browser in its own types
                # on a loaded machine kaleido 1.5 can evaluate its page's script before the
                # page has defined it ("kaleido_scopes is not defined"): a fresh try renders
                if attempt + 1 == IMAGE_TRIES:
                    raise UsageError(
                        f"kaleido could not render {p.name}: {one_line(str(e))}; install "
                        "Chromium (apt-get install chromium) or set BROWSER_PATH to a "
                        "Chrome/Chromium binary"
                    ) from e
        out.append(p)
    return out
