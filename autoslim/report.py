"""Rendering: trial tables (pandas), CSV/Parquet, the self-contained HTML Pareto plot.

The data step (:func:`trials_frame`) is separate from rendering (:func:`front_table`,
:func:`pareto_html`), so each can be tested on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .pareto import pareto_mask

__all__ = ["trials_frame", "front_table", "pareto_html", "write_outputs"]

_OBJ_COL = {"accuracy": "val_accuracy", "latency": "latency_ms", "size": "size_bytes"}
_DIR = {"accuracy": "maximize", "latency": "minimize", "size": "minimize"}


def trials_frame(study: Any) -> pd.DataFrame:
    """One row per trial: state, metrics on the artifact, ratios vs the teacher, front flag."""
    base = study.user_attrs.get("baseline", {})
    spec = study.user_attrs.get("spec", {})
    objectives = spec.get("objectives", ["accuracy", "latency"])
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {
            "trial": t.number,
            "state": t.state.name,
            "status": a.get("status", "failed" if t.state.name == "FAIL" else t.state.name.lower()),
            "val_accuracy": a.get("val_accuracy", np.nan),
            "test_accuracy": a.get("test_accuracy", np.nan),
            "size_bytes": a.get("size_bytes", np.nan),
            "size_estimate": a.get("size_estimate", np.nan),
            "latency_ms": a.get("latency_ms", np.nan),
            "feasible": bool(a.get("feasible", False)),
            "summary": a.get("summary", ""),
            "fail_reason": a.get("fail_reason", ""),
            "seconds": a.get("seconds", np.nan),
            "config": a.get("config", ""),
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df.assign(
            front=pd.Series(dtype=bool),
            speedup=pd.Series(dtype=float),
            compression=pd.Series(dtype=float),
        )
    df["speedup"] = base.get("latency_ms", np.nan) / df["latency_ms"]
    df["compression"] = base.get("size_bytes", np.nan) / df["size_bytes"]
    ok = (df["status"] == "ok") & df["feasible"]
    df["front"] = False
    if ok.any():
        cols = [_OBJ_COL[o] for o in objectives]
        mask = pareto_mask(df.loc[ok, cols].to_numpy(), [_DIR[o] for o in objectives])
        df.loc[df.index[ok][mask], "front"] = True
    return df


def front_table(df: pd.DataFrame, baseline: dict | None = None) -> str:
    """The feasible Pareto front as a fixed-width text table, best accuracy first."""
    front = df[df["front"]].sort_values("val_accuracy", ascending=False)
    lines = []
    if baseline:
        lines.append(
            f"teacher (fp32 ONNX): val {baseline['val_accuracy']:.4f}  test "
            f"{baseline['test_accuracy']:.4f}  {baseline['size_bytes'] / 1e6:.2f} MB  "
            f"{baseline['latency_ms']:.3f} ms"
        )
    if front.empty:
        lines.append("no feasible trial yet: loosen the budget or run more trials")
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
    return "\n".join(lines)


def pareto_html(
    df: pd.DataFrame,
    path: Path,
    *,
    baseline: dict | None = None,
    budget: int | None = None,
    study_name: str = "",
) -> Path:
    """Self-contained HTML (plotly.js inline): accuracy vs size and vs latency."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs size", "accuracy vs latency"))
    ok = df[df["status"] == "ok"] if not df.empty else df
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
        for col, x in ((1, g["size_bytes"] / 1e6), (2, g["latency_ms"])):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=g["val_accuracy"],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    hovertext=hover,
                    hoverinfo="text",
                    marker={"color": color, "symbol": symbol, "size": 9},
                ),
                row=1,
                col=col,
            )
    if baseline:
        for col, x in ((1, baseline["size_bytes"] / 1e6), (2, baseline["latency_ms"])):
            fig.add_trace(
                go.Scatter(
                    x=[x],
                    y=[baseline["val_accuracy"]],
                    mode="markers",
                    name="teacher (fp32)",
                    legendgroup="teacher",
                    showlegend=col == 1,
                    marker={"color": "black", "symbol": "star", "size": 13},
                ),
                row=1,
                col=col,
            )
    if budget:
        fig.add_vline(
            x=budget / 1e6,
            line_dash="dash",
            line_color="green",
            row=1,
            col=1,
            annotation_text="budget",
        )
    fig.update_xaxes(title_text="artifact size (MB, log)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="latency (ms, log)", type="log", row=1, col=2)
    fig.update_yaxes(title_text="validation accuracy (artifact)", row=1, col=1)
    fig.update_layout(title=f"autoslim study {study_name}: Pareto front", height=550)
    tmp = path.with_suffix(".tmp.html")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    os.replace(tmp, path)
    return path


def write_outputs(study: Any, df: pd.DataFrame, run_dir: Path) -> dict[str, Path]:
    """trials.csv, trials.parquet and pareto.html in the study folder (written atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fn in (
        ("csv", lambda p: df.to_csv(p, index=False)),
        ("parquet", lambda p: df.to_parquet(p, index=False)),
    ):
        p = run_dir / f"trials.{name}"
        tmp = run_dir / f".trials.{name}.tmp"
        try:
            fn(tmp)
        except ImportError:
            continue  # parquet needs pyarrow
        os.replace(tmp, p)
        out[name] = p
    spec = study.user_attrs.get("spec", {})
    out["html"] = pareto_html(
        df,
        run_dir / "pareto.html",
        baseline=study.user_attrs.get("baseline"),
        budget=spec.get("budget"),
        study_name=study.study_name,
    )
    return out
