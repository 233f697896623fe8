"""Study definitions (TOML files), the task they describe, and one trial's evaluation.

A study file names the model, dataset, teacher recipe, search space, objectives, budgets,
latency backend, trial count and recovery fidelity. ``autoslim search`` with no file uses the
shipped ``default`` study (package data, ``autoslim/resources/studies/default.toml``); CLI
flags override file values. Outputs go to ``./studies/runs/NAME/`` under the current directory (or
``out_dir``): the Optuna storage, the artifact store, one folder per trial, tables, plots.

:func:`evaluate` is the one runner of a candidate: size pre-check (analytic, before training)
-> [BN-proxy screen and promotion, with fidelity levels] -> compress -> recover -> export ->
measure on the artifact. It returns plain data and never
imports Optuna, so other workers or a remote agent can run it the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .artifact import (
    SizeCalibration,
    artifact_accuracy,
    calibrate_size,
    estimate_size,
    export_onnx,
    latency_features,
)
from .config import CompressionConfig
from .data import DataSplits, load_dataset
from .errors import AutoslimError, ConfigError, UsageError
from .measure import Latency, LatencyBackend, get_backend, host_identity
from .measure.predictor import LatencyPredictor
from .models import stem_and_classifier
from .pareto import OBJECTIVES, promoted
from .passes.distill import Recovery
from .passes.lowrank import factorize_model
from .passes.prune import prune_model
from .pipeline import compress, export
from .results import sha256_file
from .space import BoundSpace, load_space
from .teacher import Teacher, TeacherRecipe, evaluate_accuracy, get_teacher
from .units import is_no_limit, parse_latency_ms, parse_size

__all__ = [
    "StudySpec",
    "Task",
    "load_study_spec",
    "build_task",
    "evaluate",
    "default_storage_url",
    "time_teacher",
    "time_candidate",
    "shape",
    "STUDIES_DIR",
    "runs_dir",
    "check_study_name",
]

# shipped study files: package data (importlib.resources), so an installed wheel has them
STUDIES_DIR = Path(str(resources.files("autoslim") / "resources" / "studies"))


def runs_dir() -> Path:
    """Where studies without ``out_dir`` live: ``./studies/runs`` under the current directory."""
    return Path.cwd() / "studies" / "runs"


SAMPLERS = ("tpe", "nsga2", "random")


def default_storage_url(run_dir: Path) -> str:
    """The Optuna storage of a study folder when no ``--storage`` is given: its SQLite file."""
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


@dataclass
class StudySpec:
    """Everything that defines a study. Plain data; fields mirror the TOML keys."""

    name: str = "default"
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int = 5000
    split_seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None  # first N test images only (the test split only reports)
    image_size: int | None = None  # imagefolder: resize + center-crop every image to this
    resize: int | None = None  # imagefolder: shorter side before the crop (image_size * 8 / 7)
    bad_images: str = "refuse"  # imagefolder: unreadable files refused, or "skip"ped
    stream: bool | None = None  # imagefolder: decode from files per batch (None: when large)
    teacher_checkpoint: str | None = None
    teacher_epochs: int = 6
    teacher_max_steps: int | None = None
    teacher_batch_size: int = 128
    teacher_max_lr: float = 0.1
    space: str = "default"
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "latency"])
    budget: int | None = None
    max_latency_ms: float | None = None
    max_accuracy_drop: float | None = None
    backend: str = "onnxruntime-cpu"
    agent_secret: str | None = None  # remote backend: the secret file's path (never its content)
    trials: int = 25
    sampler: str = "tpe"
    seed: int = 0
    recovery_steps: int = 150
    recovery_batch_size: int = 128
    recovery_lr: float = 0.01
    recovery_subset: int = 5000
    recovery_augment: bool = False  # KD on augmented batches, teacher run on each (no cache)
    latency_runs: int = 200
    # learn latency from the measured trials: pre-check max_latency_ms before training, skip
    # measuring candidates it confidently puts behind a measured one (used once calibrated)
    latency_predictor: bool = True
    gate_images: int = 1000
    gate_agreement: float = 0.99  # artifact vs PyTorch top-1 agreement required
    storage: str | None = None
    out_dir: str | None = None
    # where trial and refined ONNX files go (optuna.artifacts): a folder every worker can
    # read (default: OUT_DIR/artifacts) or s3://BUCKET; not part of the fingerprint
    artifacts: str | None = None
    # many workers on one study: K processes on this machine (each joins the same storage);
    # torch threads of each (None: this process's cores / workers); the RDB heartbeat
    workers: int = 1
    threads: int | None = None
    heartbeat_s: int = 30  # a trial whose process stops beating for 2x this is failed, retried
    # fidelity levels ([fidelity] in a study file). Level 0: every candidate is screened by the
    # BN proxy (pruned + quantised, BN statistics re-estimated, no training; its accuracy on
    # screen_images validation images; 0: off) and only the promote share of them, by
    # non-dominated rank of (proxy accuracy, size) among all screened so far, is trained.
    # Level 1: the recovery above. Level 2, after the trials: the final recovery (the refine
    # recipe: final_epochs of KD over the training split, QAT at the end) of up to
    # final_points trials of the level-1 front; the final front is made of those.
    screen_images: int = 0
    promote: float = 1.0
    final_points: int = 0
    final_epochs: int = 5
    final_steps_per_epoch: int | None = None  # cap an epoch (quick runs)
    # the final recovery's distillation loss (None: each trial's own sampled settings)
    final_temperature: float | None = None
    final_alpha: float | None = None

    def __post_init__(self) -> None:
        self._check_types()
        check_study_name(self.name)
        for k, low in _MIN_VALUES.items():
            v = getattr(self, k)
            if v is not None and not v >= low:
                raise ConfigError(f"{k} must be >= {low}; got {v!r}")
        for k, high in _MAX_VALUES.items():
            v = getattr(self, k)
            if v is not None and v > high:
                raise ConfigError(f"{k} must be <= {high:,}; got {v!r} (an upper bound of sanity)")
        if not 0 < self.gate_agreement <= 1:
            raise ConfigError(f"gate_agreement is a fraction in (0, 1]; got {self.gate_agreement}")
        if self.final_temperature is not None and not 0 < self.final_temperature <= 100:
            raise ConfigError(
                f"final_temperature must be in (0, 100]; got {self.final_temperature}"
            )
        if self.final_alpha is not None and not 0 <= self.final_alpha <= 1:
            raise ConfigError(f"final_alpha must be in [0, 1]; got {self.final_alpha}")
        for k in ("teacher_max_lr", "recovery_lr", "max_latency_ms"):
            v = getattr(self, k)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{k} must be a number > 0; got {v!r}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(
                f"objectives must be distinct names from {list(OBJECTIVES)}; got {self.objectives}"
            )
        if "accuracy" not in self.objectives:
            raise ConfigError(f"objectives must include 'accuracy'; got {self.objectives}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}; got {self.sampler!r}")
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1; got {self.trials}")
        if not 0 < self.promote <= 1:
            raise ConfigError(
                f"promote is the share of screened candidates trained, in (0, 1]; got "
                f"{self.promote}"
            )
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise ConfigError(
                f"max_accuracy_drop is a fraction in [0, 1] (0.01 = 1 pt); "
                f"got {self.max_accuracy_drop}"
            )

    def _check_types(self) -> None:
        """Each field's value has the field's type (a study file can hold anything)."""
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), str(f.type)
            if v is None and "None" in t:
                continue
            if t.startswith("int") or t.startswith("float"):
                ok = isinstance(v, int | float) if t.startswith("float") else isinstance(v, int)
                if isinstance(v, bool) or not ok:
                    raise ConfigError(
                        f"{f.name} must be {'an integer' if t.startswith('int') else 'a number'}"
                        f"; got {v!r}"
                    )
            elif t.startswith("bool") and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false; got {v!r}")
            elif t.startswith("str") and not isinstance(v, str):
                raise ConfigError(f"{f.name} must be a string; got {v!r}")
            elif t.startswith("list") and not (
                isinstance(v, list) and all(isinstance(x, str) for x in v)
            ):
                raise ConfigError(f"{f.name} must be a list of names; got {v!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else runs_dir() / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.run_dir)

    def load_data(self) -> DataSplits:
        """The dataset splits this study searches on (same split every time)."""
        return load_dataset(
            self.dataset,
            data_dir=self.data_dir,
            val_size=self.val_size,
            seed=self.split_seed,
            limit_train=self.limit_train,
            limit_test=self.limit_test,
            image_size=self.image_size,
            resize=self.resize,
            bad_images=self.bad_images,
            stream=self.stream,
        )

    def recovery(self) -> Recovery:
        return Recovery(
            steps=self.recovery_steps,
            batch_size=self.recovery_batch_size,
            lr=self.recovery_lr,
            subset=self.recovery_subset,
            seed=self.seed,
            augment=self.recovery_augment,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySpec:
        """The spec a study recorded (keys of older versions that no longer exist are ignored;
        a name recorded before names were checked is kept as it was)."""
        values = {k: v for k, v in d.items() if k in _FIELDS}
        name = values.pop("name", "default")
        spec = cls(**values)
        spec.name = name
        return spec


_FIELDS = {f.name for f in dataclasses.fields(StudySpec)}
# lower bounds of the numeric fields (None: unset, allowed where the field is optional)
_MIN_VALUES = {
    "val_size": 1,
    "split_seed": 0,
    "limit_train": 1,
    "limit_test": 1,
    "image_size": 8,
    "resize": 8,
    "teacher_epochs": 1,
    "teacher_max_steps": 1,
    "teacher_batch_size": 1,
    "budget": 1,
    "seed": 0,
    "recovery_steps": 0,
    "recovery_batch_size": 1,
    "recovery_subset": 1,
    "latency_runs": 1,
    "gate_images": 1,
    "workers": 1,
    "threads": 1,
    "heartbeat_s": 1,
    "screen_images": 0,
    "final_points": 0,
    "final_epochs": 1,
    "final_steps_per_epoch": 1,
}


# upper bounds of sanity: a typo of a few zeros is refused instead of running for years
_MAX_VALUES = {
    "trials": 100_000,
    "teacher_epochs": 1_000,
    "teacher_max_steps": 10_000_000,
    "teacher_batch_size": 65_536,
    "recovery_steps": 10_000_000,
    "recovery_batch_size": 65_536,
    "latency_runs": 1_000_000,
    "gate_images": 10_000_000,
    "workers": 256,
    "threads": 1_024,
    "heartbeat_s": 86_400,
    "screen_images": 10_000_000,
    "final_points": 1_000,
    "final_epochs": 1_000,
    "image_size": 4_096,
    "resize": 4_096,
}

# a study name is a label, one path component of safe characters (it names studies/runs/NAME)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(name: object) -> str:
    """``name`` if it is a valid study name (1-100 of ``A-Z a-z 0-9 . _ -``, starting with a
    letter or digit: one folder under ``studies/runs/``, never a path); else a UsageError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"name must be a study name of 1-100 letters, digits, '.', '_' or '-' that starts "
            f"with a letter or digit (it names the folder studies/runs/NAME); got {name!r}: "
            "pass e.g. --name my-study, and --out-dir to choose the folder"
        )
    return name


