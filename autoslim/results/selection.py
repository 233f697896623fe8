"""Choosing trials: by constraints and a preference (pick), and the final level's points."""

from __future__ import annotations

import math

import pandas as pd

from ..config import CompressionConfig
from ..errors import AutoslimError, UsageError
from ..record import OK
from .table import final_numbers
from .view import StudyView

PREFERENCES = ("latency", "size", "accuracy", "metric")  # accuracy, metric: the task's metric


ACCURACY_TOLERANCE = 0.001  # 0.1 pt: a replayed artifact may differ by float noise in training


class NothingQualifies(AutoslimError):
    """No trial meets the constraints given to ``pick`` (CLI exit code 3)."""

    exit_code = 3


def _metric_floor(min_metric: float | None, min_accuracy: float | None) -> float | None:
    """The least metric value asked for, by either name (UsageError for both, or not a fraction)."""
    if min_metric is not None and min_accuracy is not None:
        raise UsageError("give --min-metric or --min-accuracy, not both (they are one constraint)")
    flag, floor = (
        ("--min-accuracy", min_accuracy) if min_metric is None else ("--min-metric", min_metric)
    )
    if floor is not None and not 0 <= floor <= 1:
        raise UsageError(f"{flag} is a fraction in [0, 1] (0.91 = 91%); got {floor}")
    return floor


def qualifying(
    view: StudyView,
    *,
    max_size: int | None = None,
    min_accuracy: float | None = None,
    min_metric: float | None = None,
    max_latency_ms: float | None = None,
    feasible_only: bool = True,
    front_only: bool = False,
    final: bool | None = None,
) -> pd.DataFrame:
    """The measured trials (feasible ones, or the front's) that meet every given constraint.

    Constraints apply to the measurements of the artifact (the task's metric on validation,
    bytes on disk, latency on the study's backend): the final ones (level 2, the
    finally-recovered models) when the study has a final level and ``final`` is not False,
    else the search-time ones. ``min_metric``: the least value of the study's metric
    (``view.task``, a fraction); ``min_accuracy`` is the same constraint by its older name
    (one of the two). With final numbers, the rows carry them in the usual columns and the
    search-time values in ``search_*`` columns. Raises :class:`NothingQualifies` (exit code 3),
    saying how many trials failed each constraint, when none does.
    """
    floor = _metric_floor(min_metric, min_accuracy)
    label = view.task["label"]
    df = view.trials
    if final is None:
        final = view.has_final
    elif final and not view.has_final:
        raise UsageError(
            f"study {view.name!r} has no final level (final_points = 0, or its search has not "
            "reached it); use the search-time numbers"
        )
    cand = df[df["status"] == OK] if len(df) else df
    if final:
        cand = final_numbers(cand[cand["final"]])
        if front_only:
            cand = cand[cand["final_front"]]
    elif front_only and len(cand):
        cand = cand[cand["front"]]
    elif feasible_only and len(cand):
        cand = cand[cand["feasible"]]
    kind = "front" if front_only else "measured feasible" if feasible_only else "measured"
    kind = f"final {kind}" if final else kind
    checks = []
    if max_size is not None:
        checks.append(("size", cand["size_bytes"] <= max_size))
    if floor is not None:  # the task's metric, kept in the val_accuracy column
        checks.append((label, cand["val_accuracy"] >= floor))
    if max_latency_ms is not None:
        checks.append(("latency", cand["latency_ms"] <= max_latency_ms))
    ok = pd.Series(True, index=cand.index)
    for _, m in checks:
        ok &= m
    chosen = cand[ok]
    if chosen.empty:
        fails = ", ".join(f"{name}: {int((~m).sum())} fail" for name, m in checks)
        raise NothingQualifies(
            f"no trial of study {view.name!r} qualifies ({len(cand)} {kind} trials; "
            f"{fails or 'none measured'}); loosen a constraint or run more trials"
        )
    return chosen


