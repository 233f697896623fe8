"""A stored study as plain data: the trial table, picking a trial, exporting its artifact.

:class:`StudyView` is what ``autoslim.load_study(...)`` returns (built by the runner, the only
module that reads Optuna storage): a pandas DataFrame of trials plus the study's recorded spec,
teacher baseline and refined results. :func:`pick` chooses a trial under constraints and a
preference; :func:`export_trial` re-materialises a trial's artifact and verifies it against what
the study recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import CompressionConfig
from .errors import AutoslimError, ExportError, UsageError

__all__ = [
    "StudyView",
    "NothingQualifies",
    "pick",
    "qualifying",
    "export_trial",
    "check_onnx_output",
    "sha256_file",
    "PREFERENCES",
]

PREFERENCES = ("latency", "size", "accuracy")
REFINED_PREFIX = "refined:"  # study attribute per refined trial: its record and artifact id
ACCURACY_TOLERANCE = 0.001  # 0.1 pt: a replayed artifact may differ by float noise in training


class NothingQualifies(AutoslimError):
    """No trial meets the constraints given to ``pick`` (CLI exit code 3)."""

    exit_code = 3


@dataclass
class StudyView:
    """A stored study as plain data. ``trials`` has one row per trial (see ``report.trials_frame``)."""

    name: str
    storage_url: str
    run_dir: Path
    spec: dict[str, Any]
    baseline: dict[str, float]
    teacher: dict[str, Any]
    trials: pd.DataFrame
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)  # what timed the latencies
    latency_predictor: dict[str, Any] = field(default_factory=dict)  # its held-out calibration
    # opens the study's artifact store (autoslim.store.TrialStore) when a file is read
    store_opener: Callable[[], Any] | None = field(default=None, repr=False)
    refined: dict[int, dict[str, Any]] = field(default_factory=dict)  # refine records by trial

    @property
    def has_final(self) -> bool:
        """Whether the search's final level recorded finally-recovered trials."""
        df = self.trials
        return bool(len(df) and "final" in df.columns and df["final"].any())

    def is_final(self, trial: int) -> bool:
        """Whether trial ``trial`` was finally recovered by the search (level 2)."""
        df = self.trials
        return bool(self.has_final and df.loc[df["trial"] == trial, "final"].any())

    def store(self) -> Any:
        """The study's artifact store (None: a study stored before autoslim kept one)."""
        return self.store_opener() if self.store_opener is not None else None

    @property
    def front(self) -> pd.DataFrame:
        """The feasible Pareto front (measured trials only)."""
        return self.trials[self.trials["front"]] if len(self.trials) else self.trials

    @property
    def budget(self) -> int | None:
        return self.spec.get("budget")

    def row(self, trial: int) -> pd.Series:
        """The table row of trial number ``trial`` (UsageError naming the valid range if absent)."""
        df = self.trials
        hit = df[df["trial"] == trial] if len(df) else df
        if hit.empty:
            rng = f"0..{int(df['trial'].max())}" if len(df) else "none stored"
            raise UsageError(
                f"study {self.name!r} has no trial {trial} (trials: {rng}); "
                f"see `autoslim report {self.cli_ref} --format table`"
            )
        return hit.iloc[0]

    def measured_row(self, trial: int) -> pd.Series:
        """Like :meth:`row`, but refuses trials without a measured artifact (failed, over budget)."""
        r = self.row(trial)
        if r["status"] != "ok":
            why = r["fail_reason"] or r["status"].replace("_", " ")
            raise UsageError(
                f"trial {trial} of study {self.name!r} has no measured artifact ({why}); "
                "choose a trial with status ok, e.g. from `autoslim pick`"
            )
        return r

    def config(self, trial: int) -> CompressionConfig:
        return CompressionConfig.from_json(self.row(trial)["config"])

    def trial_dir(self, trial: int) -> Path:
        return self.run_dir / "trials" / f"{trial:05d}"

    def artifact_size(self, trial: int) -> int:
        """Bytes an export of the trial's config writes now (what a replay or refine must match).

        The recorded size, less the exporter stack traces that artifacts written before
        autoslim dropped them still carry in the stored file.
        """
        import onnx

        from .artifact import drop_stack_traces

        size = int(self.measured_row(trial)["size_bytes"])
        stored = self.trial_dir(trial) / "model.onnx"
        if stored.is_file():
            model = onnx.load(str(stored))
            before = model.ByteSize()
            drop_stack_traces(model)
            size -= before - model.ByteSize()
        return size

    def fetch(self, trial: int, dest: str | Path, *, refined: bool = False) -> Path:
        """Write trial ``trial``'s recorded artifact (``refined``: its refined one) to ``dest``,
        verified against the SHA-256 the study recorded; from the study's store, or for a study
        from before the store, from the file beside the trial. No accuracy is measured (that is
        :func:`export_trial`); :class:`ExportError` if it is missing or changed."""
        dest = Path(dest)
        if refined:
            rec = self.refined.get(trial)
            if rec is None:
                raise UsageError(
                    f"trial {trial} has no refined result; run "
                    f"`autoslim refine {self.cli_ref} --trial {trial}` first"
                )
            aid, sha, local = rec.get("artifact_id"), rec["sha256"], self.refined_dir(trial)
        else:
            row = self.measured_row(trial)
            aid, sha, local = row.get("artifact_id"), row["artifact_sha256"], self.trial_dir(trial)
        if aid:
            store = self.store()
            if store is None:
                raise ExportError(
                    f"trial {trial} names artifact {aid} but study {self.name!r} records no "
                    "artifact store; pass --replay to rebuild it"
                )
            return store.get(str(aid), str(sha), dest)
        local = local / "model.onnx"
        if not local.is_file():
            raise ExportError(f"the artifact of trial {trial} ({local}) is missing")
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(local, tmp)
        digest = sha256_file(tmp)
        if sha and digest != sha:
            tmp.unlink()
            raise ExportError(
                f"the stored artifact {local} changed since the study recorded it (SHA-256 "
                f"{digest[:12]} vs {str(sha)[:12]}); pass --replay to rebuild it"
            )
        os.replace(tmp, dest)
        return dest

    def has_artifact(self, trial: int) -> bool:
        """Whether the study holds a file for the trial (in its store, or beside it)."""
        row = self.row(trial)
        return bool(row.get("artifact_id")) or (self.trial_dir(trial) / "model.onnx").is_file()

    def refined_dir(self, trial: int) -> Path:
        """Where ``autoslim refine`` stores the trial's refined result and artifact."""
        return self.run_dir / "refined" / f"{trial:05d}"

    @property
    def cli_ref(self) -> str:
        """How to name this study on the command line (name if in ./studies/runs, else folder)."""
        from .study import default_storage_url, runs_dir

        default = (runs_dir() / self.name).resolve()
        ref = self.name if self.run_dir.resolve() == default else str(self.run_dir)
        if self.storage_url != default_storage_url(self.run_dir):
            from .runner import redact

            ref += f" --storage {redact(self.storage_url)}"
        return ref

    def export_command(self, trial: int, output: str | None = None) -> str:
        return (
            f"autoslim export {self.cli_ref} --trial {trial} -o {output or f'model-t{trial}.onnx'}"
        )