def load_study_spec(path: str | Path | None = None, **overrides: Any) -> StudySpec:
    """Read a study TOML and apply non-None ``overrides``.

    ``path``: a file, or the name of a shipped study (``default`` when None).
    """
    p = Path(path) if path else STUDIES_DIR / "default.toml"
    if not p.is_file() and not p.suffix and (STUDIES_DIR / f"{p}.toml").is_file():
        p = STUDIES_DIR / f"{p}.toml"
    values: dict[str, Any] = {}
    if p.is_file():
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        flat: dict[str, Any] = {}
        for k, v in raw.items():
            if isinstance(v, dict) and k in ("teacher", "recovery"):
                flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
            elif isinstance(v, dict) and k == "fidelity":  # its keys are fields as they are
                flat.update(v)
            else:
                flat[k] = v
        unknown = sorted(set(flat) - _FIELDS)
        if unknown:
            raise ConfigError(f"{p}: unknown keys {unknown}; expected some of {sorted(_FIELDS)}")
        values.update(flat)
        values.setdefault("name", p.stem)
    elif path is not None:
        shipped = sorted(x.stem for x in STUDIES_DIR.glob("*.toml"))
        raise UsageError(
            f"study file {path} not found; give a TOML file or a shipped study name {shipped}"
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("budget", "max_latency_ms", "max_accuracy_drop"):  # "none" lifts a file's limit
        if is_no_limit(values.get(k)):
            values[k] = None
    flags = {k for k, v in overrides.items() if v is not None}

    def where(key: str | None = None) -> str:  # name the file when the value came from it
        return f"{p}: " if p.is_file() and (key is None or key not in flags) else ""

    for k, parse in (("budget", parse_size), ("max_latency_ms", parse_latency_ms)):
        if values.get(k) is not None:
            try:
                values[k] = parse(values[k])
            except UsageError as e:
                raise ConfigError(f"{where(k)}{k}: {e}") from e
    try:
        return StudySpec(**values)
    except TypeError as e:
        raise ConfigError(f"{where()}study: {e}") from e
    except ConfigError as e:
        bad = str(e).split(" ", 1)[0]  # messages start with the field's name
        raise ConfigError(f"{where(bad)}{e}") from e


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
    store: Any = None  # the study's artifact store (autoslim.store.TrialStore, set by the runner)
    # measured feasible trials as (objective name -> value; latency as a ratio to the teacher)
    measured: list[dict[str, float]] = field(default_factory=list)
    # every screened candidate so far (level 0: proxy accuracy, size estimate), set by the runner
    screened: list[dict[str, float]] = field(default_factory=list)
    shapes: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict, repr=False)

    @property
    def latency(self) -> LatencyBackend:
        """The backend every latency of this task is measured on (made once)."""
        if self.backend is None:
            self.backend = get_backend(self.spec.backend, secret_file=self.spec.agent_secret)
        return self.backend

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
            "budget": str(s.budget),
            "recovery": json.dumps(recovery, sort_keys=True),
        }
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
    bound = space.bind(
        teacher.model, torch.zeros(1, *data.input_shape), classifier=classifier, stem=stem
    )
    return Task(spec, data, teacher, bound, classifier, stem, backend=backend)


