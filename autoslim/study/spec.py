"""The study spec: everything that defines a study, read from a TOML file and flags (no torch)."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import shipped_dir
from ..errors import ConfigError, UsageError
from ..pareto import OBJECTIVES
from ..units import is_no_limit, parse_latency_ms, parse_size

if TYPE_CHECKING:  # torch-side types; the spec itself imports no torch
    from ..data import DataSplits
    from ..passes.distill import Recovery

# shipped study files: package data (importlib.resources), so an installed wheel has them
STUDIES_DIR = shipped_dir("studies")


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
    # what the model is for: None (the dataset's own task: classification, or segmentation for
    # fashion-mnist-seg and maskfolder:), "classification", "segmentation", or a user's
    # "path/to/file.py:factory" returning an autoslim.tasks.Task
    task: str | None = None
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
    # a Task object given to autoslim.search(task=...): used in this process, never stored
    # (the study records ``task = "object:NAME"``)
    task_object: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        check_study_name(self.name)
        for k, low in _MIN_VALUES.items():
            v = getattr(self, k)
            if v is not None and not v >= low:
                raise ConfigError(f"{k} must be >= {low}; got {v!r}")
        for k, high in MAX_VALUES.items():
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
        """The dataset splits this study searches on (same split every time), for the study's
        task (a user task may bring its own dataset: :meth:`autoslim.tasks.Task.load_data`)."""
        from ..data import load_dataset
        from ..tasks import BUILTIN_TASKS, load_task

        user = self.task_object
        if user is None and self.task is not None and self.task.startswith("object:"):
            raise UsageError(
                f"study {self.name!r} was searched with a Python task object "
                f"({self.task[7:]}); pass the same object again (autoslim.search(..., "
                "task=...)), or give the task as a file: --task path/to/file.py:factory"
            )
        if user is None and self.task is not None and self.task not in BUILTIN_TASKS:
            user = load_task(self.task, num_classes=None)
        if user is not None:
            own = user.load_data(
                data_dir=self.data_dir,
                val_size=self.val_size,
                seed=self.split_seed,
                limit_train=self.limit_train,
                limit_test=self.limit_test,
                image_size=self.image_size,
            )
            if own is not None:
                return own if own.task is user else own.with_task(user)
        data = load_dataset(
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
        if user is not None:
            return data.with_task(user)
        if self.task is not None and self.task != data.task.name:
            raise UsageError(
                f"task {self.task} does not fit dataset {self.dataset}, whose targets are for "
                f"{data.task.name}; use a {self.task} dataset (e.g. "
                f"{'fashion-mnist-seg' if self.task == 'segmentation' else 'fashion-mnist'}) or "
                "drop --task"
            )
        return data

    def recovery(self) -> Recovery:
        from ..passes.distill import Recovery

        return Recovery(
            steps=self.recovery_steps,
            batch_size=self.recovery_batch_size,
            lr=self.recovery_lr,
            subset=self.recovery_subset,
            seed=self.seed,
            augment=self.recovery_augment,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "task_object"  # an object, never stored
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySpec:
        """The spec a study recorded (keys of older versions that no longer exist are ignored;
        a name recorded before names were checked is kept as it was)."""
        values = {k: v for k, v in d.items() if k in _FIELDS}
        name = values.pop("name", "default")
        spec = cls(**values)
        spec.name = name
        return spec


_FIELDS = {f.name for f in dataclasses.fields(StudySpec)} - {"task_object"}


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
MAX_VALUES = {
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
