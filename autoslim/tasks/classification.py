"""Image classification: cross-entropy, Hinton KD on logits, top-1 accuracy, top-1 agreement."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import Task

__all__ = ["Classification"]


class Classification(Task):
    """One label per image; the model maps a batch to (N, classes) logits."""

    name: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"
    metric_label: ClassVar[str] = "accuracy"
    dense: ClassVar[bool] = False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def distill_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        *,
        temperature: float,
        alpha: float,
    ) -> torch.Tensor:
        t = temperature
        soft = F.kl_div(
            F.log_softmax(student / t, 1),
            F.log_softmax(teacher / t, 1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        return alpha * soft + (1 - alpha) * F.cross_entropy(student, target)

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(1)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        if len(targets) == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float((predictions == targets).float().mean())}

    def check_output(
        self, output: Any, *, batch: int, num_classes: int, image_shape: tuple[int, int, int]
    ) -> str | None:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        if got != (batch, num_classes):
            return (
                f"one score per class, ({batch}, {num_classes}), for this dataset's "
                f"{num_classes} classes"
            )
        return None

    def check_data(self, data: Any) -> str | None:
        if data.train.y.ndim != 1:
            return f"one class label per image (got targets of shape {tuple(data.train.y.shape)})"
        return None