def qualifying(
    view: StudyView,
    *,
    max_size: int | None = None,
    min_accuracy: float | None = None,
    max_latency_ms: float | None = None,
    feasible_only: bool = True,
    front_only: bool = False,
    final: bool | None = None,
) -> pd.DataFrame:
    """The measured trials (feasible ones, or the front's) that meet every given constraint.

    Constraints apply to the measurements of the artifact (val accuracy, bytes on disk,
    latency on the study's backend): the final ones (level 2, the finally-recovered models)
    when the study has a final level and ``final`` is not False, else the search-time ones.
    With final numbers, the rows carry them in the usual columns and the search-time values
    in ``search_*`` columns. Raises :class:`NothingQualifies` (exit code 3), saying how many
    trials failed each constraint, when none does.
    """
    if min_accuracy is not None and not 0 <= min_accuracy <= 1:
        raise UsageError(f"--min-accuracy is a fraction in [0, 1] (0.91 = 91%); got {min_accuracy}")
    df = view.trials
    if final is None:
        final = view.has_final
    elif final and not view.has_final:
        raise UsageError(
            f"study {view.name!r} has no final level (final_points = 0, or its search has not "
            "reached it); use the search-time numbers"
        )
    cand = df[df["status"] == "ok"] if len(df) else df
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
    if min_accuracy is not None:
        checks.append(("accuracy", cand["val_accuracy"] >= min_accuracy))
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
    max_latency_ms: float | None = None,
    prefer: str = "latency",
    feasible_only: bool = True,
    final: bool | None = None,
) -> pd.Series:
    """The measured trial that meets every constraint and is best by ``prefer``.

    Constraints and ``final`` as in :func:`qualifying` (by default the final numbers when the
    study has a final level). Ties go to higher accuracy, then smaller size.
    Raises :class:`NothingQualifies` (exit code 3) when none qualifies.
    """
    if prefer not in PREFERENCES:
        raise UsageError(f"--prefer must be one of {PREFERENCES}; got {prefer!r}")
    chosen = qualifying(
        view,
        max_size=max_size,
        min_accuracy=min_accuracy,
        max_latency_ms=max_latency_ms,
        feasible_only=feasible_only,
        final=final,
    )
    key = {"latency": "latency_ms", "size": "size_bytes", "accuracy": "val_accuracy"}[prefer]
    order = [key] + [k for k in ("val_accuracy", "size_bytes", "latency_ms") if k != key]
    asc = [k != "val_accuracy" for k in order]
    return chosen.sort_values(order, ascending=asc, kind="stable").iloc[0]


