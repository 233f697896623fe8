"""Text tables for terminals: the front, the final front, and why a front is empty."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import one_line
from ..record import OK, OVER_BUDGET, OVER_LATENCY, SCREENED


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
