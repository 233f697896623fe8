"""The search runner: the only module that imports Optuna.

An Optuna study (local SQLite file by default, any RDB URL with ``storage``) samples the bound
search space; each trial's parameters become a CompressionConfig that :func:`study.evaluate`
turns into a measured artifact. Budgets are Optuna constraints (feasible iff <= 0). A stored
fingerprint (model, teacher hash, data split, space, objectives, device) guards resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from .config import CompressionConfig
from .errors import Terminated, UsageError, one_line
from .measure.predictor import LatencyPredictor
from .pareto import OBJECTIVE_COLUMNS, OBJECTIVES
from .report import table_records, trials_frame, write_outputs
from .results import StudyView, refined_records
from .store import TrialStore, open_store
from .study import (
    CandidateFailed,
    StudySpec,
    Task,
    build_task,
    default_storage_url,
    estimate,
    evaluate,
    measure_baseline,
    runs_dir,
    time_teacher,
)
from .units import format_size

__all__ = [
    "search",
    "open_study",
    "open_existing",
    "load_study",
    "heal_dead_trials",
    "study_status",
    "SearchResult",
]

BASELINES = [(0.0, 8, 8), (0.3, 8, 8), (0.5, 8, 8)]  # (prune, weight bits, act bits)
FITTING_LADDER = 3  # fitting uniform baselines enqueued when the budget is set
CANARY_DRIFT = 0.03  # canary moved more than this: the trials since the last check are flagged
RETIME_EVERY = 5  # trials between two timings of the teacher (speed-ups use the latest one)
MAX_RETRIES = 2  # a trial whose worker died is queued again at most this often
SETUP_WAIT_S = 1800  # a joining worker waits this long for the creator's baseline


class SearchResult:
    """What ``search`` returns: the Optuna study, the trial table and where outputs went."""

    def __init__(self, study: optuna.Study, frame, outputs: dict[str, Path], task: Task) -> None:
        self.study, self.frame, self.outputs, self.task = study, frame, outputs, task

    @property
    def front(self):
        return self.frame[self.frame["front"]]


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


def storage_of(spec: StudySpec) -> optuna.storages.RDBStorage:
    """The study's RDB storage with heartbeats: a trial whose process stops beating for
    ``2 * heartbeat_s`` is failed by the next worker to start a trial and queued again (up to
    ``MAX_RETRIES`` times), on any machine."""
    url = spec.storage_url
    if not spec.storage:  # the default SQLite file lives in the study folder
        spec.run_dir.mkdir(parents=True, exist_ok=True)
    engine: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    import sqlalchemy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        for attempt in range(6):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=spec.heartbeat_s,
                    grace_period=2 * spec.heartbeat_s,
                    heartbeat_stale_trial_callback=retry,
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers started at once on an empty database race to create Optuna's tables
                # (PostgreSQL: "duplicate key ... pg_type"); the loser finds them made
                if attempt == 5:
                    raise
                time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(
    spec: StudySpec,
    *,
    fingerprint: dict[str, str] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """Create or resume the study; refuse to resume one with a different fingerprint."""
    return _open_or_create(spec, fingerprint=fingerprint, sampler=sampler, storage=storage)[0]


def _open_or_create(
    spec: StudySpec,
    *,
    fingerprint: dict[str, str] | None,
    sampler: optuna.samplers.BaseSampler | None,
    storage: optuna.storages.BaseStorage | None,
) -> tuple[optuna.Study, bool]:
    """The study and whether this process created it. Creation is the storage's atomic step
    (one process of many started at once wins); the creator records the fingerprint, the
    others wait for it and compare."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    where = redact(spec.storage_url)
    kw = {"study_name": spec.name, "storage": storage or spec.storage_url, "sampler": sampler}
    try:
        try:
            study = optuna.create_study(
                **kw, load_if_exists=False, directions=[OBJECTIVES[o] for o in spec.objectives]
            )
            creator = True
        except optuna.exceptions.DuplicatedStudyError:
            study, creator = optuna.load_study(**kw), False
    except Exception as e:  # a clash of names, a file that is not an Optuna database
        raise UsageError(
            f"cannot open study {spec.name!r} in {where}: {type(e).__name__}: "
            f"{_first_line(e)}; use another --name or --storage"
        ) from None
    if fingerprint is None:
        return study, creator
    if creator:
        study.set_user_attr("setup_owner", _owner())  # a joiner of this host sees if it dies
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("spec", _stored_spec(spec))
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2; stable enough
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.objectives))
        return study, creator
    stored = _wait_for(study, "fingerprint", 60)
    if stored is None:  # made by an older autoslim, or its creator died at once: adopt it
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("spec", _stored_spec(spec))
    elif stored != fingerprint:
        diff = sorted(
            k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)
        )
        raise UsageError(
            f"study {spec.name!r} in {where} was run with a different "
            f"{', '.join(diff)} (stored {', '.join(f'{k}={stored.get(k)}' for k in diff)}); "
            "refusing to resume: pass a new --name or delete "
            f"{spec.run_dir} to start over"
        )
    return study, creator


