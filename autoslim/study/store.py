"""The study's artifact store (optuna.artifacts): trial and refined files, checked by SHA-256."""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import (
    Boto3ArtifactStore,
    FileSystemArtifactStore,
    download_artifact,
    upload_artifact,
)
from optuna.artifacts.exceptions import ArtifactNotFound

from .._files import sha256_file
from ..errors import ExportError, UsageError
from ..record import REFINED_PREFIX

MARKER = "autoslim-store.json"


DEFAULT = "artifacts"  # inside the study folder


def store_location(location: str | None) -> str:
    """The store's location as recorded: ``s3://BUCKET`` as given, a given folder as an
    absolute path, and the default as ``artifacts`` (relative: inside the study folder, so a
    copied or moved study folder keeps its files)."""
    if location and location.startswith("s3://"):
        bucket = location[len("s3://") :].strip("/")
        if not bucket or "/" in bucket:
            raise UsageError(
                f"an S3 artifact store is s3://BUCKET (no key prefix); got {location!r}"
            )
        return f"s3://{bucket}"
    return str(Path(location).expanduser().resolve()) if location else DEFAULT


def _where(location: str, run_dir: Path) -> str:
    """A recorded location as this machine reaches it (a relative one is inside ``run_dir``)."""
    if location.startswith("s3://") or Path(location).is_absolute():
        return location
    return str(run_dir / location)


def _backend(location: str, *, create: bool) -> Any:
    if location.startswith("s3://"):
        try:
            import boto3  # noqa: F401 - optional dependency
        except ImportError:
            raise UsageError(
                f"artifact store {location} needs boto3; run `pip install boto3` or give "
                "--artifacts a shared folder"
            ) from None
        return Boto3ArtifactStore(location[len("s3://") :])
    path = Path(location)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"cannot create the artifact store folder {path}: {e.strerror}; "
                "pass --artifacts a writable folder"
            ) from None
    elif not path.is_dir():
        raise UsageError(
            f"the study's artifact store {path} is not reachable from this machine; mount the "
            "shared folder there or pass --artifacts PATH (where this machine sees it)"
        )
    return FileSystemArtifactStore(path)


class TrialStore:
    """A study's artifact store, bound to the study (made by :func:`open_store`)."""

    def __init__(self, study: optuna.Study, location: str, backend: Any) -> None:
        self._study = study
        self.location = location
        self._backend = backend

    # -- writing (search workers, refine) -----------------------------------------------
    def put_trial(self, trial: optuna.Trial, path: Path) -> dict[str, str]:
        """Upload ``path`` as the artifact of a running trial; returns its id and SHA-256."""
        digest = sha256_file(path)
        aid = upload_artifact(
            artifact_store=self._backend, file_path=str(path), study_or_trial=trial
        )
        return {"artifact_id": aid, "artifact_sha256": digest}

    def put_refined(self, trial: int, record: dict[str, Any], path: Path) -> dict[str, Any]:
        """Upload a refined artifact and record ``record`` (plus its id) on the study."""
        aid = upload_artifact(
            artifact_store=self._backend, file_path=str(path), study_or_trial=self._study
        )
        record = {**record, "artifact_id": aid, "sha256": sha256_file(path)}
        self._study.set_user_attr(f"{REFINED_PREFIX}{trial:05d}", record)
        return record

    # -- reading (any machine) ----------------------------------------------------------
    def refined(self) -> list[dict[str, Any]]:
        """Every refined record stored on the study, by trial number."""
        attrs = self._study.user_attrs
        return [attrs[k] for k in sorted(attrs) if k.startswith(REFINED_PREFIX)]

    def refined_record(self, trial: int) -> dict[str, Any] | None:
        return self._study.user_attrs.get(f"{REFINED_PREFIX}{trial:05d}")

    def get(self, artifact_id: str, sha256: str, dest: Path) -> Path:
        """Download ``artifact_id`` to ``dest`` (atomically) and verify its SHA-256."""
        dest = Path(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        os.unlink(tmp)  # download_artifact refuses an existing file
        try:
            try:
                download_artifact(
                    artifact_store=self._backend, file_path=tmp, artifact_id=artifact_id
                )
            except ArtifactNotFound:
                raise ExportError(
                    f"artifact {artifact_id} is missing from the store {self.location}; pass "
                    "--replay to rebuild it from its config"
                ) from None
            digest = sha256_file(Path(tmp))
            if digest != sha256:
                raise ExportError(
                    f"artifact {artifact_id} in {self.location} changed since the study "
                    f"recorded it (SHA-256 {digest[:12]} vs {sha256[:12]}): refused; pass "
                    "--replay to rebuild it from its config"
                )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest


def open_store(
    study: optuna.Study, *, location: str | None, run_dir: Path, create: bool
) -> TrialStore | None:
    """The study's store. ``create`` (the study's creator): make it at ``location`` (default
    ``run_dir/artifacts``), write the marker, record it. Otherwise ``location`` (this machine's
    path to it) or the recorded one, checked against the marker. None for a study stored
    before autoslim kept artifacts in a store."""
    recorded = study.user_attrs.get("artifact_store")
    if create and recorded is None:
        recorded = {"location": store_location(location), "token": uuid.uuid4().hex}
        where = _where(recorded["location"], run_dir)
        backend = _backend(where, create=True)
        mark = json.dumps({"study": study.study_name, "token": recorded["token"]}).encode()
        backend.write(MARKER, io.BytesIO(mark))
        study.set_user_attr("artifact_store", recorded)
        return TrialStore(study, where, backend)
    if recorded is None:
        return None
    where = _where(store_location(location) if location else recorded["location"], run_dir)
    backend = _backend(where, create=False)
    try:
        with backend.open_reader(MARKER) as f:
            mark = json.loads(f.read())
    except (ArtifactNotFound, ValueError, OSError):
        mark = {}
    if mark.get("token") != recorded["token"]:
        raise UsageError(
            f"{where} is not study {study.study_name!r}'s artifact store (its marker "
            f"{MARKER} is {'another study' if mark else 'missing'}); pass --artifacts with the "
            f"path where this machine sees {recorded['location']}"
        )
    return TrialStore(study, where, backend)
