"""The task a study searches: data, teacher, bound space, backend, baseline, size glue, the BN-proxy screen."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_copy, atomic_json
from ..artifact import (
    SizeCalibration,
    artifact_accuracy,
    calibrate_size,
    estimate_size,
    latency_features,
)
from ..config import CompressionConfig
from ..data import DataSplits
from ..errors import AutoslimError
from ..measure import Latency, LatencyBackend, get_backend, host_identity
from ..measure.executorch import executorch_version
from ..measure.predictor import LatencyPredictor
from ..models import stem_and_classifier
from ..passes.distill import Recovery
from ..pipeline import build_student, compress, export, export_float
from ..space import BoundSpace, load_space
from ..teacher import Teacher, TeacherRecipe, cache_dir, evaluate_accuracy, get_teacher
from .spec import StudySpec


@dataclass
class Task:
    """What a trial needs: data, teacher, bound space, backend and baseline measurements."""

    spec: StudySpec
    data: DataSplits
    teacher: Teacher
    space: BoundSpace
    classifier: str | None
    stem: str | None
    baseline: dict[str, float] = field(default_factory=dict)
    # the teacher's latency measured by this process, with its host (see time_teacher)
    teacher_timing: dict[str, Any] = field(default_factory=dict)
    size_calibration: SizeCalibration | None = None  # see size_calibration(task)
    backend: LatencyBackend | None = None  # the study's latency backend (local or an agent)
    # set by the search runner from the measured trials; only a calibrated (usable) predictor
    predictor: LatencyPredictor | None = None
    store: Any = (
        None  # the study's artifact store (autoslim.study.store.TrialStore, set by the runner)
    )
    # measured feasible trials as (objective name -> value; latency as a ratio to the teacher)
    measured: list[dict[str, float]] = field(default_factory=list)
    # every screened candidate so far (level 0: proxy accuracy, size estimate), set by the runner
    screened: list[dict[str, float]] = field(default_factory=list)
    shapes: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict, repr=False)
    # the teacher's uniform-int8 file's latency over its fp32 file's on the study's runtime,
    # where a "runtime" weight-bits rule asked for it (0: not timed)
    int8_ratio: float = 0.0

    @property
    def latency(self) -> LatencyBackend:
        """The backend every latency of this task is measured on (made once)."""
        if self.backend is None:
            self.backend = get_backend(self.spec.backend, secret_file=self.spec.agent_secret)
        return self.backend

    @property
    def kind(self) -> str:
        """The artifact kind the study's runtime runs: ``onnx`` or ``pte`` (ExecuTorch)."""
        return getattr(self.latency, "kind", "onnx")

    @property
    def teacher_file(self) -> str:
        """The teacher's fp32 artifact's name in the study's folder."""
        return f"teacher_fp32.{self.kind}"

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.data.input_shape)

    def fingerprint(self) -> dict[str, str]:
        s = self.spec
        recovery = dataclasses.asdict(s.recovery())
        if not recovery["augment"]:  # studies stored before the option resume unchanged
            del recovery["augment"]
        fp = {
            "model": s.model,
            "teacher_hash": self.teacher.content_hash,
            "data_split": self.data.fingerprint(),
            "space": self.space.fingerprint(),
            "objectives": ",".join(s.objectives),
            "backend": s.backend,
            "runtime": self.latency.version(),  # e.g. "openvino 2026.4.1": its kernels decide
            "budget": str(s.budget),
            "recovery": json.dumps(recovery, sort_keys=True),
        }
        if self.data.task.name != "classification":  # classifiers' studies resume unchanged
            fp["task"] = self.data.task.key()
        device = getattr(self.latency, "device_identity", None)
        if device is not None:  # a device agent: resuming on another device is another study
            fp["device"] = json.dumps(device(), sort_keys=True)
        # the other constraints only when set, so studies run without them still resume
        for k in ("max_latency_ms", "max_accuracy_drop"):
            if getattr(s, k) is not None:
                fp[k] = str(getattr(s, k))
        if s.screen_images:  # which candidates are trained (level 0); the final level is not
            fp["screen"] = f"{s.screen_images} images, promote {s.promote}"
        return fp


