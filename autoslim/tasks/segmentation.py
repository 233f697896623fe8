"""Semantic segmentation: per-pixel cross-entropy with an ignore index, pixel-wise KD (per-pixel
KL at a temperature), mIoU over the classes present (and pixel accuracy), gated on pixel
agreement of the argmax maps. The confusion matrix is torchmetrics'."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import Task

__all__ = ["Segmentation", "IGNORE_INDEX"]

IGNORE_INDEX = 255  # the VOC convention: pixels labelled 255 count in no loss and no metric


class Segmentation(Task):
    """One class per pixel; the model maps (N, C, H, W) images to (N, classes, H, W) scores.

    ``num_classes`` is the dataset's (background included); pixels labelled ``ignore_index``
    are left out of the loss and the metrics. mIoU averages the IoU of the classes that occur in
    the targets or the predictions (a class absent from both has no IoU).
    """

    name: ClassVar[str] = "segmentation"
    metric: ClassVar[str] = "miou"
    metric_label: ClassVar[str] = "mIoU"
    dense: ClassVar[bool] = True

    def __init__(self, *, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes; got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target.long(), ignore_index=self.ignore_index)

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
        kl = F.kl_div(
            F.log_softmax(student / t, 1),
            F.log_softmax(teacher.float() / t, 1),
            reduction="none",
            log_target=True,
        ).sum(1)  # per pixel
        soft = kl.mean() * (t * t)
        if alpha >= 1:
            return soft
        return alpha * soft + (1 - alpha) * self.loss(student, target)

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(1).to(torch.uint8 if self.num_classes <= 255 else torch.int32)

    def confusion(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(classes, classes) pixel counts, rows the targets (ignored pixels left out)."""
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        total = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        for i in range(0, len(targets), 256):  # bounded int64 copies
            p = predictions[i : i + 256].long().flatten()
            y = targets[i : i + 256].long().flatten()
            total += multiclass_confusion_matrix(
                p, y, self.num_classes, ignore_index=self.ignore_index, validate_args=False
            )
        return total

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        cm = self.confusion(predictions, targets).double()
        hit = cm.diag()
        union = cm.sum(0) + cm.sum(1) - hit
        present = union > 0
        if not bool(present.any()):
            return {"miou": float("nan"), "pixel_accuracy": float("nan")}
        return {
            "miou": float((hit[present] / union[present]).mean()),
            "pixel_accuracy": float(hit.sum() / cm.sum()),
        }

    def check_output(
        self, output: Any, *, batch: int, num_classes: int, image_shape: tuple[int, int, int]
    ) -> str | None:
        want = (batch, num_classes, *image_shape[1:])
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        if got != want:
            return (
                f"one score per class and pixel, {want}, at the input's resolution "
                "(upsample the logits inside the model; return a tensor, not a dict)"
            )
        return None

    def check_data(self, data: Any) -> str | None:
        y = data.train.y
        if y.ndim != 3 or tuple(y.shape[1:]) != tuple(data.input_shape[1:]):
            return (
                f"one mask per image, (N, {data.input_shape[1]}, {data.input_shape[2]}) "
                f"(got targets of shape {tuple(y.shape)})"
            )
        return None

    def key(self) -> str:
        extra = f"|ignore={self.ignore_index}" if self.ignore_index != IGNORE_INDEX else ""
        return f"{self.name}{extra}"