def _stored_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as the study records it: a storage URL's password never stored."""
    d = spec.to_dict()
    if d.get("storage"):
        d["storage"] = redact(d["storage"])
    return d


def _wait_for(study: optuna.Study, key: str, seconds: float) -> Any:
    """The study attribute ``key`` once another process has set it (None after ``seconds``,
    or at once when the study's creator was a process of this machine that is gone)."""
    deadline = time.monotonic() + seconds
    while True:
        attrs = study._storage.get_study_user_attrs(study._study_id)
        value = attrs.get(key)
        if value is not None or time.monotonic() >= deadline or _creator_died(attrs):
            return value
        time.sleep(0.5)


def _creator_died(attrs: dict[str, Any]) -> bool:
    """Whether the study's creator (``setup_owner``) was a process of this machine that is
    gone (a creator on another machine cannot be seen from here: False)."""
    owner = attrs.get("setup_owner")
    return bool(owner) and owner.get("host") == platform.node() and not _alive(owner)


def _first_line(e: BaseException) -> str:
    """The first line of a database error (SQLAlchemy appends its background and a link)."""
    lines = str(getattr(e, "orig", None) or e).strip().splitlines()
    return lines[0] if lines else repr(e)


def redact(url: str) -> str:
    """A storage URL with its password hidden (for every message and log line)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide that we can find
        return url


def check_storage(url: str, *, write: bool = True) -> str:
    """Fail fast, in one line, on a storage URL that cannot work; return it with the password
    hidden (for messages). SQLite files are created on demand (in a folder that exists and is
    writable; with ``write=False``, for the read verbs, the file must exist); a server is
    connected to once."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(
            f"storage {url!r} is not a database URL; expected e.g. sqlite:///study.db or "
            "postgresql+psycopg://user@host/dbname"
        ) from None
    shown = u.render_as_string(hide_password=True)
    try:
        u.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise UsageError(
            f"storage {shown}: unknown database kind {u.drivername!r}; expected sqlite:/// or "
            "postgresql+psycopg://"
        ) from None
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            folder = Path(db).expanduser().absolute().parent
            if not folder.is_dir():
                raise UsageError(
                    f"storage {shown}: the folder {folder} does not exist (SQLite makes the "
                    "file, not its folder); create the folder or fix --storage"
                )
            if Path(db).is_dir():
                raise UsageError(f"storage {shown}: {db} is a folder; expected a database file")
            if not write and not Path(db).expanduser().is_file():
                raise UsageError(
                    f"storage {shown}: no such database file; pass the --storage URL the study "
                    "was run with"
                )
            if write:
                _probe_writable(folder, "the storage's folder", "--storage")
        return shown
    args = {"connect_timeout": 10} if u.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(u, connect_args=args)
    except ImportError as e:
        raise UsageError(
            f"storage {shown}: its database driver is not installed ({e}); for PostgreSQL use "
            "postgresql+psycopg://... (psycopg is installed with autoslim)"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise UsageError(
            f"cannot reach the storage database {shown}: {_first_line(e)}; start "
            "the server or fix --storage"
        ) from None
    finally:
        engine.dispose()
    return shown


def _probe_writable(path: Path, what: str, flag: str) -> None:
    """``path`` can be made and written by this process (its nearest existing folder takes a
    file, tried with a temp file removed at once), or a one-line UsageError naming ``flag``."""
    base = Path(path).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(
            f"{what} {path} cannot be made: {base} is a file, not a folder; pass {flag} a path "
            "under a folder"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".autoslim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"{what} {path} cannot be written: {base} is not writable ({e.strerror}); pass "
            f"{flag} a writable folder"
        ) from None


def preflight(spec: StudySpec) -> None:
    """Every check a search can make before it writes or trains anything: the storage is
    reachable (a server is connected to once; a SQLite file's folder exists and is writable),
    the study folder and the artifact store can be written. A refused input leaves no trace."""
    if spec.run_dir.exists() and not spec.run_dir.is_dir():
        raise UsageError(
            f"the study folder {spec.run_dir} is a file; pass --out-dir a folder or another --name"
        )
    _probe_writable(spec.run_dir, "the study folder", "--out-dir")
    if spec.storage:
        check_storage(spec.storage)  # before minutes of teacher training
    if spec.artifacts and not spec.artifacts.startswith("s3://"):
        where = Path(spec.artifacts).expanduser()
        if where.exists() and not where.is_dir():
            raise UsageError(
                f"the artifact store {where} is a file; pass --artifacts a folder every worker "
                "can read"
            )
        _probe_writable(where, "the artifact store", "--artifacts")
    elif spec.artifacts:
        from .store import store_location

        store_location(spec.artifacts)  # the s3:// form
    existing = _existing_study(spec) if spec.artifacts else None
    if existing is not None:  # a resume or a joiner: its store, found where it was told
        open_store(existing, location=spec.artifacts, run_dir=spec.run_dir, create=False)


def _existing_study(spec: StudySpec) -> optuna.Study | None:
    """The stored study of ``spec`` when there is one (read only), else None."""
    if not spec.storage and not (spec.run_dir / "study.db").is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    except Exception:  # noqa: BLE001 - none yet, or unreadable: _open_or_create says which
        return None


def smallest_estimate(task: Task, *, stop_at: int = 0) -> int:
    """The estimated bytes of the smallest candidate of the space: every ratio at its largest,
    every bit width at its lowest, then each rank dimension set, one at a time, to the choice
    that shrinks the file most (factorising a thin layer can grow it). Stops once at or below
    ``stop_at``."""
    space = task.space

    def size(params: dict[str, Any]) -> int:
        return estimate(task, space.to_config(params))

    params = space.smallest_params(factorise=False)
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


def _locate(name_or_dir: str | Path, storage: str | None) -> tuple[Path, str, str]:
    p = Path(name_or_dir)
    run_dir = p if p.is_dir() else runs_dir() / str(name_or_dir)
    if storage is not None:
        check_storage(storage, write=False)  # one line naming the URL kinds, as search does
    url = storage or default_storage_url(run_dir)
    if storage is None and not (run_dir / "study.db").is_file():
        raise UsageError(
            f"no study found at {run_dir} (expected a study name in ./studies/runs/ or a study "
            "folder holding study.db); run `autoslim search` first or pass --storage URL"
        )
    return run_dir, url, p.name


def open_existing(name_or_dir: str | Path, *, storage: str | None = None) -> optuna.Study:
    """Open an existing Optuna study by name (``studies/runs/NAME``), folder or storage URL."""
    _, url, name = _locate(name_or_dir, storage)
    return _open(url, name)


def _open(url: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as e:  # a bad URL or a file that is not an Optuna database
        raise UsageError(
            f"cannot read study storage {redact(url)}: {type(e).__name__}: {_first_line(e)} "
            "(is it an Optuna study database? pass the study folder or --storage URL it was "
            "run with)"
        ) from None
    if not names:
        raise UsageError(f"storage {redact(url)} holds no study; run `autoslim search` first")
    if name not in names and len(names) > 1:
        raise UsageError(
            f"storage {redact(url)} holds several studies ({', '.join(names)}) and none is named "
            f"{name!r}; pass one of those names"
        )
    return optuna.load_study(study_name=name if name in names else names[0], storage=url)


def param_importances(study: optuna.Study, frame) -> dict[str, dict[str, float]]:
    """PED-ANOVA importance of each sampled parameter per objective, over measured trials only.

    PED-ANOVA (Optuna's default evaluator; no scikit-learn) scores which parameters it takes to
    reach the *best* values of an objective, so maximised objectives are negated. Over-budget
    trials carry placeholder objective values and are left out.
    """
    objectives = study.user_attrs.get("spec", {}).get("objectives", ["accuracy", "latency"])
    measured = set(frame.loc[frame["status"] == "ok", "trial"]) if len(frame) else set()
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in measured and t.params]
    if len(trials) < 3:
        return {}
    scratch = optuna.create_study(directions=[OBJECTIVES[o] for o in objectives])
    scratch.add_trials(trials)
    out = {}
    for o in objectives:
        col, sign = OBJECTIVE_COLUMNS[o], -1.0 if OBJECTIVES[o] == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "low target values": negated
                imp = optuna.importance.get_param_importances(
                    scratch,
                    evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                    target=lambda t, c=col, s=sign: s * float(t.user_attrs[c]),
                )
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue  # e.g. every measured trial has the same value
        out[o] = {k: float(v) for k, v in imp.items()}
    return out


def _view(
    study: optuna.Study,
    run_dir: Path,
    url: str,
    *,
    importance: bool,
    artifacts: str | None = None,
) -> StudyView:
    frame = trials_frame(study, run_dir)

    def store() -> TrialStore | None:  # opened when a file is read or written, not before
        return open_store(study, location=artifacts, run_dir=run_dir, create=False)

    return StudyView(
        name=study.study_name,
        storage_url=url,
        run_dir=run_dir,
        spec=dict(study.user_attrs.get("spec", {})),
        baseline=dict(study.user_attrs.get("baseline", {})),
        teacher=dict(study.user_attrs.get("teacher", {})),
        trials=frame,
        importances=param_importances(study, frame) if importance else {},
        device=dict(study.user_attrs.get("device", {})),
        latency_predictor=dict(study.user_attrs.get("latency_predictor", {})),
        store_opener=store,
        refined=refined_records(study.user_attrs, run_dir),
    )


def load_study(
    name_or_dir: str | Path,
    *,
    storage: str | None = None,
    importance: bool = False,
    artifacts: str | None = None,
) -> StudyView:
    """A stored study as plain data: ``load_study("default").trials`` is a pandas DataFrame.

    ``name_or_dir``: a study name (``studies/runs/NAME``) or its folder; ``storage``: the Optuna
    RDB URL if the study was run with ``--storage``. ``importance`` also computes PED-ANOVA
    parameter importances per objective (a few seconds). ``artifacts``: where this machine sees
    the study's artifact store, if not at the path recorded by the study's creator.
    """
    run_dir, url, name = _locate(name_or_dir, storage)
    study = _open(url, name)
    spec = study.user_attrs.get("spec", {})
    if not Path(name_or_dir).is_dir() and spec.get("out_dir"):
        run_dir = Path(spec["out_dir"])
    return _view(study, run_dir, url, importance=importance, artifacts=artifacts)


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
        "over_budget",
        "over_latency",
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


def _suggest(trial: optuna.Trial, task: Task) -> dict[str, Any]:
    params = {}
    for d in task.space.dims:
        k = d.knob
        if k.choices is not None:
            params[d.name] = trial.suggest_categorical(d.name, list(k.choices))
        else:
            params[d.name] = trial.suggest_float(d.name, k.low, k.high, step=k.step)
    return params


def _flag_drift(study: optuna.Study, before: float | None, after: float) -> None:
    """The teacher's file is the canary: re-timed every ``RETIME_EVERY`` trials. If it moved
    by more than ``CANARY_DRIFT`` since the last timing, the trials this process measured in
    between are flagged (study attribute ``latency_drift``: trial number -> note; shown in the
    trial table's ``latency_noise`` column): their latencies came from a machine that changed."""
    if not before or abs(after - before) / before <= CANARY_DRIFT:
        return
    note = f"teacher timing moved {after / before - 1:+.1%} ({before:.4g} -> {after:.4g} ms)"
    pid, flagged = os.getpid(), dict(study.user_attrs.get("latency_drift", {}))
    for t in reversed(study.get_trials(deepcopy=False)):
        if t.user_attrs.get("owner", {}).get("pid") != pid or "latency_ms" not in t.user_attrs:
            continue
        if t.user_attrs.get("teacher_latency_ms") != before:
            break  # measured against an earlier timing: before the last check
        flagged[str(t.number)] = note
    study.set_user_attr("latency_drift", flagged)


def _screened_points(study: optuna.Study) -> list[dict[str, float]]:
    """Every screened candidate of the study (level 0): proxy accuracy and size estimate."""
    return [
        {"accuracy": t.user_attrs["screen_accuracy"], "size": t.user_attrs["size_estimate"]}
        for t in study.get_trials(deepcopy=False)
        if "screen_accuracy" in t.user_attrs
    ]


def _measured_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's timed trials as plain data: features, latency ratio to the teacher timed
    alongside, accuracy, size, feasibility (predicted latencies are never learned from)."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get("status") != "ok" or a.get("latency_source", "measured") != "measured":
            continue
        if not a.get("latency_features") or not a.get("teacher_latency_ms"):
            continue
        points.append(
            {
                "features": a["latency_features"],
                "latency": a["latency_ms"] / a["teacher_latency_ms"],
                "accuracy": a["val_accuracy"],
                "size": float(a["size_bytes"]),
                "feasible": bool(a.get("feasible")),
            }
        )
    return points


def refresh_predictor(study: optuna.Study, task: Task, *, seen: dict[str, int]) -> None:
    """Refit the latency predictor on the study's measured trials when there are new ones;
    store its held-out calibration (study attribute ``latency_predictor``) and hand the task
    the predictor only when it is calibrated well enough to decide with."""
    if not task.spec.latency_predictor:
        task.predictor = None
        return
    points = _measured_points(study)
    task.measured = [
        {k: p[k] for k in ("accuracy", "size", "latency")} for p in points if p["feasible"]
    ]
    if len(points) == seen.get("n") or len(points) < 3:
        return
    seen["n"] = len(points)
    predictor = LatencyPredictor().fit(
        [p["features"] for p in points], [p["latency"] for p in points]
    )
    cal = predictor.calibration
    study.set_user_attr("latency_predictor", {**cal.to_dict(), "line": cal.line()})
    task.predictor = predictor if cal.usable else None


def _objective(task: Task, seed: int):
    spec = task.spec
    since = {"n": 0}  # trials since the teacher was last timed
    seen: dict[str, int] = {}  # measured trials the predictor was last fitted on

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return run(trial)
        except KeyboardInterrupt as e:  # SIGTERM or Ctrl-C: failed with why, and run again
            _requeue_interrupted(trial, e, complete=len(trial.params) == len(task.space.dims))
            raise

    def run(trial: optuna.Trial) -> tuple[float, ...]:
        if _surplus(trial, spec.trials):  # other workers took the last trials of the budget
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned("the study's trial budget is used up by other workers")
        if trial.user_attrs.get("killed"):  # a retry inherits the dead trial's attributes
            trial.set_user_attr("killed", False)
            trial.set_user_attr("fail_reason", "")
        heal_dead_trials(trial.study, spec.run_dir)  # a dead worker of this host: retry now
        refresh_predictor(trial.study, task, seen=seen)
        if since["n"] >= RETIME_EVERY:  # interleaved, so a drifting machine drifts both
            before = task.teacher_timing.get("latency_ms")
            after = time_teacher(task, spec.run_dir)
            _flag_drift(trial.study, before, after)
            since["n"] = 0
        since["n"] += 1
        trial.set_user_attr("owner", {**_owner(), "seed": seed})
        config = task.space.to_config(_suggest(trial, task))
        trial.set_user_attr("config", config.to_json())
        trial.set_user_attr("summary", config.summary())
        if spec.screen_images:
            task.screened = _screened_points(trial.study)
        # a baseline, the sensitivity seed or a retry (enqueued so marked): always trained
        fixed = bool({"enqueued_as", "retry_of"} & set(trial.user_attrs))
        try:
            res = evaluate(
                task, config, spec.run_dir / "trials" / f"{trial.number:05d}", promote=fixed
            )
        except CandidateFailed as e:
            trial.set_user_attr("fail_reason", one_line(str(e)))
            raise
        except Exception as e:  # noqa: BLE001 - ORT, onnx, torch: one trial, not the study
            reason = one_line(f"{type(e).__name__}: {e}")
            trial.set_user_attr("fail_reason", reason)
            raise CandidateFailed(reason) from e
        if (
            "artifact" in res and task.store is not None
        ):  # into the study's store; the store's copy is the only one
            local = Path(res.pop("artifact"))
            res.update(task.store.put_trial(trial, local))
            local.unlink()
        for k, v in res.items():
            if k != "config":
                trial.set_user_attr(k, v)
        if res["status"] == "over_budget":
            size = res["size_estimate"]
            metrics = {"accuracy": 0.0, "latency": task.baseline["latency_ms"], "size": size}
        elif res["status"] == "over_latency":  # the predictor's figure: never on a front
            size = res["size_estimate"]
            metrics = {"accuracy": 0.0, "latency": res["latency_predicted_ms"], "size": size}
        elif res["status"] == "screened":  # level 0 only: the proxy, never on a front
            size = res["size_estimate"]
            latency = res.get("latency_predicted_ms") or task.baseline["latency_ms"]
            metrics = {"accuracy": res["screen_accuracy"], "latency": latency, "size": size}
        else:
            size = res["size_bytes"]
            metrics = {"accuracy": res["val_accuracy"], "latency": res["latency_ms"], "size": size}
        constraints = {}
        if spec.budget is not None:
            constraints["size"] = float(size - spec.budget)
        if spec.max_latency_ms is not None:
            constraints["latency"] = float(metrics["latency"] - spec.max_latency_ms)
        if spec.max_accuracy_drop is not None:
            drop = task.baseline["val_accuracy"] - metrics["accuracy"]
            constraints["accuracy_drop"] = float(drop - spec.max_accuracy_drop)
        for k, v in constraints.items():
            trial.set_constraint(k, v)
        trial.set_user_attr("constraints", constraints)
        trial.set_user_attr("feasible", all(v <= 0 for v in constraints.values()))
        return tuple(float(metrics[o]) for o in spec.objectives)

    return objective


def _requeue_interrupted(trial: optuna.Trial, e: KeyboardInterrupt, *, complete: bool) -> None:
    """A trial stopped by SIGTERM or Ctrl-C: record why (Optuna then fails it) and, once its
    parameters were all sampled (``complete``), queue them again, so that the next run of the
    study (a resume) runs it first. Like a killed trial, it does not use up the budget."""
    how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C (SIGINT)"
    again = "queued again" if complete else "not started; nothing to queue again"
    try:
        trial.set_user_attr("fail_reason", f"stopped by {how} before it finished; {again}")
        trial.set_user_attr("killed", True)
        if not complete:
            return
        trial.study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={
                    "retry_of": trial.number,
                    "retries": int(trial.user_attrs.get("retries", 0)),
                },
            )
        )
    except Exception:  # noqa: BLE001 - the storage is gone too: the interrupt still wins
        pass


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
    deadline = time.monotonic() + SETUP_WAIT_S
    while True:
        attrs = study._storage.get_study_user_attrs(study._study_id)
        if attrs.get("baseline") is not None:
            return attrs["baseline"]
        if _creator_died(attrs):
            return None
        if time.monotonic() >= deadline:
            raise UsageError(
                f"study {spec.name!r} has no baseline after {SETUP_WAIT_S} s: the process that "
                "created it did not finish its set-up (killed on another machine?); delete the "
                "study or run one worker alone first"
            )
        time.sleep(0.5)


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
    device = {k: v for k, v in task.teacher_timing.items() if k != "latency_ms"}
    study.set_user_attr("device", {"backend": spec.backend, **device})
    if creator and not study.get_trials(deepcopy=False):
        # no more baselines than trials: enqueued ones never run would show as "waiting"
        seeds = [
            (task.space.uniform_params(prune=prune, weight_bits=wb, act_bits=ab), "uniform")
            for prune, wb, ab in _baselines(task)
        ]
        if spec.screen_images and spec.budget is not None:  # per-stage widths by sensitivity
            from .sensitivity import can_factorise, greedy_params, stage_sensitivity

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
    from .study import StudySpec as Spec

    search(Spec.from_dict(spec_dict), progress=False, outputs=False)


