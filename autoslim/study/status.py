"""Where a study stands: trials by state against the budget in force, workers, throughput; the search's closing summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from ..record import OK, OVER_BUDGET, OVER_LATENCY, SCREENED, WORKER_PREFIX
from .storage import _locate, _open, redact
from .workers import FREE_REJECTS, _counted, _counts


def trial_summary(study: optuna.Study, budget: int) -> str:
    """One line on what the search did: trials trained and measured, screened, rejected
    before training and why, failed, interrupted and queued again."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    status = [t.user_attrs.get("status") for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    parts = [
        f"{status.count(OK)} trained and measured",
        f"{status.count(SCREENED)} screened and not trained (level 0)",
        f"{status.count(OVER_BUDGET)} rejected before training (size estimate over the budget)",
        f"{status.count(OVER_LATENCY)} rejected before training (predicted over --max-latency)",
        f"{sum(not t.user_attrs.get('killed') for t in failed)} failed as candidates",
        f"{sum(bool(t.user_attrs.get('killed')) for t in failed)} stopped or killed and queued "
        "again",
    ]
    counted = len(_counted(trials, budget))
    shown = [p for p in parts if not p.startswith("0 ")] or ["none run"]
    return (
        f"trials: {counted} of {budget} counted; "
        + ", ".join(shown)
        + f" (up to {FREE_REJECTS} rejections per trial are not counted)"
    )


def study_status(name_or_dir: str | Path, *, storage: str | None = None) -> dict[str, Any]:
    """Where a (possibly running, many-worker) study stands, as plain data: trials by state,
    the global budget and how much of it is used, each worker seen (its seed, threads, trials
    and when it was last seen starting or finishing one), throughput over the last ten counted
    trials and the time left at that rate."""
    _, url, name = _locate(name_or_dir, storage)
    study = _open(url, name)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    # the budget in force: the last search's --trials (a resume may raise it), else the first
    budget = int(
        study.user_attrs.get("trials") or study.user_attrs.get("spec", {}).get("trials", 0)
    )
    counted = _counted(trials, budget)
    workers = {}
    for key, info in study.user_attrs.items():
        if key.startswith(WORKER_PREFIX):
            host, pid = key.split(":")[1:3]
            mine = [t for t in trials if str(t.user_attrs.get("owner", {}).get("pid")) == pid]
            mine = [t for t in mine if t.user_attrs["owner"].get("host") == host]
            seen = [d for t in mine for d in (t.datetime_start, t.datetime_complete) if d]
            workers[f"{host}:{pid}"] = {
                **info,
                "trials": len(mine),
                "running": sum(t.state == optuna.trial.TrialState.RUNNING for t in mine),
                "last_seen": max(seen).isoformat(timespec="seconds") if seen else None,
            }
    finished = sorted(t.datetime_complete for t in counted if t.datetime_complete)[-10:]
    per_hour = None
    if len(finished) >= 2 and finished[-1] > finished[0]:
        per_hour = (len(finished) - 1) / ((finished[-1] - finished[0]).total_seconds() / 3600)
    left = max(0, budget - len(counted))
    return {
        "study": study.study_name,
        "storage": redact(url),
        "budget": budget,
        "counted": len(counted),
        # rejected before training (size estimate, latency predictor) and not counted
        "free_rejects": sum(1 for t in trials if _counts(t)) - len(counted),
        "states": states,
        "killed": sum(1 for t in trials if t.user_attrs.get("killed")),
        "workers": workers,
        "trials_per_hour": per_hour,
        "eta_minutes": (60 * left / per_hour) if per_hour and left else (0.0 if not left else None),
    }
