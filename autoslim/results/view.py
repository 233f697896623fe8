"""A stored study as the read side sees it: its trials, front, spec and store (StudyView, load_study)."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from .._files import sha256_file
from ..config import CompressionConfig
from ..errors import ExportError, UsageError
from ..pareto import OBJECTIVE_COLUMNS, OBJECTIVES
from ..record import OK
from ..study.spec import StudySpec, default_storage_url, runs_dir
from ..study.storage import _locate, _open, redact
from ..study.store import TrialStore, open_store
from .table import refined_records, task_info, trials_frame


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
    # opens the study's artifact store (autoslim.study.store.TrialStore) when a file is read
    store_opener: Callable[[], Any] | None = field(default=None, repr=False)
    refined: dict[int, dict[str, Any]] = field(default_factory=dict)  # refine records by trial
    # the study's "task" attribute as recorded (empty: a study from before tasks; see ``task``)
    task_record: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> dict[str, str]:
        """What the study's models are for: ``{"name", "metric", "label"}`` (e.g.
        ``segmentation``, ``miou``, ``mIoU``); a study recorded before autoslim recorded its
        task is ``classification`` by ``accuracy``. The metric's values are in the table's
        ``*_accuracy`` columns whatever the task; outputs name them by the metric
        (``results.table.metric_columns``)."""
        return task_info(self.task_record)

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
    def study_spec(self) -> StudySpec:
        """The recorded spec, typed (``spec`` is the stored dict): fields absent from a study
        recorded by an older autoslim take today's defaults, as when it resumes."""
        return StudySpec.from_dict(self.spec)

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
        if r["status"] != OK:
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

    @property
    def artifact_name(self) -> str:
        """The file name of a trial's artifact: ``model.onnx``, or ``model.pte`` in a study
        searched on ExecuTorch."""
        from ..measure.backends import backend_kind

        return f"model.{backend_kind(str(self.spec.get('backend') or 'onnxruntime-cpu'))}"

    def artifact_size(self, trial: int) -> int:
        """Bytes an export of the trial's config writes now (what a replay or refine must match).

        The recorded size, less the exporter stack traces that artifacts written before
        autoslim dropped them still carry in the stored file.
        """
        import onnx

        from ..artifact import drop_stack_traces

        size = int(self.measured_row(trial)["size_bytes"])
        stored = self.trial_dir(trial) / "model.onnx"
        if self.artifact_name == "model.onnx" and stored.is_file():
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
        local = local / self.artifact_name
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
        return (
            bool(row.get("artifact_id")) or (self.trial_dir(trial) / self.artifact_name).is_file()
        )

    def refined_dir(self, trial: int) -> Path:
        """Where ``autoslim refine`` stores the trial's refined result and artifact."""
        return self.run_dir / "refined" / f"{trial:05d}"

    @property
    def cli_ref(self) -> str:
        """How to name this study on the command line (name if in ./studies/runs, else folder)."""

        default = (runs_dir() / self.name).resolve()
        ref = self.name if self.run_dir.resolve() == default else str(self.run_dir)
        if self.storage_url != default_storage_url(self.run_dir):
            ref += f" --storage {redact(self.storage_url)}"
        return ref

    def export_command(self, trial: int, output: str | None = None) -> str:
        return (
            f"autoslim export {self.cli_ref} --trial {trial} -o {output or f'model-t{trial}.onnx'}"
        )


def param_importances(study: optuna.Study, frame) -> dict[str, dict[str, float]]:
    """PED-ANOVA importance of each sampled parameter per objective, over measured trials only.

    PED-ANOVA (Optuna's default evaluator; no scikit-learn) scores which parameters it takes to
    reach the *best* values of an objective, so maximised objectives are negated. Over-budget
    trials carry placeholder objective values and are left out.
    """
    objectives = study.user_attrs.get("spec", {}).get("objectives", ["accuracy", "latency"])
    measured = set(frame.loc[frame["status"] == OK, "trial"]) if len(frame) else set()
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
        task_record=dict(study.user_attrs.get("task") or {}),
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
