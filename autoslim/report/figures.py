"""The report's plotly figures, one builder each."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..pareto import OBJECTIVE_COLUMNS
from ..record import OK
from ..results.table import metric_columns, task_info
from .data import _natural


def _label(data: dict) -> str:
    """How the figures name the study's metric ("accuracy", "mIoU": ``data["task"]``)."""
    return task_info(data.get("task"))["label"]


def _val(label: str) -> str:
    """The hover texts' word for a validation value: "val" (accuracy), "val mIoU"."""
    return "val" if label == "accuracy" else f"val {label}"


def _test(label: str) -> str:
    return "test" if label == "accuracy" else f"test {label}"


def objective_name(objective: str, label: str) -> str:
    """How the report names an objective: the metric's label for "accuracy"."""
    return label if objective == "accuracy" else objective


def _two_panels(label: str = "accuracy"):
    """A figure of two panels side by side: the metric vs size (MB, log), vs latency (ms, log)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{label} vs size", f"{label} vs latency"))
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


def _teacher(fig, base: dict | None, label: str = "accuracy") -> None:
    """The fp32 teacher as a star on both panels."""
    if base:
        _on_both(
            fig,
            "teacher (fp32)",
            [base["size_bytes"] / 1e6],
            [base["latency_ms"]],
            [base["val_accuracy"]],
            mode="markers",
            hovertext=f"teacher fp32: {_val(label)} {base['val_accuracy']:.4f}, "
            f"{base['size_bytes'] / 1e6:.2f} MB, {base['latency_ms']:.3f} ms",
            hoverinfo="text",
            marker={"color": "black", "symbol": "star", "size": 13},
        )


def _scatter(data: dict, df: pd.DataFrame):
    label = _label(data)
    val, test = _val(label), _test(label)
    fig = _two_panels(label)
    ok = df[df["status"] == OK] if len(df) else df
    groups = [
        ("front", ok[ok["front"]], "#d62728", "circle"),
        ("dominated", ok[~ok["front"] & ok["feasible"]], "#1f77b4", "circle-open"),
        ("infeasible", ok[~ok["feasible"]], "#999999", "x"),
    ]
    for name, g, color, symbol in groups:
        hover = [
            f"trial {int(r.trial)}<br>{val} {r.val_accuracy:.4f} {test} {r.test_accuracy:.4f}"
            f"<br>{r.size_bytes / 1e6:.3f} MB, {r.latency_ms:.3f} ms<br>"
            f"{r.speedup:.1f}x faster, {r.compression:.1f}x smaller<br>{r.summary}"
            for _, r in g.iterrows()
        ]
        _points(fig, name, g, "", hover, {"color": color, "symbol": symbol, "size": 9})
    if "refined_val_accuracy" in ok.columns:
        ref = ok[ok["refined_val_accuracy"].notna()]
        hover = [
            f"trial {int(r.trial)} refined ({int(r.refined_epochs)} epochs)<br>{val} "
            f"{r.refined_val_accuracy:.4f} {test} {r.refined_test_accuracy:.4f} (search-time "
            f"{val} {r.val_accuracy:.4f})<br>{r.refined_size_bytes / 1e6:.3f} MB, "
            f"{r.refined_latency_ms:.3f} ms"
            for _, r in ref.iterrows()
        ]
        marker = {"color": "#2ca02c", "symbol": "diamond", "size": 11}
        _points(fig, "refined", ref, "refined_", hover, marker)
    _teacher(fig, data["baseline"], label)
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
            text=f"{label} floor",
            showarrow=False,
            yshift=-9,
            xanchor="left",
            row=1,
            col=1,
        )
    fig.update_yaxes(title_text=f"validation {label} (artifact)", row=1, col=1)
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
    label = _label(data)
    val, test = _val(label), _test(label)
    fig = _two_panels(label)
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
            f"trial {int(r.trial)} final ({epochs} epochs)<br>{val} "
            f"{r.refined_val_accuracy:.4f} {test} {r.refined_test_accuracy:.4f} (search-time "
            f"{val} {r.val_accuracy:.4f})<br>"
            f"{r.refined_size_bytes / 1e6:.3f} MB, {r.refined_latency_ms:.3f} ms<br>{r.summary}"
            for _, r in g.iterrows()
        ]
        _points(fig, name, g, "refined_", hover, {"color": color, "symbol": symbol, "size": 12})
    _teacher(fig, data["baseline"], label)
    fig.update_yaxes(title_text=f"validation {label} (final artifact)", row=1, col=1)
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
    label = _label(data)
    ref = ", ".join(
        f"{objective_name(o, label)} {v:.4g}"
        for o, v in zip(data["objectives"], data["hv_reference"], strict=True)
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

    ok = df[df["status"] == OK] if len(df) else df
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
    names = metric_columns(OBJECTIVE_COLUMNS.values(), data.get("task"))  # val_miou, ...
    for o in data["objectives"]:
        col = OBJECTIVE_COLUMNS[o]
        dims.append({"label": names.get(col, col), "values": ok[col].tolist()})
    bar = {"title": {"text": names.get("val_accuracy", "val_accuracy")}}
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": ok["val_accuracy"].tolist(),
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": bar,
            },
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
    label = _label(data)
    titles = [objective_name(o, label) for o in imp]
    fig = make_subplots(rows=1, cols=len(imp), subplot_titles=titles)
    for i, (obj, vals) in enumerate(imp.items(), start=1):
        top = sorted(vals.items(), key=lambda kv: kv[1])[-12:]
        fig.add_trace(
            go.Bar(
                x=[v for _, v in top],
                y=[k for k, _ in top],
                orientation="h",
                name=objective_name(obj, label),
            ),
            row=1,
            col=i,
        )
    fig.update_layout(
        title="Parameter importance per objective (PED-ANOVA over measured trials)",
        height=420,
        showlegend=False,
    )
    return fig
