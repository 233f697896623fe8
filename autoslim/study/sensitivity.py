"""Per-stage sensitivity by the BN proxy and the greedy seeds it gives the search."""

from __future__ import annotations

from typing import Any

from .task import Task, estimate, screen, shape


def _step_dims(task: Task, low_rank: bool) -> list[Any]:
    """The dimensions a greedy step moves: pruning ratios, and low-rank choices if asked."""
    return [
        d
        for d in task.space.dims
        if (d.kind == "prune" and d.knob.high) or (low_rank and d.kind == "rank" and _ranks(d.knob))
    ]


def can_factorise(task: Task) -> bool:
    """Whether a greedy step may factorise a stage in this task's space (a low-rank choice
    among listed ratios), i.e. whether ``low_rank=True`` can choose differently."""
    return len(_step_dims(task, True)) > len(_step_dims(task, False))


def _ranks(knob: Any) -> list[float]:
    """A low-rank knob's ratios, mildest (largest) first; continuous knobs are not stepped."""
    return sorted((c for c in knob.choices or () if c != "off"), reverse=True)


def _step(knob: Any) -> float:
    return max(knob.step or 0.0, 0.1)  # coarse: a seed, refined by the sampler


def _next(d: Any, value: Any) -> Any:
    """The value one greedy step further along dimension ``d``, or None at its end."""
    if d.kind == "rank":
        ranks = _ranks(d.knob)
        i = 0 if value == "off" else ranks.index(value) + 1
        return ranks[i] if i < len(ranks) else None
    v = round(value + _step(d.knob), 10)
    return v if v <= d.knob.high + 1e-9 else None


def _linear(d: Any, probe: float) -> float:
    """The share of the probe's accuracy drop one step of ``d`` costs (linear model)."""
    return 1.0 if d.kind == "rank" else _step(d.knob) / probe


def _score(task: Task, params: dict[str, Any]) -> tuple[float, int]:
    config = task.space.to_config(params)
    return screen(task, config), estimate(task, config)


def _cost(task: Task, params: dict[str, Any]) -> tuple[int, float]:
    """Size estimate and MACs (millions) of ``params`` (memoised by :func:`shape`)."""
    size, feats = shape(task, task.space.to_config(params))
    return size, float(feats.get("mmacs", 0.0))


def stage_sensitivity(
    task: Task, *, probe: float = 0.5, low_rank: bool = False
) -> dict[str, dict[str, float]]:
    """Per prune dimension: the proxy accuracy lost and the bytes saved when only it is pruned
    at ``probe`` (others unpruned, int8 everywhere); with ``low_rank``, per low-rank
    dimension too, when only it is factorised at its mildest ratio."""
    base = task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8)
    acc0, size0 = _score(task, base)
    out = {}
    for d in _step_dims(task, low_rank):
        v = _ranks(d.knob)[0] if d.kind == "rank" else min(probe, d.knob.high)
        acc, size = _score(task, {**base, d.name: v})
        out[d.name] = {"drop": max(acc0 - acc, 0.0), "saved": float(size0 - size)}
    return out


def greedy_params(
    task: Task,
    budget: int,
    *,
    rescreen: bool = False,
    probe: float = 0.5,
    low_rank: bool = False,
    sensitivity: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any] | None:
    """Parameters (int8, per-stage pruning, and low-rank choices with ``low_rank``) that fit
    ``budget`` by the size estimate, chosen by proxy sensitivity as above; None if even the
    most compressed model does not fit. ``sensitivity``: :func:`stage_sensitivity` measured
    already (at ``probe``, with ``low_rank`` if asked here), so two seeds share its screens."""
    params = task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8)
    dims = _step_dims(task, low_rank)
    size, macs = _cost(task, params)
    size0, macs0 = max(size, 1), max(macs, 1e-9)
    by_macs = "latency" in task.spec.objectives and macs > 0
    sens = sensitivity
    if sens is None and not rescreen:
        sens = stage_sensitivity(task, probe=probe, low_rank=low_rank)
    acc = _score(task, params)[0] if rescreen else 0.0
    while size > budget:
        best = None
        for d in dims:
            v = _next(d, params[d.name])
            if v is None:
                continue
            trial = {**params, d.name: v}
            new_size, new_macs = _cost(task, trial)
            if new_size >= size:
                continue
            saved = (size - new_size) / size0 + ((macs - new_macs) / macs0 if by_macs else 0.0)
            if rescreen:
                new_acc = screen(task, task.space.to_config(trial))
                cost = max(acc - new_acc, 0.0) / saved
            else:  # linear in the ratio, from the probe
                cost = sens[d.name]["drop"] * _linear(d, probe) / saved
            key = (cost, -saved)  # insensitive stages (cost 0): the most saved first
            if best is None or key < best[0]:
                best = (key, trial, new_size, new_macs, new_acc if rescreen else 0.0)
        if best is None:
            return None
        _, params, size, macs, acc = best
    return params
