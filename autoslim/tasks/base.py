"""The task protocol: everything that depends on what a model is *for*.

A :class:`Task` owns the loss that trains the teacher, the distillation loss (with the searched
temperature), the metric (named, higher is better), the correctness gate's agreement measure
between the exported file and the trained model, what targets look like and whether the
teacher's outputs may be cached. Compression passes, export, latency and the search never look
inside a model's outputs: they hand them to the task.

Outputs are turned into compact per-sample *predictions* (:meth:`Task.predictions`: class ids,
argmax maps, decoded boxes) batch by batch, so a metric over thousands of dense outputs never
holds them all; the metric (:meth:`Task.score`) and the gate (:meth:`Task.agreement`) read
predictions only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

__all__ = ["Task", "CACHE_BYTES"]

# teacher outputs of a recovery subset are cached (fp16) up to this size; above it the teacher
# runs on each recovery batch instead (11 classes x 64x64 px x 5,000 images is 450 MB in fp16)
CACHE_BYTES = 256 * 2**20


class Task(ABC):
    """What a model is for. Subclass it for a task autoslim does not ship (see
    ``examples/detection``); the built-ins are :class:`~autoslim.tasks.Classification` and
    :class:`~autoslim.tasks.Segmentation`.

    Class attributes: ``name`` (recorded with the study), ``metric`` (the key of the primary
    metric in :meth:`score`'s result, higher is better), ``metric_label`` (how tables and plots
    name it) and ``dense`` (targets are aligned with the pixels: training batches are served
    without random crops and flips, which would move the image but not its target).
    """

    name: ClassVar[str] = "task"
    metric: ClassVar[str] = "metric"
    metric_label: ClassVar[str] = "metric"
    dense: ClassVar[bool] = False

    # -- training -------------------------------------------------------------------------
    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The supervised loss that trains the teacher (a scalar)."""

    @abstractmethod
    def distill_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        *,
        temperature: float,
        alpha: float,
    ) -> torch.Tensor:
        """The recovery loss of a compressed student against the teacher's raw outputs:
        ``alpha`` weighs distillation at ``temperature`` against the supervised loss."""

    # -- evaluation -----------------------------------------------------------------------
    @abstractmethod
    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """A batch of raw outputs -> compact per-sample predictions (first dimension: batch),
        what :meth:`score` and :meth:`agreement` read."""

    @abstractmethod
    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Metrics of ``predictions`` against ``targets`` (same samples, in order); the
        result holds :attr:`metric` (higher is better) and may hold others."""

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """How far two models' predictions agree, in [0, 1]: the correctness gate compares the
        exported file's with the trained model's (1.0: identical). Default: the share of equal
        elements (classes for a classifier, pixels for a segmenter); a detector overrides it."""
        return float((a == b).float().mean())

    # -- checks and plumbing --------------------------------------------------------------
    def check_output(
        self, output: Any, *, batch: int, num_classes: int, image_shape: tuple[int, int, int]
    ) -> str | None:
        """None if ``output`` (a model's on a zero batch) is what this task expects, else what
        was expected (one phrase, used in the model error)."""
        if not isinstance(output, torch.Tensor):
            return f"a tensor (got {type(output).__name__})"
        return None

    def check_data(self, data: Any) -> str | None:
        """None if ``data``'s (an :class:`autoslim.data.DataSplits`) targets are this task's, else what was expected."""
        return None

    def cache_outputs(self, *, samples: int, output_numel: int) -> bool:
        """Whether the teacher's outputs on ``samples`` images (``output_numel`` values each)
        are cached for recovery (fp16, under :data:`CACHE_BYTES`) or recomputed per batch."""
        return samples * output_numel * 2 <= CACHE_BYTES

    def load_data(self, **options: Any) -> Any:
        """The task's own dataset (an :class:`autoslim.data.DataSplits`), or None to use the study's ``dataset`` by name. ``options``
        are the study's data options (``data_dir``, ``val_size``, ``seed``, ``limit_train``,
        ``limit_test``, ``image_size``)."""
        return None

    def key(self) -> str:
        """What identifies this task in a study's fingerprint (its name and settings)."""
        return self.name

    def describe(self) -> dict[str, str]:
        """Name, metric key and label: recorded with a study for its tables and plots."""
        return {"name": self.name, "metric": self.metric, "label": self.metric_label}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key()!r})"