def measure_baseline(task: Task, out_dir: Path) -> dict[str, float]:
    """The teacher as an fp32 ONNX artifact: size, val/test accuracy, latency (same backend).

    Also sets ``task.teacher_timing`` (the latency a trial's speed-up is computed against).
    """
    path = out_dir / "teacher_fp32.onnx"
    res = export_onnx(copy.deepcopy(task.teacher.model), path, example=task.example)
    task.baseline = {
        "size_bytes": res.size_bytes,
        "val_accuracy": artifact_accuracy(path, task.data.val)[0],
        "test_accuracy": artifact_accuracy(path, task.data.test)[0],
        "latency_ms": time_teacher(task, out_dir),
    }
    return task.baseline


def time_teacher(task: Task, out_dir: Path) -> float:
    """Time the teacher's fp32 file now, in this process, on the study's backend.

    Exports ``out_dir/teacher_fp32.onnx`` if missing. The result, with the host it was measured
    on, becomes ``task.teacher_timing``: the denominator of the speed-ups of the trials this
    process runs next (timings of other runs or machines are never mixed in).
    """
    path = out_dir / "teacher_fp32.onnx"
    if not path.is_file():
        export_onnx(copy.deepcopy(task.teacher.model), path, example=task.example)
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
    teacher = run_dir / "teacher_fp32.onnx"
    if not task.teacher_timing or not teacher.is_file():
        time_teacher(task, run_dir)
    lat = task.latency.measure(
        path, input_shape=task.data.input_shape, runs=task.spec.latency_runs, reference=teacher
    )
    return lat, (lat.ratio or lat.median_ms / lat.reference_ms) * task.teacher_timing["latency_ms"]