def search(spec: StudySpec, *, progress: bool = True, outputs: bool = True) -> SearchResult:
    """Run (or resume, or join) the study described by ``spec`` until it holds ``spec.trials``
    counted trials in all, whichever processes run them.

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
        f"worker:{platform.node()}:{os.getpid()}",
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
    if spec.final_points and outputs:  # the worker processes of --workers K leave it to this one
        finalize(study, task, progress=progress)
    cal = study.user_attrs.get("latency_predictor")
    if cal:
        log(f"note: {cal['line']}")
    if outputs:
        log(trial_summary(study, spec.trials))
    view = _view(
        study, spec.run_dir, spec.storage_url, importance=outputs, artifacts=spec.artifacts
    )
    written = write_outputs(view) if outputs else {}
    return SearchResult(study, view.trials, written, task)


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
        if t.user_attrs.get("feasible") and t.user_attrs.get("status") == "ok":
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


FINAL_WAIT_S = 7200  # the final level waits this long at most for other workers' trials
FINAL_CLAIM_S = 6 * 3600  # a claim of the final level by a worker of another machine holds so long


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


def finalize(study: optuna.Study, task: Task, *, progress: bool) -> list[dict[str, Any]]:
    """Level 2: the final recovery (the refine recipe of ``final_epochs``) of up to
    ``final_points`` trials of the level-1 front, once every counted trial has finished.
    Each result is recorded on the study and its file stored like a refine's; a resumed
    study reuses the finished ones. Records which trials make up the final level (study
    attribute ``final``)."""
    from .refinement import RefineRecipe, refine

    spec = task.spec
    claim = study.user_attrs.get("final_claim")
    me = _owner()
    if claim and claim["owner"] != me and not study.user_attrs.get("final", {}).get("done"):
        other = claim["owner"]
        live = (
            _alive(other)
            if other.get("host") == me["host"]
            else (time.time() - claim["since"] < FINAL_CLAIM_S)
        )
        if live:  # another worker of this study runs the final level
            print(
                f"note: the final level runs in worker {other.get('host')}:{other.get('pid')}",
                file=sys.stderr,
            )
            return []
    study.set_user_attr("final_claim", {"owner": me, "since": time.time()})
    deadline = time.monotonic() + FINAL_WAIT_S
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if time.monotonic() > deadline:
            break
        heal_dead_trials(study, spec.run_dir)  # a dead worker here; heartbeats elsewhere
        time.sleep(5)
    recipe = RefineRecipe(
        epochs=spec.final_epochs,
        max_steps_per_epoch=spec.final_steps_per_epoch,
        seed=spec.seed,
        temperature=spec.final_temperature,
        alpha=spec.final_alpha,
    )
    view = _view(study, spec.run_dir, spec.storage_url, importance=False, artifacts=spec.artifacts)
    picks = final_picks(view.front, spec.final_points)
    study.set_user_attr("final", {"recipe": recipe.to_dict(), "trials": picks, "done": False})
    out = []
    for i, t in enumerate(picks):
        if progress:
            print(f"final level: trial {t} ({i + 1} of {len(picks)})", file=sys.stderr)
        out.append(refine(view, t, recipe=recipe, progress=progress, task=task))
    study.set_user_attr("final", {"recipe": recipe.to_dict(), "trials": picks, "done": True})
    return out


def trial_summary(study: optuna.Study, budget: int) -> str:
    """One line on what the search did: trials trained and measured, screened, rejected
    before training and why, failed, interrupted and queued again."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    status = [t.user_attrs.get("status") for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    parts = [
        f"{status.count('ok')} trained and measured",
        f"{status.count('screened')} screened and not trained (level 0)",
        f"{status.count('over_budget')} rejected before training (size estimate over the budget)",
        f"{status.count('over_latency')} rejected before training (predicted over --max-latency)",
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


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


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
        if key.startswith("worker:"):
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


def summary_json(result: SearchResult) -> str:
    """The front (same columns as ``autoslim report --format json``), the final front (level 2:
    the finally-recovered models, their final numbers in the usual columns), outputs and
    baseline."""
    from .results import final_numbers

    front = table_records(result.front) if len(result.front) else []
    df = result.frame
    final = df[df["final_front"]] if "final_front" in df.columns else df.iloc[:0]
    return json.dumps(
        {
            "front": front,
            "final_front": table_records(final_numbers(final)) if len(final) else [],
            "outputs": {k: str(v) for k, v in result.outputs.items()},
            "baseline": result.study.user_attrs.get("baseline"),
        },
        indent=2,
        default=str,
    )
