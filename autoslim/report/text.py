"""Text tables for terminals: the front, the final front, and why a front is empty."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import one_line
from ..record import OK, OVER_BUDGET, OVER_LATENCY, SCREENED
from ..results.table import task_info


def _label(task: dict | None) -> str:
    """How the text names the study's metric (``task``: its recorded task; none: accuracy)."""
    return task_info(task)["label"]


def _metric_headers(task: dict | None) -> tuple[str, str]:
    """The table's val / test metric headers: ``val_acc`` and ``test_acc`` for accuracy (as
    ever), else the label's (``val_mIoU``, ``test_mIoU``)."""
    label = _label(task)
    return ("val_acc", "test_acc") if label == "accuracy" else (f"val_{label}", f"test_{label}")


def teacher_line(baseline: dict, task: dict | None = None) -> str:
    """The teacher's numbers in one line (``val 0.9123  test ...``; other metrics named)."""
    label = _label(task)
    metric = "" if label == "accuracy" else f" {label}"
    return (
        f"teacher (fp32 ONNX): val{metric} {baseline['val_accuracy']:.4f}  test{metric} "
        f"{baseline['test_accuracy']:.4f}  {baseline['size_bytes'] / 1e6:.2f} MB  "
        f"{baseline['latency_ms']:.3f} ms"
    )


def final_table(df: pd.DataFrame, baseline: dict | None = None, task: dict | None = None) -> str:
    """The final front (level 2: the finally-recovered models, measured on their files) as a
    fixed-width text table, best metric first (``task``: the study's, by default accuracy),
    with each point's search-time value of it."""
    if "final" not in df.columns or not df["final"].any():
        return ""
    fin = df[df["final_front"]].sort_values("refined_val_accuracy", ascending=False)
    epochs = int(fin["refined_epochs"].iloc[0])
    lines = [f"final front ({epochs}-epoch recovery of {int(df['final'].sum())} level-1 points):"]
    val, test = _metric_headers(task)
    wv, wt = max(8, len(val)), max(8, len(test))
    hdr = (
        f"{'trial':>5} {val:>{wv}} {test:>{wt}} {'size_MB':>8} {'lat_ms':>7} "
        f"{'speedup':>7} {'search_val':>10}  config"
    )
    lines += [hdr, "-" * len(hdr)]
    for _, r in fin.iterrows():
        teacher = r.refined_teacher_latency_ms if "refined_teacher_latency_ms" in r else np.nan
        lines.append(
            f"{int(r.trial):>5} {r.refined_val_accuracy:>{wv}.4f} "
            f"{r.refined_test_accuracy:>{wt}.4f} "
            f"{r.refined_size_bytes / 1e6:>8.3f} {r.refined_latency_ms:>7.3f} "
            f"{teacher / r.refined_latency_ms:>6.1f}x {r.val_accuracy:>10.4f}  {r.summary}"
        )
    return "\n".join(lines)


def why_no_front(
    df: pd.DataFrame, baseline: dict | None, spec: dict | None, task: dict | None = None
) -> str:
    """Why a study has no feasible measured trial, in one line: the binding constraint, the
    best value measured against it (in the metric of ``task``, the study's; by default
    accuracy), and the flag that moves it."""
    spec = spec or {}
    label = _label(task)
    unit = "pt" if label == "accuracy" else f"pt {label}"
    if df.empty:
        return "no trial yet: the search stopped during its set-up; run `autoslim search` again"
    status = df["status"]
    ok = df[(status == OK) & (df["latency_source"] != "predicted")]
    if ok.empty:
        parts = []
        over = df[status == OVER_BUDGET]
        if len(over):
            parts.append(
                f"{len(over)} over the size budget by the estimate (smallest "
                f"{int(over['size_estimate'].min()):,} B of {int(spec.get('budget') or 0):,} B)"
            )
        for name, what in ((OVER_LATENCY, "over --max-latency by the predictor"),
                           (SCREENED, "screened and not trained (level 0)")):  # fmt: skip
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
            f"the {label} floor",
            drop > spec["max_accuracy_drop"] + 1e-12,
            f"best {best:+.1f} {unit} vs the teacher, "
            f"floor {-100 * spec['max_accuracy_drop']:.1f} pt",
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


def front_table(
    df: pd.DataFrame,
    baseline: dict | None = None,
    spec: dict | None = None,
    task: dict | None = None,
) -> str:
    """The feasible Pareto front as a fixed-width text table, best metric first (``task``: the
    study's recorded task, which names the metric; by default accuracy) or, when it is empty,
    why (:func:`why_no_front`)."""
    front = df[df["front"]].sort_values("val_accuracy", ascending=False)
    lines = []
    if baseline:
        lines.append(teacher_line(baseline, task))
    if front.empty:
        lines.append(why_no_front(df, baseline, spec, task))
        return "\n".join(lines)
    val, test = _metric_headers(task)
    wv, wt = max(8, len(val)), max(8, len(test))
    hdr = (
        f"{'trial':>5} {val:>{wv}} {test:>{wt}} {'size_MB':>8} {'lat_ms':>7} "
        f"{'speedup':>7} {'compr':>6}  config"
    )
    lines += [hdr, "-" * len(hdr)]
    for _, r in front.iterrows():
        lines.append(
            f"{int(r.trial):>5} {r.val_accuracy:>{wv}.4f} {r.test_accuracy:>{wt}.4f} "
            f"{r.size_bytes / 1e6:>8.3f} {r.latency_ms:>7.3f} {r.speedup:>6.1f}x "
            f"{r.compression:>5.1f}x  {r.summary}"
        )
        if "refined_val_accuracy" in r.index and pd.notna(r.refined_val_accuracy):
            lines.append(
                f"{'':>5} {r.refined_val_accuracy:>{wv}.4f} {r.refined_test_accuracy:>{wt}.4f} "
                f"{r.refined_size_bytes / 1e6:>8.3f} {r.refined_latency_ms:>7.3f}  "
                f"^ refined ({int(r.refined_epochs)} epochs; search-time values above)"
            )
    return "\n".join(lines)
