"""Pure computation on trial results: Pareto masks and hypervolume. No I/O, no Optuna."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "pareto_mask",
    "nondominated_ranks",
    "crowding_distances",
    "promoted",
    "hypervolume",
    "OBJECTIVES",
    "OBJECTIVE_COLUMNS",
]

# what a study can optimise: its direction, and the trial-table column that holds it
OBJECTIVES = {"accuracy": "maximize", "latency": "minimize", "size": "minimize"}
OBJECTIVE_COLUMNS = {"accuracy": "val_accuracy", "latency": "latency_ms", "size": "size_bytes"}


def _as_min(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float) * sign


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n x k) under ``directions``."""
    v = _as_min(values, directions)
    n = len(v)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        if not np.all(np.isfinite(v[i])):
            mask[i] = False
            continue
        dominated = np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1)
        if dominated.any():
            mask[i] = False
    return mask


def nondominated_ranks(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front of the rest, and so on."""
    v = np.asarray(values, dtype=float).reshape(len(values), -1)
    ranks = np.full(len(v), -1)
    left = np.arange(len(v))
    r = 0
    while len(left):
        m = pareto_mask(v[left], directions)
        if not m.any():  # rows with non-finite values: last
            ranks[left] = r
            break
        ranks[left[m]] = r
        left = left[~m]
        r += 1
    return ranks


def crowding_distances(values: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row within ``values`` (one front): the sum over the
    objectives of the range-normalised gap between its two neighbours; the ends are infinite."""
    v = np.asarray(values, dtype=float).reshape(len(values), -1)
    d = np.zeros(len(v))
    if len(v) <= 2:
        return np.full(len(v), np.inf)
    for k in range(v.shape[1]):
        order = np.argsort(v[:, k], kind="stable")
        col = v[order, k]
        span = col[-1] - col[0]
        d[order[[0, -1]]] = np.inf
        if span > 0 and np.isfinite(span):
            d[order[1:-1]] += (col[2:] - col[:-2]) / span
    return d


def promoted(values: np.ndarray, directions: Sequence[str], share: float) -> bool:
    """Successive-halving promotion, NSGA-II style: whether the last row of ``values`` (a
    candidate, after every earlier one) is among the best ``share`` of the rows, ranked by
    non-dominated front and, within the front that crosses the share, by crowding distance
    (spread-out points first; ties promoted)."""
    ranks = nondominated_ranks(values, directions)
    want = max(1, int(np.ceil(share * len(ranks))))
    counts = np.bincount(ranks)
    cutoff = int(np.searchsorted(np.cumsum(counts), want))  # the rank that reaches the share
    if ranks[-1] != cutoff:
        return bool(ranks[-1] < cutoff)
    room = want - int(counts[:cutoff].sum())  # places left in the crossing front
    members = np.flatnonzero(ranks == cutoff)
    crowd = crowding_distances(np.asarray(values, dtype=float)[members])
    kth = np.sort(crowd)[::-1][room - 1]
    return bool(crowd[-1] >= kth)  # members are in row order: the candidate is the last


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``values`` w.r.t. ``reference`` (exact, by slicing; k <= 3)."""
    v = _as_min(values, directions)
    ref = _as_min(np.asarray([reference], dtype=float), directions)[0]
    v = v[np.all(v < ref, axis=1)]
    if len(v) == 0:
        return 0.0
    v = v[pareto_mask(v, ["minimize"] * v.shape[1])]
    if v.shape[1] == 1:
        return float(ref[0] - v[:, 0].min())
    if v.shape[1] == 2:
        v = v[np.argsort(v[:, 0])]
        hv, prev_y = 0.0, ref[1]
        for x, y in v:
            if y < prev_y:
                hv += (ref[0] - x) * (prev_y - y)
                prev_y = y
        return float(hv)
    # k = 3: sweep over the last axis, 2-D hypervolume of each slab
    order = np.argsort(v[:, 2])
    v = v[order]
    hv = 0.0
    for i in range(len(v)):
        z_next = v[i + 1, 2] if i + 1 < len(v) else ref[2]
        hv += hypervolume(v[: i + 1, :2], ["minimize"] * 2, ref[:2]) * (z_next - v[i, 2])
    return float(hv)