def build_task(spec: StudySpec, *, progress: bool = True) -> Task:
    """Load data, get (or train once) the teacher and bind the space to it."""
    backend = get_backend(
        spec.backend, secret_file=spec.agent_secret
    )  # fail fast on an unavailable backend or agent, or a
    space = load_space(spec.space)  # bad space file, before minutes of teacher training
    data = spec.load_data()
    recipe = TeacherRecipe(
        epochs=spec.teacher_epochs,
        max_steps=spec.teacher_max_steps,
        batch_size=spec.teacher_batch_size,
        max_lr=spec.teacher_max_lr,
    )
    teacher = get_teacher(
        spec.model, data, recipe=recipe, checkpoint=spec.teacher_checkpoint, progress=progress
    )
    stem, classifier = stem_and_classifier(spec.model, teacher.model)
    example = torch.zeros(1, *data.input_shape)
    bound = space.bind(teacher.model, example, classifier=classifier, stem=stem)
    task = Task(spec, data, teacher, bound, classifier, stem, backend=backend)
    if space.runtime_bits:  # weight bits the runtime runs well: int8, or int8 and fp32
        precisions = runtime_precisions(task)
        if precisions != (8,):
            task.space = space.bind(
                teacher.model, example, classifier=classifier, stem=stem, precisions=precisions
            )
            task.shapes.clear()
    return task


LEGACY_DEFAULT = "default-int8"  # the default space before weight_bits = "runtime"


def adopt_legacy_space(task: Task, stored: dict[str, str] | None = None) -> bool:
    """Bind the earlier int8-only default space where the study of ``task`` (its spec asks for
    ``default``) was made with it: ``stored`` is the study's recorded fingerprint (default:
    read from its storage, if it exists). True when the task now has the legacy space."""
    if task.spec.space != "default":
        return False
    if stored is None:
        from .storage import _existing_study

        study = _existing_study(task.spec)
        stored = study.user_attrs.get("fingerprint") if study is not None else None
    if not stored or stored.get("space") in (None, task.space.fingerprint()):
        return False
    example = torch.zeros(1, *task.data.input_shape)
    legacy = load_space(LEGACY_DEFAULT).bind(
        task.teacher.model, example, classifier=task.classifier, stem=task.stem
    )
    if stored["space"] != legacy.fingerprint():
        return False
    task.space, task.shapes = legacy, {}
    return True


def teacher_artifact(task: Task) -> Path:
    """The teacher's fp32 artifact of the study's kind, exported once per teacher, kind and
    exporter versions into the cache (the export is deterministic: every study of the teacher,
    its baseline, its size calibration and its runtime probe share the file)."""
    path = cache_dir() / "teacher-files" / f"{_cache_key(task, 'fp32')}.{task.kind}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
            res = export_float(
                task.teacher.model, Path(tmp) / path.name, example=task.example, kind=task.kind
            )
            os.replace(res.path, path)
    return path


def measure_baseline(task: Task, out_dir: Path) -> dict[str, float]:
    """The teacher as an fp32 ONNX artifact: size, val/test accuracy, latency (same backend).

    Also sets ``task.teacher_timing`` (the latency a trial's speed-up is computed against).
    """
    path = out_dir / task.teacher_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_copy(teacher_artifact(task), path)
    task.baseline = {
        "size_bytes": path.stat().st_size,
        "val_accuracy": artifact_accuracy(path, task.data.val)[0],
        "test_accuracy": artifact_accuracy(path, task.data.test)[0],
        "latency_ms": time_teacher(task, out_dir),
    }
    return task.baseline


