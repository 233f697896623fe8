"""The self-contained HTML report, the study folder's tables and static images."""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError, one_line
from ..results.export import check_folder
from ..results.table import output_frame, task_info
from .data import report_data
from .figures import (
    _final,
    _heatmap,
    _history,
    _importance,
    _parcoords,
    _scatter,
    objective_name,
)

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


_CSS = (resources.files(__package__) / "report.css").read_text()  # a package file


_JS = (resources.files(__package__) / "report.js").read_text()  # a package file


def _fmt(col: str, v: Any, metric: str = "accuracy") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if col in ("size_bytes", "size_estimate", "refined_size_bytes"):
        return f"{v / 1e6:.3f} MB"
    if col in ("speedup", "compression"):
        return f"{v:.1f}x"
    if isinstance(v, float):
        return f"{v:.4f}" if "accuracy" in col or col.endswith(f"_{metric}") else f"{v:.3f}"
    return str(v)


def _table_html(records: list[dict[str, Any]], metric: str = "accuracy") -> str:
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
            cells.append(f'<td{cls} data-v="{dv}">{html.escape(_fmt(c, v, metric))}</td>')
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
    task = task_info(data.get("task"))
    label = task["label"]
    metric = "" if label == "accuracy" else f" {label}"  # "val 0.91" for accuracy, as ever
    teacher = (
        f"teacher (fp32 ONNX): val{metric} {base['val_accuracy']:.4f}, test{metric} "
        f"{base['test_accuracy']:.4f}, {base['size_bytes'] / 1e6:.2f} MB, "
        f"{base['latency_ms']:.3f} ms"
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
        budget += f"; {label} floor {data['accuracy_floor']:.4f} (val)"
    # "</" inside the JSON would end the script element: escape it
    payload = json.dumps(data["details"], default=str).replace("</", "<\\/")
    n_front = sum(1 for r in data["table"] if r.get("front"))
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>autoslim report: {html.escape(data["study"])}</title>
<style>{_CSS}</style></head><body>
<h1>autoslim study <code>{html.escape(data["study"])}</code></h1>
<p>{len(data["table"])} trials, {n_front} on the feasible front; {budget};
objectives {html.escape(", ".join(objective_name(o, label) for o in data["objectives"]))}.
{html.escape(teacher)}</p>
<p id="device">{html.escape(device)} {html.escape(predictor + "." if predictor else "")}</p>
{"".join(parts[: len(top)])}
<h2>Picked: <span id="picked">click a point or a table row</span></h2>
<p>Export it: <code id="export-cmd">-</code>
<button onclick="copyCmd()">copy command</button></p>
<pre id="details"></pre>
{"".join(parts[len(top) :])}
<h2>All trials (click a header to sort, a row to pick)</h2>
{_table_html(data["table"], task["metric"])}
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

    ``data``: the view's :func:`report_data`, if the caller already has it. The tables name
    the metric columns by the study's metric (``val_miou``; ``val_accuracy`` for accuracy).
    """
    run_dir = view.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    df = view.trials
    table = output_frame(df, getattr(view, "task", None))
    out = {}
    for name, fn in (
        ("csv", lambda p: table.to_csv(p, index=False)),
        ("parquet", lambda p: table.to_parquet(p, index=False)),
    ):
        p = run_dir / f"trials.{name}"
        tmp = run_dir / f".trials.{name}.tmp"
        fn(tmp)
        os.replace(tmp, p)
        out[name] = p
    out["html"] = render_html(data or report_data(view), df, run_dir / "report.html")
    return out


IMAGE_TRIES = 3  # kaleido renders in a fresh Chromium tab; its start can race under load


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
