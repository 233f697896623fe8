"""The loop: set-up (baseline, seeds), worker processes, trials until the global budget is counted."""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
from typing import Any

import optuna
from tqdm.auto import tqdm

from ..errors import Terminated, UsageError
from ..record import OK, WORKER_PREFIX
from ..units import format_size
from .sensitivity import can_factorise, greedy_params, stage_sensitivity
from .spec import StudySpec
from .storage import _open_or_create, _wait_for, preflight, redact, storage_of
from .store import open_store
from .task import (
    CandidateFailed,
    Task,
    adopt_legacy_space,
    build_task,
    estimate,
    measure_baseline,
    time_teacher,
)
from .trial import _objective
from .workers import (
    _creator_died,
    _done,
    _owner,
    _waiting,
    _worker_seed,
    heal_dead_trials,
    worker_threads,
)

BASELINES = [(0.0, 8, 8), (0.3, 8, 8), (0.5, 8, 8)]  # (prune, weight bits, act bits)


FITTING_LADDER = 3  # fitting uniform baselines enqueued when the budget is set


SETUP_WAIT_S = 1800  # a joining worker waits this long for the creator's baseline


def _sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = spec.seed if seed is None else seed
    if spec.sampler == "tpe":
        # multivariate: per-group prune ratios and bits interact (they share one size budget);
        # constant_liar (Optuna 5's default): running trials of other workers count as bad
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(4, min(10, spec.trials // 3)), multivariate=True
        )
    if spec.sampler == "nsga2":
        # generations are no barrier across workers: a population of >= 4 per worker
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4 * spec.workers, min(50, spec.trials // 4))
        )
    return optuna.samplers.RandomSampler(seed=seed)


def smallest_estimate(task: Task, *, stop_at: int = 0) -> int:
    """The estimated bytes of the smallest candidate of the space: every ratio at its largest,
    every bit width at its lowest, then each rank dimension set, one at a time, to the choice
    that shrinks the file most (factorising a thin layer can grow it). Stops once at or below
    ``stop_at``."""
    space = task.space

    def size(params: dict[str, Any]) -> int:
        return estimate(task, space.to_config(params))

    params = space.smallest_params()
    best = size(params)
    for d in space.dims:
        if best <= stop_at:
            break
        if d.kind != "rank" or d.knob.choices is None:
            continue
        for choice in d.knob.choices:
            trial = {**params, d.name: choice}
            got = size(trial)
            if got < best:
                best, params = got, trial
    return best


def check_reachable(task: Task) -> None:
    """Refuse, before the study is made, a size budget that no candidate of the space can
    meet: the size estimate of the space's smallest candidate (every ratio at its largest,
    every bit width at its lowest, ranks lowest or off) is over it."""
    budget = task.spec.budget
    if budget is None:
        return
    smallest = smallest_estimate(task, stop_at=budget)
    if smallest > budget:
        raise UsageError(
            f"the budget {format_size(budget)} ({budget:,} bytes) cannot be met: the smallest "
            f"file the space {task.spec.space!r} makes of {task.spec.model} is about "
            f"{format_size(smallest)} ({smallest:,} bytes, estimated: every pruning ratio at "
            "its largest, every bit width at its lowest); raise --budget to at least that, or "
            "use a space that prunes more or offers lower bit widths (--space)"
        )


def _baselines(task: Task) -> list[tuple[float, int, int]]:
    """The uniform int8 points every study starts from, as (prune, weight bits, act bits).

    Without a budget: :data:`BASELINES`. With one, the baselines the analytic estimate puts
    over budget are dropped (they would not even be trained) and a ladder of fitting uniform
    ratios takes their place: the by-hand pipeline's point (the smallest uniform int8 ratio
    whose estimate fits) and the next steps up, so that a tight budget (a few percent of the
    teacher, where most proposals are over) still starts with ``FITTING_LADDER`` trained points.
    """
    budget = task.spec.budget
    if budget is None:
        return list(BASELINES)

    @functools.cache  # 0.5 is both a baseline and the ladder's first step
    def fits(r: float) -> bool:
        params = task.space.uniform_params(prune=r, weight_bits=8, act_bits=8)
        return estimate(task, task.space.to_config(params)) <= budget

    kept = [b for b in BASELINES if fits(b[0])]
    ratios = [round(i * 0.05, 2) for i in range(10, 20)]  # 0.50 .. 0.95
    first = next((i for i, r in enumerate(ratios) if fits(r)), None)
    if first is None:
        return kept
    have = {b[0] for b in kept}
    ladder = []  # the by-hand point always; then steps up (a larger ratio fits too)
    for j, r in enumerate(ratios[first:]):
        if j and len(kept) + len(ladder) >= FITTING_LADDER:
            break
        if r not in have:
            ladder.append((r, 8, 8))
    return kept + ladder


def _wait_for_setup(study: optuna.Study, spec: StudySpec, say: Any) -> dict[str, Any] | None:
    """The baseline once the study's creator has stored it. None at once when the creator
    (recorded as ``setup_owner``) was a process of this machine that is gone: it died during
    its set-up, and this process takes the set-up over."""
    owner = study.user_attrs.get("setup_owner")
    if owner:
        say(
            f"setup: waiting for the study's creator ({owner.get('host')}:{owner.get('pid')}) "
            f"to finish its set-up (at most {SETUP_WAIT_S // 60} min)"
        )
    baseline = _wait_for(study, "baseline", SETUP_WAIT_S)
    if baseline is None and not _creator_died(study._storage.get_study_user_attrs(study._study_id)):
        raise UsageError(
            f"study {spec.name!r} has no baseline after {SETUP_WAIT_S} s: the process that "
            "created it did not finish its set-up (killed on another machine?); delete the "
            "study or run one worker alone first"
        )
    return baseline


def _setup(study: optuna.Study, task: Task, creator: bool, *, log: Any = None) -> None:
    """The study's baseline and enqueued baselines: made once, by the process that created
    the study; every other worker waits for the baseline and times the teacher itself. A
    worker that finds the creator of this machine dead before its baseline takes over."""
    spec = task.spec
    say = log or (lambda *a: None)
    stored = study.user_attrs.get("baseline")
    if not creator and not stored:
        stored = _wait_for_setup(study, spec, say)
        if stored is None:
            say("setup: the study's creator died during its set-up; this process takes it over")
            creator = True
    if creator:  # before the baseline: a joiner that sees the baseline sees the store
        study.set_user_attr("setup_owner", _owner())
        task.store = open_store(study, location=spec.artifacts, run_dir=spec.run_dir, create=True)
    if not creator:  # a study stored before autoslim kept a store gets one now
        task.store = open_store(
            study, location=spec.artifacts, run_dir=spec.run_dir, create=False
        ) or open_store(study, location=spec.artifacts, run_dir=spec.run_dir, create=True)
    if stored:  # a resume or a joining worker: the stored baseline stays; the timing is redone
        say("setup: timing the teacher's fp32 ONNX file on the study's backend")
        task.baseline = dict(stored)
        time_teacher(task, spec.run_dir)
    else:
        say("setup: the teacher's fp32 ONNX file: accuracy, size and latency (the baseline)")
        study.set_user_attr("baseline", measure_baseline(task, spec.run_dir))
    study.set_user_attr(
        "teacher", {k: v for k, v in task.teacher.meta.items() if isinstance(v, (str, int, float))}
    )
    # what the accuracy columns hold (name, metric key, label): read by tables and plots
    study.set_user_attr("task", task.data.task.describe())
    device = {k: v for k, v in task.teacher_timing.items() if k != "latency_ms"}
    study.set_user_attr("device", {"backend": spec.backend, **device})
    if creator and not study.get_trials(deepcopy=False):
        # no more baselines than trials: enqueued ones never run would show as "waiting"
        seeds = [
            (task.space.uniform_params(prune=prune, weight_bits=wb, act_bits=ab), "uniform")
            for prune, wb, ab in _baselines(task)
        ]
        if spec.screen_images and spec.budget is not None:  # per-stage widths by sensitivity
            factorise = can_factorise(task)
            say("setup: the sensitivity of each stage (BN-proxy screens) for the seed trials")
            sens = stage_sensitivity(task, low_rank=factorise)  # screened once for both seeds
            seed_params = greedy_params(task, spec.budget, sensitivity=sens)
            if seed_params is not None:
                seeds.append((seed_params, "sensitivity"))
            if factorise:  # and one that may factorise
                low_rank = greedy_params(task, spec.budget, low_rank=True, sensitivity=sens)
                if low_rank is not None and low_rank != seed_params:
                    seeds.append((low_rank, "sensitivity-low-rank"))
        for params, kind in seeds[: spec.trials]:
            study.enqueue_trial(params, user_attrs={"enqueued_as": kind}, skip_if_exists=True)


def _spawn_workers(spec: StudySpec, threads: int) -> list:
    """``spec.workers - 1`` more worker processes on this machine, joining this study."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked torch/ORT thread pools
    child = {**spec.to_dict(), "workers": 1, "threads": threads}
    procs = []
    for i in range(spec.workers - 1):
        p = ctx.Process(target=_worker_main, args=(child,), name=f"autoslim-worker-{i + 1}")
        p.start()
        procs.append(p)
    return procs


def _worker_main(spec_dict: dict[str, Any]) -> None:
    """Entry point of a worker process started by ``--workers K``."""
    run_trials(StudySpec.from_dict(spec_dict), progress=False, outputs=False)


def run_trials(
    spec: StudySpec, *, progress: bool = True, outputs: bool = True
) -> tuple[optuna.Study, Task]:
    """Run (or resume, or join) the study described by ``spec`` until it holds ``spec.trials``
    counted trials in all, whichever processes run them; return the study and its task.
    ``outputs``: this is the process a user started (it says each phase in one line).

    Many workers: start this on several machines with one ``storage`` (PostgreSQL), or set
    ``spec.workers``; the first process creates the study and its baselines, the others join
    with their own sampler seeds, and ``spec.trials`` is a global budget."""
    import torch

    def log(*a: object) -> None:
        print(*a, file=sys.stderr)

    preflight(spec)  # storage, folders, artifact store: before anything is written or trained
    threads = worker_threads(spec)
    torch.set_num_threads(threads)
    task = build_task(spec, progress=progress)
    check_reachable(task)  # a budget no candidate can meet is said now, not after the trials
    if spec.budget is not None and outputs:  # echoed once every input is known to be good
        log(
            f"budget: {spec.budget:,} bytes ({format_size(spec.budget)}; MB = 10^6 bytes, MiB = 2^20)"
        )
    if adopt_legacy_space(task):
        log(
            f"study {spec.name}: resuming with the earlier int8-only default space it was made with"
        )
    study, creator = _open_or_create(
        spec, fingerprint=task.fingerprint(), sampler=None, storage=storage_of(spec)
    )
    seed = spec.seed if creator else _worker_seed(spec)
    study.sampler = _sampler(spec, seed)

    healed = heal_dead_trials(study, spec.run_dir)
    if healed:
        log(f"note: trials {healed} were left RUNNING by a process that died; failed, queued again")
    if task.space.note:
        log(f"note: {task.space.note}")
    int4 = task.space.int4_layers()
    if int4 and "latency" in spec.objectives and spec.backend == "onnxruntime-cpu":
        log(
            f"note: the space may store {len(int4)} layers' weights as int4; ONNX Runtime's CPU "
            "provider has no int4 conv kernels, so such models run slower than int8 ones "
            "(for a latency study use an int8 space such as --space default)"
        )
    _setup(study, task, creator, log=log if outputs else None)
    study.set_user_attr(
        f"{WORKER_PREFIX}{platform.node()}:{os.getpid()}",
        {"seed": seed, "threads": threads, "creator": creator, "started": time.time()},
    )
    study.set_user_attr("trials", spec.trials)  # the budget in force (a resume may raise it)
    done = _done(study, spec.trials)
    remaining = max(0, spec.trials - done)
    log(
        f"study {spec.name}: {done} trials stored, {remaining} to run "
        f"({len(task.space.dims)} dimensions; storage {redact(spec.storage_url)}"
        + (f"; {spec.workers} workers of {threads} threads" if spec.workers > 1 else "")
        + ")"
    )
    children = _spawn_workers(spec, threads) if remaining and spec.workers > 1 else []
    try:
        if remaining:
            _optimize(study, task, seed, remaining, progress=progress)
    finally:
        for p in children:
            p.join()
    return study, task


def _optimize(study: optuna.Study, task: Task, seed: int, remaining: int, *, progress: bool):
    """Run trials in this process until the study's global budget is reached."""
    spec = task.spec
    bar = tqdm(
        total=remaining,
        desc="trials",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    best = {"acc": -math.inf}

    interrupted: dict[str, type[KeyboardInterrupt] | None] = {"by": None}

    def on_signal(signum: int, frame: Any) -> None:
        # SIGTERM like Ctrl-C: Optuna fails the running trial and re-raises
        interrupted["by"] = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        raise interrupted["by"]

    def cb(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if interrupted["by"]:  # the interrupt landed where Python swallowed it
            raise interrupted["by"]
        if t.user_attrs.get("surplus"):
            return
        done = _done(st, spec.trials)
        bar.update(max(0, min(done, spec.trials) - (spec.trials - remaining) - bar.n))
        if t.user_attrs.get("feasible") and t.user_attrs.get("status") == OK:
            best["acc"] = max(best["acc"], t.user_attrs["val_accuracy"])
        bar.set_postfix(
            best_feasible_acc=f"{best['acc']:.4f}" if best["acc"] > 0 else "-",
            last=t.user_attrs.get("status", t.state.name.lower()),
        )
        if done >= spec.trials:  # the global budget, whichever workers ran it
            st.stop()

    logging.getLogger("optuna").setLevel(logging.ERROR)
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, on_signal) for s in signals} if main_thread else {}
    objective = _objective(task, seed)
    try:
        while _done(study, spec.trials) < spec.trials:
            study.optimize(objective, catch=(CandidateFailed,), callbacks=[cb], gc_after_trial=True)
            # a worker that died on this host while this one ran: its trial is queued again
            if not heal_dead_trials(study, spec.run_dir) and not _waiting(study):
                break
    finally:
        bar.close()
        for s, handler in old.items():
            signal.signal(s, handler)
