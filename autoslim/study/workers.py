"""Workers of one study: the trial budget, process liveness, healing the trials of dead workers, threads and seeds."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import optuna

from ..record import OVER_BUDGET, OVER_LATENCY
from .spec import StudySpec

MAX_RETRIES = 2  # a trial whose worker died is queued again at most this often


FREE_REJECTS = 4  # per trial of the budget: candidates rejected before training, not counted


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial can use one of the study's ``trials``: completed, or failed as a
    candidate (a compression or export that cannot work). A trial whose worker died does not:
    it is queued again; nor does a surplus one (see :func:`_surplus`). Of those, the first
    rejected ones are free (see :func:`_counted`)."""
    if t.state == optuna.trial.TrialState.COMPLETE:
        return True
    return (
        t.state == optuna.trial.TrialState.FAIL
        and bool(t.user_attrs.get("fail_reason"))
        and not t.user_attrs.get("killed")
    )


def _rejected(t: optuna.trial.FrozenTrial) -> bool:
    """A candidate turned away before any training: the size estimate puts it over the budget
    or the calibrated latency predictor over ``max_latency_ms`` (a fraction of a second)."""
    return t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("status") in (
        OVER_BUDGET,
        OVER_LATENCY,
    )


def _counted(trials: list[optuna.trial.FrozenTrial], budget: int) -> list[optuna.trial.FrozenTrial]:
    """The trials that use up the budget of ``budget`` trials, by trial number: every
    screened, trained or failed candidate, and the rejected ones past the first
    ``FREE_REJECTS * budget``. A rejection costs a fraction of a second, so a sampler that
    proposes many over-budget candidates (14 of TPE's first 30 on the default study) still
    trains its share; the bound ends a study whose space hardly fits its budget. Every worker
    reads the same trials, so all agree on the count."""
    free, out = FREE_REJECTS * budget, []
    for t in sorted(trials, key=lambda t: t.number):
        if not _counts(t):
            continue
        if free > 0 and _rejected(t):
            free -= 1
            continue
        out.append(t)
    return out


def _done(study: optuna.Study, budget: int) -> int:
    return len(_counted(study.get_trials(deepcopy=False), budget))


def _surplus(trial: optuna.Trial, budget: int) -> bool:
    """Whether the trials numbered before ``trial`` (counted, running or queued) already fill
    the global budget. Trial numbers are handed out atomically by the storage, so workers on
    any number of machines agree on which trials are the first ``budget``. A running or queued
    trial counts ahead (it may yet be a free rejection: then this worker stops a trial early
    and the others, whose loop runs until the budget is counted, finish it)."""
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    before = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    ahead = len(_counted(before, budget)) + sum(t.state in live for t in before)
    return ahead >= budget


def _start_token(pid: int) -> str | None:
    """When process ``pid`` started (Linux /proc), so a reused pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _owner() -> dict[str, Any]:
    """This process, as recorded on each trial it runs."""
    return {"host": platform.node(), "pid": os.getpid(), "start": _start_token(os.getpid())}


def _alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        return owner.get("start") is not None and _start_token(pid) == owner.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _creator_died(attrs: dict[str, Any]) -> bool:
    """Whether the study's creator (``setup_owner``) was a process of this machine that is
    gone (a creator on another machine cannot be seen from here: False)."""
    owner = attrs.get("setup_owner")
    return bool(owner) and owner.get("host") == platform.node() and not _alive(owner)


def heal_dead_trials(study: optuna.Study, run_dir: Path) -> list[int]:
    """Fail the trials that a dead process of this machine left RUNNING, queue each again
    (up to ``MAX_RETRIES`` times) and remove their temp files.

    A ``kill -9`` or a power cut leaves the trial RUNNING. Each trial records its owner (host,
    pid, process start time); a RUNNING trial whose owner is gone becomes FAIL with that reason
    (``killed``: it does not use up a trial of the budget) and the same parameters are queued
    for the next worker; its folder loses the exporter's ``.export-*`` temp folders. Trials of
    other machines are left to the storage's heartbeat (:func:`storage_of`), which does the
    same after the grace period. Returns the trial numbers healed.
    """
    host, healed = platform.node(), []
    storage = study._storage  # Optuna has no public setter of another process's trial state
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if not owner or owner.get("host") != host or _alive(owner):
            continue
        reason = (
            f"its process (pid {owner.get('pid')} on {host}) died before the trial finished "
            "(killed or crashed); marked failed by the next run"
        )
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_user_attr(t._trial_id, "killed", True)
            # atomic in the storage: of two workers healing one trial, one wins, one retries
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker healed it first (and queued it again)
        for tmp in (run_dir / "trials" / f"{t.number:05d}").glob(".export-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        retries = int(t.user_attrs.get("retries", 0))
        if retries < MAX_RETRIES and t.params:  # the same candidate, run again by any worker
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.WAITING,
                    params=t.params,
                    distributions=t.distributions,
                    user_attrs={"retry_of": t.number, "retries": retries + 1},
                )
            )
        healed.append(t.number)
    return healed


def worker_threads(spec: StudySpec) -> int:
    """Torch threads of one worker: ``spec.threads``, else the cores this process may run on
    divided among the workers of this machine (so K workers never oversubscribe the cores),
    and never more than torch was already told (``OMP_NUM_THREADS``, ``set_num_threads``)."""
    import torch

    if spec.threads:
        return spec.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // max(1, spec.workers)))


def _worker_seed(spec: StudySpec) -> int:
    """A joining worker's sampler seed: its own (from host, pid and process start), so two
    workers never propose the same parameters in lockstep. Recorded on the study and on each
    trial (``owner.seed``), outside the fingerprint."""
    key = f"{spec.seed}|{platform.node()}|{os.getpid()}|{_start_token(os.getpid())}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