def size_calibration(task: Task) -> SizeCalibration:
    """The architecture's graph bytes, measured once per task on two files of the unpruned
    teacher (fp32, and uniform int8 with no training): a few seconds, then cached. The fp32
    file is the study's ``teacher_fp32.onnx`` where the baseline already wrote it."""
    if task.size_calibration is None:
        int8 = task.space.to_config(task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8))
        with tempfile.TemporaryDirectory(prefix="autoslim-size-") as tmp:
            f32, f8 = task.spec.run_dir / "teacher_fp32.onnx", Path(tmp) / "int8.onnx"
            if not f32.is_file():
                f32 = Path(tmp) / "fp32.onnx"
                export_onnx(copy.deepcopy(task.teacher.model), f32, example=task.example)
            c = compress(
                task.teacher.model,
                int8,
                data=task.data,
                recovery=Recovery(steps=0, bn_batches=0),
                classifier=task.classifier,
                stem=task.stem,
            )
            export(c, f8)
            task.size_calibration = calibrate_size(
                task.teacher.model, fp32_file=f32, int8_file=f8, int8_config=int8
            )
    return task.size_calibration


def shape(task: Task, config: CompressionConfig) -> tuple[int, dict[str, float]]:
    """The analytic artifact size of ``config`` and its latency features
    (:func:`~autoslim.artifact.latency_features`), from a pruned and factorised copy of the
    teacher (no training): ~0.5 s, memoised per config. The size is calibrated on the
    architecture's own files (:func:`size_calibration`)."""
    key = config.to_json()
    if key not in task.shapes:
        calibration = size_calibration(task)
        m = copy.deepcopy(task.teacher.model)
        prune_model(m, config, example=task.example, classifier=task.classifier)
        rep = factorize_model(m, config, skip=(task.stem,) if task.stem else ())
        factorized = {t["layer"] for t in rep.touched}
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