def time_teacher(task: Task, out_dir: Path) -> float:
    """Time the teacher's fp32 file now, in this process, on the study's backend.

    Exports ``out_dir/teacher_fp32.onnx`` (``.pte`` for ExecuTorch) if missing. The result, with the host it was measured
    on, becomes ``task.teacher_timing``: the denominator of the speed-ups of the trials this
    process runs next (timings of other runs or machines are never mixed in).
    """
    path = out_dir / task.teacher_file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(teacher_artifact(task), path)
    lat = task.latency.measure(
        path,
        input_shape=task.data.input_shape,
        runs=task.spec.latency_runs,
    )
    # the device that timed it: this host, or the agent's (a remote backend fills lat.device)
    task.teacher_timing = {"latency_ms": lat.median_ms, **(lat.device or host_identity())}
    return lat.median_ms


def time_candidate(task: Task, path: Path, *, run_dir: Path | None = None) -> tuple[Latency, float]:
    """Time ``path`` on the study's backend paired with the teacher's fp32 file (blocks of the
    two interleaved: see :mod:`autoslim.measure.latency`); return the measurement and the
    latency of record: the paired ratio times the teacher's timing in this process
    (``task.teacher_timing``), which a machine's slow spells move far less than either time."""
    run_dir = run_dir or task.spec.run_dir
    teacher = run_dir / task.teacher_file
    if not task.teacher_timing or not teacher.is_file():
        time_teacher(task, run_dir)
    lat = task.latency.measure(
        path, input_shape=task.data.input_shape, runs=task.spec.latency_runs, reference=teacher
    )
    return lat, (lat.ratio or lat.median_ms / lat.reference_ms) * task.teacher_timing["latency_ms"]


def size_calibration(task: Task) -> SizeCalibration:
    """The architecture's graph bytes, measured on two files of the unpruned teacher (fp32, and
    uniform int8 with no training): a few seconds once per teacher, then read from the cache
    (every worker and every resume of a study reuses it). The fp32 file is the study's
    ``teacher_fp32.onnx`` where the baseline already wrote it."""
    if task.size_calibration is None:
        _references(task, timed=False)
    assert task.size_calibration is not None
    return task.size_calibration


# int8 must run at most this share of fp32's latency (the teacher's uniform-int8 file against
# its fp32 file, on the study's runtime) for "runtime" weight bits to be int8 only
INT8_GAIN = 0.5


def runtime_precisions(task: Task) -> tuple[int, ...]:
    """The weight precisions a ``weight_bits = "runtime"`` rule offers on the study's runtime:
    ``(8,)`` where the teacher's uniform-int8 file runs in at most ``INT8_GAIN`` of its fp32
    file's latency there, else ``(8, 32)`` (int8 buys too little speed on this runtime and CPU
    for it to be the only choice: each stage may stay float). Timed once per teacher, runtime
    and device (paired, by the protocol), then read from the cache; the ratio is kept in
    ``task.int8_ratio``."""
    ratio = _references(task, timed=True)
    return (8,) if ratio <= INT8_GAIN else (8, 32)