def pick(
    view: StudyView,
    *,
    max_size: int | None = None,
    min_accuracy: float | None = None,
    min_metric: float | None = None,
    max_latency_ms: float | None = None,
    prefer: str = "latency",
    feasible_only: bool = True,
    final: bool | None = None,
) -> pd.Series:
    """The measured trial that meets every constraint and is best by ``prefer`` ("metric" and
    "accuracy" both prefer the study's metric, ``view.task``).

    Constraints and ``final`` as in :func:`qualifying` (by default the final numbers when the
    study has a final level). Ties go to the higher metric, then smaller size.
    Raises :class:`NothingQualifies` (exit code 3) when none qualifies.
    """
    if prefer not in PREFERENCES:
        raise UsageError(f"--prefer must be one of {PREFERENCES}; got {prefer!r}")
    chosen = qualifying(
        view,
        max_size=max_size,
        min_accuracy=min_accuracy,
        min_metric=min_metric,
        max_latency_ms=max_latency_ms,
        feasible_only=feasible_only,
        final=final,
    )
    key = {"latency": "latency_ms", "size": "size_bytes"}.get(prefer, "val_accuracy")
    order = [key] + [k for k in ("val_accuracy", "size_bytes", "latency_ms") if k != key]
    asc = [k != "val_accuracy" for k in order]
    return chosen.sort_values(order, ascending=asc, kind="stable").iloc[0]


def final_picks(front, n: int) -> list[int]:
    """Up to ``n`` trials of a level-1 front for the final level, fastest first: all of them,
    or ``n`` chosen in this order. The ends of the front: the most accurate, the fastest and
    the smallest (the budget's own objective). Then the ends of each kind of compression on it
    (:meth:`CompressionConfig.kind`): the most accurate of each kind, then the fastest of each.
    Then, again and again, the point farthest in log latency from every point chosen.

    Why the kinds: the short recovery ranks kinds unevenly (measured on the default study:
    low-rank factorised candidates gained 1.7-2.9 pt in the final recovery and ended the most
    accurate of their latency, while a spread by latency alone left them out). Why the
    smallest and each kind's most accurate: the final recovery narrows the accuracy gaps of
    level 1 (on the default study, 2.4 pt of level-1 accuracy became 0.5 pt), so the front's
    smallest point and each kind's most accurate one are the likeliest to stay on the final
    front; a latency spread had left out the smallest point (266,724 B, finally 0.35 pt below
    the teacher) and, in another run, the most accurate final model (BENCHMARKS.md "Final
    front")."""
    f = front.sort_values(["latency_ms", "val_accuracy"], ascending=[True, False])
    trials = [int(t) for t in f["trial"]]
    if len(trials) <= n:
        return trials
    acc = [float(a) for a in f["val_accuracy"]]
    by_acc = sorted(range(len(acc)), key=lambda i: (-acc[i], i))  # ties: the faster
    if n == 1:
        return [trials[by_acc[0]]]
    size = [float(b) for b in f["size_bytes"]]
    kinds = [CompressionConfig.from_json(c).kind() for c in f["config"]]
    order = [by_acc[0], 0, min(range(len(size)), key=lambda i: (size[i], i))]
    kind_order = list(dict.fromkeys(kinds[i] for i in by_acc))  # kinds, most accurate first
    order += [next(i for i in by_acc if kinds[i] == k) for k in kind_order]
    order += [kinds.index(k) for k in kind_order]  # rows are fastest first
    chosen = list(dict.fromkeys(order))[:n]
    lat = [math.log(max(float(x), 1e-9)) for x in f["latency_ms"]]
    while len(chosen) < n:
        rest = [i for i in range(len(trials)) if i not in chosen]
        far = [min(abs(lat[i] - lat[j]) for j in chosen) for i in rest]
        chosen.append(rest[far.index(max(far))])  # ties: the faster
    return [trials[i] for i in sorted(chosen)]