def evaluate(
    task: Task, config: CompressionConfig, trial_dir: Path, *, promote: bool = False
) -> dict[str, Any]:
    """Run one candidate end to end and return its measurements as plain data.

    With screening on (``screen_images``), a candidate is screened first (:func:`screen`) and
    trained only if promoted (:func:`autoslim.pareto.promoted`: non-dominated rank, then crowding
    distance, of (proxy accuracy, size estimate) among
    ``task.screened``, within the ``promote`` share, or always with ``promote=True`` (the
    baselines); otherwise ``status='screened'``.

    Over-budget candidates (by the analytic estimate) return ``status='over_budget'`` before
    any training; with a calibrated ``task.predictor``, candidates it puts over
    ``max_latency_ms`` even at their optimistic bound return ``status='over_latency'``, and a
    trained candidate that a measured trial beats even at that bound is not timed
    (``latency_source='predicted'``). Failures raise :class:`CandidateFailed` with a diagnosis.
    """
    spec, t0 = task.spec, time.perf_counter()
    est, feats = shape(task, config)
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "summary": config.summary(),
        "size_estimate": est,
        "latency_features": feats,
    }
    if spec.budget is not None and est > spec.budget:
        out.update(status="over_budget", seconds=round(time.perf_counter() - t0, 2))
        return out
    teacher_ms = task.teacher_timing.get("latency_ms")
    ratio_low = None  # the predictor's optimistic latency ratio, when one is calibrated
    if task.predictor is not None and task.predictor.calibration is not None and teacher_ms:
        ratio = float(task.predictor.predict([feats])[0])
        ratio_low = ratio / (1 + task.predictor.calibration.margin)
        out["latency_predicted_ms"] = ratio * teacher_ms
        if spec.max_latency_ms is not None and ratio_low * teacher_ms > spec.max_latency_ms:
            out.update(status="over_latency", seconds=round(time.perf_counter() - t0, 2))
            return out
    if spec.screen_images:
        try:
            acc = screen(task, config)
        except (FloatingPointError, RuntimeError) as e:
            raise CandidateFailed(f"screening failed: {type(e).__name__}: {e}") from e
        out["screen_accuracy"] = acc
        points = [[p["accuracy"], p["size"]] for p in task.screened] + [[acc, est]]
        if not promote and not promoted(points, ["maximize", "minimize"], spec.promote):
            out.update(status="screened", seconds=round(time.perf_counter() - t0, 2))
            return out
    try:
        c = compress(
            task.teacher.model,
            config,
            data=task.data,
            recovery=spec.recovery(),
            teacher_key=task.teacher.content_hash,
            classifier=task.classifier,
            stem=task.stem,
        )
    except (FloatingPointError, RuntimeError) as e:
        raise CandidateFailed(f"compression/recovery failed: {type(e).__name__}: {e}") from e
    trial_dir.mkdir(parents=True, exist_ok=True)
    path = trial_dir / "model.onnx"
    try:
        res = export(
            c, path, check=task.data.val.subset(spec.gate_images), min_agreement=spec.gate_agreement
        )
    except AutoslimError as e:
        raise CandidateFailed(str(e)) from e
    val_acc, _ = artifact_accuracy(path, task.data.val)
    test_acc, _ = artifact_accuracy(path, task.data.test)
    if not math.isfinite(val_acc):
        raise CandidateFailed("validation accuracy is NaN")
    (trial_dir / "config.json").write_text(config.to_json())
    (trial_dir / "reports.json").write_text(json.dumps(c.report_dict(), indent=1, default=str))
    common = dict(
        status="ok",
        val_accuracy=val_acc,
        test_accuracy=test_acc,
        size_bytes=res.size_bytes,
        teacher_latency_ms=teacher_ms,
        agreement=res.agreement,
        exporter=res.exporter,  # "dynamo" unless the fallback exporters were needed
        num_params=c.num_params(),
        artifact=str(path),
        artifact_sha256=sha256_file(path),
        recovery_loss=c.recovery_loss,
        skipped_layers=sum(len(r.skipped) for r in c.reports) + len(res.skipped),
    )
    if ratio_low is not None and _dominated(task, val_acc, res.size_bytes, ratio_low):
        # behind a measured trial even at its most optimistic latency: not measured (the
        # predicted latency is stored, marked as such, and never makes the front)
        out.update(
            common,
            latency_ms=out["latency_predicted_ms"],
            latency_source="predicted",
            seconds=round(time.perf_counter() - t0, 2),
        )
        return out
    lat, latency_ms = time_candidate(task, path)
    out.update(
        common,
        latency_ms=latency_ms,  # paired ratio x teacher_latency_ms (time_candidate)
        latency_source="measured",
        latency_ratio=lat.ratio,
        latency_raw_ms=lat.median_ms,  # the file's own median, unpaired
        latency_reference_ms=lat.reference_ms,
        latency_p90_ms=lat.p90_ms,
        latency_ci_ms=[lat.ci_low_ms, lat.ci_high_ms],
        latency_runs=lat.runs,
        latency_cold_ms=lat.cold_ms,
        latency_noise="; ".join(lat.noise),  # empty: not noisy
        # where it was measured (the speed-up is against teacher_latency_ms, same device)
        host=task.teacher_timing.get("host"),
        cpu=task.teacher_timing.get("cpu"),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return out
