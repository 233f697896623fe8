"""The study's storage: the RDB URL checked, the study created or resumed under its fingerprint, found again by name."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from .._files import nearest_existing, write_probe
from ..errors import UsageError, first_line
from ..pareto import OBJECTIVES
from .spec import StudySpec, default_storage_url, runs_dir
from .store import open_store, store_location
from .workers import MAX_RETRIES, _creator_died, _owner


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
            f"{first_line(e)}; use another --name or --storage"
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
    elif stored != _as_stored(fingerprint, stored):
        fingerprint = _as_stored(fingerprint, stored)
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


def _as_stored(fingerprint: dict[str, str], stored: dict[str, str]) -> dict[str, str]:
    """``fingerprint`` as a study stored before the runtime's version entered it would have
    recorded it: an ONNX Runtime CPU study of then resumes (its runtime was not recorded)."""
    if "runtime" not in stored and fingerprint.get("backend") == "onnxruntime-cpu":
        return {k: v for k, v in fingerprint.items() if k != "runtime"}
    return fingerprint


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
            file = Path(db).expanduser()
            folder = file.absolute().parent
            if not folder.is_dir():
                raise UsageError(
                    f"storage {shown}: the folder {folder} does not exist (SQLite makes the "
                    "file, not its folder); create the folder or fix --storage"
                )
            if file.is_dir():
                raise UsageError(f"storage {shown}: {db} is a folder; expected a database file")
            if not write and not file.is_file():
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
            f"cannot reach the storage database {shown}: {first_line(e)}; start "
            "the server or fix --storage"
        ) from None
    finally:
        engine.dispose()
    return shown


def _probe_writable(path: Path, what: str, flag: str) -> None:
    """``path`` can be made and written by this process (its nearest existing folder takes a
    file, tried with a temp file removed at once), or a one-line UsageError naming ``flag``."""
    base = nearest_existing(Path(path).absolute())
    if not base.is_dir():
        raise UsageError(
            f"{what} {path} cannot be made: {base} is a file, not a folder; pass {flag} a path "
            "under a folder"
        )
    why = write_probe(base)
    if why is not None:
        raise UsageError(
            f"{what} {path} cannot be written: {base} is not writable ({why}); pass "
            f"{flag} a writable folder"
        )


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
            f"cannot read study storage {redact(url)}: {type(e).__name__}: {first_line(e)} "
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