FINAL_COLUMNS = ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms")


def final_numbers(rows: pd.DataFrame) -> pd.DataFrame:
    """Trial rows with their final (level 2) numbers in the usual columns, the search-time
    ones kept as ``search_*``, ``speedup`` against the teacher timed with the final file."""
    out = rows.copy()
    for c in FINAL_COLUMNS:
        out[f"search_{c}"] = out[c]
        out[c] = out[f"refined_{c}"]
    teacher = out["refined_teacher_latency_ms"] if "refined_teacher_latency_ms" in out else np.nan
    out["speedup"] = teacher / out["latency_ms"]
    out["numbers"] = "final"
    return out


def check_onnx_output(output: str | Path) -> Path:
    """The ``-o`` path of an artifact: an ``.onnx`` file in an existing folder."""
    out = Path(output)
    if out.suffix != ".onnx":
        raise UsageError(f"output must be an .onnx file; got {str(out)!r} (e.g. -o model.onnx)")
    if not out.parent.is_dir():
        above = next((p for p in out.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UsageError(
                f"output {out} is under {above}, which is a file, not a folder; give a path "
                "in a folder (e.g. -o model.onnx)"
            )
        raise UsageError(f"output folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UsageError(
            f"output {out} is a folder, not a file; give a file name like {out}/model.onnx"
        )
    check_writable(out.parent, "-o")
    return out


def check_writable(folder: Path, flag: str) -> None:
    """``folder`` (which exists) takes a new file: tried with a temp file, removed at once;
    else a one-line UsageError naming ``flag``. Before any work whose result goes there."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".autoslim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"{flag}: cannot write in {folder} ({e.strerror}); give a path in a writable folder"
        ) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replay(view: StudyView, trial: int, out_dir: Path) -> Path:
    """Rebuild the trial's artifact from its recorded config and the study's recipe."""
    from .study import StudySpec, build_task, evaluate

    spec = StudySpec.from_dict(view.spec)
    task = build_task(spec, progress=True)  # a missing teacher is retrained: show it
    if task.teacher.content_hash != view.teacher.get("content_hash", task.teacher.content_hash):
        raise ExportError(
            f"cannot replay trial {trial}: the cached teacher ({task.teacher.content_hash}) is "
            f"not the study's ({view.teacher.get('content_hash')}); restore the teacher checkpoint"
        )
    res = evaluate(task, view.config(trial), out_dir)
    if res["status"] != "ok":
        raise ExportError(f"replay of trial {trial} did not produce an artifact: {res['status']}")
    return out_dir / "model.onnx"


def export_trial(
    view: StudyView,
    trial: int,
    output: str | Path,
    *,
    replay: bool = False,
    refined: bool = False,
    data: Any = None,
) -> dict[str, Any]:
    """Write trial ``trial``'s artifact to ``output`` and verify it against the study's record.

    Downloads the trial's artifact from the study's store (:mod:`autoslim.store`, from any
    machine that reaches it; its SHA-256 must match the record, a changed or missing file is
    refused) or, in a study from before the store, copies the file beside the trial; ``replay``
    (or an old study's missing file) rebuilds it from the recorded config and recipe. The written
    file's size must equal the recorded size exactly and its validation accuracy must be within
    0.1 pt of the recorded value, else :class:`ExportError` and nothing is written.
    ``refined``: the artifact ``autoslim refine`` stored for the trial, checked against the
    refined record instead. ``data``: the study's dataset splits, if already loaded. Returns
    recorded vs measured values.
    """
    from .artifact import artifact_accuracy
    from .study import StudySpec

    row = view.measured_row(trial)
    if refined:
        rec = view.refined.get(trial)
        if replay or rec is None:
            raise UsageError(
                f"trial {trial} has no refined result{' to replay' if replay else ''}; run "
                f"`autoslim refine {view.cli_ref} --trial {trial}` first"
            )
        row = pd.Series(
            {
                "size_bytes": rec["size_bytes"],
                "val_accuracy": rec["val_accuracy"],
                "test_accuracy": rec["test_accuracy"],
            }
        )
    output = check_onnx_output(output)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".autoslim-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        if refined or (not replay and view.has_artifact(trial)):  # never replay a refine
            source = "refined" if refined else "stored"
            view.fetch(trial, path, refined=refined)  # verified against this digest
            digest = view.refined[trial]["sha256"] if refined else str(row["artifact_sha256"])
        else:
            source = "replayed"
            path = _replay(view, trial, Path(tmp) / "replay")
            digest = sha256_file(path)
        if data is None:
            data = StudySpec.from_dict(view.spec).load_data()
        size = path.stat().st_size
        val_acc = artifact_accuracy(path, data.val)[0]
        test_acc = artifact_accuracy(path, data.test)[0]
        result = {
            "trial": trial,
            "source": source,
            "output": str(output),
            "size_bytes": size,
            "recorded_size_bytes": int(row["size_bytes"]),
            "val_accuracy": val_acc,
            "recorded_val_accuracy": float(row["val_accuracy"]),
            "test_accuracy": test_acc,
            "recorded_test_accuracy": float(row["test_accuracy"]),
            "sha256": digest,
        }
        # a stored copy is the recorded file; a replay is what the exporter writes now
        expected = view.artifact_size(trial) if source == "replayed" else int(row["size_bytes"])
        if size != expected:
            raise ExportError(
                f"trial {trial}: the {source} artifact is {size:,} bytes but the study recorded "
                f"{expected:,}; nothing was written to {output}"
            )
        gap = abs(val_acc - result["recorded_val_accuracy"])
        if not math.isfinite(val_acc) or gap > ACCURACY_TOLERANCE:
            raise ExportError(
                f"trial {trial}: the {source} artifact's val accuracy {val_acc:.4f} differs from "
                f"the recorded {result['recorded_val_accuracy']:.4f} by more than 0.1 pt; "
                f"nothing was written to {output}"
            )
        os.replace(path, output)
    return result


def refined_records(attrs: dict[str, Any], run_dir: Path | None = None) -> dict[int, dict]:
    """Refined results by trial: the study's ``refined:NNNNN`` attributes, and for studies
    refined before those, the records stored beside the trials (``refined/NNNNN/result.json``)."""
    out: dict[int, dict] = {}
    for f in sorted((run_dir / "refined").glob("*/result.json")) if run_dir else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written record cannot exist (atomic write); skip foreign files
        out[int(rec["trial"])] = rec
    for k in sorted(attrs):
        if k.startswith(REFINED_PREFIX):
            out[int(attrs[k]["trial"])] = attrs[k]
    return out


def load_refined(attrs: dict[str, Any], run_dir: Path | None = None) -> pd.DataFrame:
    """:func:`refined_records` as a table, one row per refined trial."""
    return pd.DataFrame(list(refined_records(attrs, run_dir).values()))