def _cache_key(task: Task, *extra: object) -> str:
    import onnx
    import onnxruntime

    key = json.dumps(
        [
            1,  # the cached records' own format
            task.teacher.content_hash,
            list(task.data.input_shape),
            task.kind,
            executorch_version() if task.kind == "pte" else None,
            torch.__version__,
            onnx.__version__,
            onnxruntime.__version__,
            *extra,
        ],
        default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(obj: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(obj, path)
    except OSError:
        pass  # a read-only cache: measured again next time


def _references(task: Task, *, timed: bool) -> float:
    """Export the unpruned teacher as fp32 and as uniform int8 (no training) where the cache
    lacks what they give: the size calibration (``task.size_calibration``) and, with
    ``timed``, the int8/fp32 latency ratio on the study's runtime (returned; else 0)."""
    int8 = task.space.to_config(task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8))
    root = cache_dir() / "size-calibration"
    cal_file = root / f"{_cache_key(task, int8.to_json())}.json"
    device = getattr(task.latency, "device_identity", None)
    where = device() if device is not None else host_identity()
    ratio_file = (
        root
        / f"{_cache_key(task, int8.to_json(), task.spec.backend, task.latency.version(), where.get('cpu'), where.get('host'))}.ratio.json"
    )
    if task.size_calibration is None:
        got = _read_json(cal_file)
        try:
            task.size_calibration = SizeCalibration(**got) if got else None
        except TypeError:
            task.size_calibration = None
    ratio = (_read_json(ratio_file) or {}).get("int8_ratio") if timed else 0.0
    if task.size_calibration is not None and ratio is not None:
        task.int8_ratio = ratio or task.int8_ratio
        return float(ratio)
    with tempfile.TemporaryDirectory(prefix="autoslim-size-") as tmp:
        ext = task.kind
        f32, f8 = teacher_artifact(task), Path(tmp) / f"int8.{ext}"
        c = compress(
            task.teacher.model,
            int8,
            data=task.data,
            recovery=Recovery(steps=0, bn_batches=0),
            classifier=task.classifier,
            stem=task.stem,
        )
        export(c, f8, kind=ext)
        if task.size_calibration is None:
            task.size_calibration = calibrate_size(
                task.teacher.model, fp32_file=f32, int8_file=f8, int8_config=int8
            )
            _write_json(dataclasses.asdict(task.size_calibration), cal_file)
        if timed and ratio is None:
            lat = task.latency.measure(
                f8, input_shape=task.data.input_shape, runs=task.spec.latency_runs, reference=f32
            )
            ratio = lat.ratio or lat.median_ms / lat.reference_ms
            _write_json({"int8_ratio": ratio, "device": where}, ratio_file)
    task.int8_ratio = float(ratio or task.int8_ratio)
    return float(ratio or 0.0)


def shape(task: Task, config: CompressionConfig) -> tuple[int, dict[str, float]]:
    """The analytic artifact size of ``config`` and its latency features
    (:func:`~autoslim.artifact.latency_features`), from a pruned and factorised copy of the
    teacher (no training): ~0.5 s, memoised per config. The size is calibrated on the
    architecture's own files (:func:`size_calibration`)."""
    key = config.to_json()
    if key not in task.shapes:
        calibration = size_calibration(task)
        # the pipeline's own passes, in its one order (prune, then low-rank), no training
        m, _, factorized = build_student(
            task.teacher.model,
            config,
            example=task.example,
            classifier=task.classifier,
            stem=task.stem,
        )
        size = estimate_size(m, config, factorized=factorized, calibration=calibration)
        feats = latency_features(m, config, example=task.example, factorized=factorized)
        if len(task.shapes) > 256:
            task.shapes.clear()
        task.shapes[key] = (size, feats)
    return task.shapes[key]


def estimate(task: Task, config: CompressionConfig) -> int:
    """Analytic artifact size of ``config`` in bytes (see :func:`shape`)."""
    return shape(task, config)[0]


def _dominated(task: Task, accuracy: float, size: int, ratio_low: float) -> bool:
    """Whether a measured feasible trial is at least as good on every objective, and better on
    one, with this candidate's latency (a ratio to the teacher) at its optimistic bound."""
    objectives = task.spec.objectives
    me = {"accuracy": -accuracy, "size": float(size), "latency": ratio_low}
    for p in task.measured:
        other = {"accuracy": -p["accuracy"], "size": p["size"], "latency": p["latency"]}
        if all(other[o] <= me[o] for o in objectives) and any(other[o] < me[o] for o in objectives):
            return True
    return False


class CandidateFailed(AutoslimError):
    """A candidate could not be turned into a verified artifact (recorded, study continues)."""


SCREEN_IMAGES = 1000


def screen(task: Task, config: CompressionConfig) -> float:
    """Level 0, the BN proxy: accuracy of the compressed candidate with no training (pruned,
    factorised, BN statistics re-estimated, fake-quantised and calibrated) on the first
    ``screen_images`` validation images (:data:`SCREEN_IMAGES` if the study screens none),
    in PyTorch. A few seconds."""
    c = compress(
        task.teacher.model,
        config,
        data=task.data,
        recovery=dataclasses.replace(task.spec.recovery(), steps=0),
        classifier=task.classifier,
        stem=task.stem,
    )
    n = task.spec.screen_images or SCREEN_IMAGES  # sensitivity probes on a study without level 0
    return evaluate_accuracy(c.model, task.data.val.subset(n))
