"""Object detection through autoslim's task API: a complete worked example.

A small anchor-free detector (CenterNet-style: a class heatmap, box sizes and centre offsets at
stride 4, one output tensor, no NMS in the graph) on deterministic mosaics of Fashion-MNIST
items with their boxes, searched by autoslim like any built-in model: pruned, quantised,
recovered by distillation on the raw head outputs, exported to ONNX, gated on decoded-box
agreement and measured by mAP (torchmetrics' ``MeanAveragePrecision``).

Run it::

    python examples/detection/detection.py            # a small search, about 15 min on 2 cores
    python examples/detection/detection.py --quick    # a 2-trial smoke run, about 2 min

or from the CLI, the task and the model as files::

    autoslim search --task examples/detection/detection.py:task \\
        --model examples/detection/detection.py:build --dataset fashion-mnist-boxes

Everything task-specific lives in :class:`DetectionTask` (an ``autoslim.tasks.Task``): the
training loss (focal loss on the heatmap, L1 on sizes and offsets), the distillation loss, the
decoding of raw outputs into boxes (top-k peaks of the heatmap: what a deployment does after the
file, outside it), mAP, the gate's agreement measure and the dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import autoslim
from autoslim.data import DataSplits, TensorSplit, _fashion_mnist
from autoslim.tasks import Task

STRIDE = 4  # output cells per input pixel side
MAX_BOXES = 4  # boxes per image (targets are padded to this many; class -1 = none)
TOP_K = 10  # detections decoded per image
SIDE = 64  # mosaic side in pixels
SILHOUETTE = 38  # an item pixel belongs to the item above this intensity


# -- data -----------------------------------------------------------------------------------
def mosaics(
    items: np.ndarray, labels: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics (uint8 (n, 1, 64, 64)) of 1-4 items, one per 32 px cell, jittered, with
    their tight boxes (float32 (n, 4, 5): class, x1, y1, x2, y2; class -1 pads)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, SIDE, SIDE), np.uint8)
    y = np.full((n, MAX_BOXES, 5), -1.0, np.float32)
    for i in range(n):
        cells = rng.permutation(4)[: rng.integers(1, 5)]
        for k, cell in enumerate(cells):
            j = rng.integers(len(items))
            it = items[j]
            r = (cell // 2) * 32 + rng.integers(0, 5)
            c = (cell % 2) * 32 + rng.integers(0, 5)
            x[i, 0, r : r + 28, c : c + 28] = np.maximum(x[i, 0, r : r + 28, c : c + 28], it)
            rows, cols = np.nonzero(it > SILHOUETTE)
            if len(rows) == 0:
                continue
            y[i, k] = (labels[j], c + cols.min(), r + rows.min(), c + cols.max() + 1,
                       r + rows.max() + 1)  # fmt: skip
    return x, y


def load_boxes(
    *, data_dir: str | None = None, val_size: int = 1000, seed: int = 0,
    limit_train: int | None = None, limit_test: int | None = None, train: int = 8000,
    test: int = 1000, task: Task | None = None, **_: Any,
) -> DataSplits:  # fmt: skip
    """``fashion-mnist-boxes``: ``train`` mosaics from the training images (``val_size`` of
    them the validation split), ``test`` from the test images."""
    xtr, ytr, xte, yte = _fashion_mnist(Path(data_dir) if data_dir else None)
    if limit_train is not None:  # only the mosaics the splits use are made
        train = min(train, val_size + limit_train)
    if limit_test is not None:
        test = min(test, limit_test)
    a, b = mosaics(xtr[:, 0], ytr, train, seed=11)
    c, d = mosaics(xte[:, 0], yte, test, seed=12)
    perm = np.random.default_rng(seed).permutation(train)
    val, tr = perm[:val_size], perm[val_size:]
    if limit_train is not None:
        tr = tr[:limit_train]
    if limit_test is not None:
        c, d = c[:limit_test], d[:limit_test]
    mean = float(a[tr].mean() / 255)
    std = float(a[tr].std() / 255)

    def split(u8: np.ndarray, boxes: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(u8.copy()), torch.from_numpy(boxes.copy()),
                           (mean,), (std,))  # fmt: skip

    digest = hashlib.sha256(b.tobytes() + d.tobytes()).hexdigest()[:16]
    return DataSplits(
        name="fashion-mnist-boxes",
        train=split(a[tr], b[tr]),
        val=split(a[val], b[val]),
        test=split(c, d),
        num_classes=10,
        mean=(mean,),
        std=(std,),
        seed=seed,
        meta={"source_hash": digest, "limit_train": limit_train},
        task=task or DetectionTask(),
    )


# -- model ----------------------------------------------------------------------------------
def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CenterNetTiny(nn.Module):
    """Backbone to stride 4, then one head conv writing ``classes`` heatmap logits, 2 box
    sizes and 2 centre offsets per output cell: (N, classes + 4, H/4, W/4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            _cbr(in_channels, w // 2), _cbr(w // 2, w, 2), _cbr(w, w), _cbr(w, 2 * w, 2),
            _cbr(2 * w, 2 * w), _cbr(2 * w, 2 * w), _cbr(2 * w, 2 * w),
        )  # fmt: skip
        self.neck = _cbr(2 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, num_classes + 4, 1)
        nn.init.constant_(self.head.bias[:num_classes], -2.19)  # prior 0.1: focal-loss init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The model factory autoslim calls (``--model examples/detection/detection.py:build``)."""
    return CenterNetTiny(in_channels, num_classes)


def build_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A quarter of the compute (half the width): the ``--quick`` run's model."""
    return CenterNetTiny(in_channels, num_classes, width=16)


# -- the task -------------------------------------------------------------------------------
class DetectionTask(Task):
    """Detection on (N, classes + 4, h, w) raw outputs; targets (N, 4, 5) padded boxes."""

    name: ClassVar[str] = "detection"
    metric: ClassVar[str] = "map"
    metric_label: ClassVar[str] = "mAP"
    dense: ClassVar[bool] = True  # boxes are tied to pixels: no random crops or flips

    def __init__(self, num_classes: int = 10, *, sigma: float = 1.0) -> None:
        self.num_classes, self.sigma = num_classes, sigma

    # raw targets -> heatmap, and the cells and regression targets of each box
    def _targets(self, out: torch.Tensor, boxes: torch.Tensor):
        n, _, h, w = out.shape
        cls = boxes[..., 0].long()
        valid = cls >= 0
        cx = (boxes[..., 1] + boxes[..., 3]) / (2 * STRIDE)
        cy = (boxes[..., 2] + boxes[..., 4]) / (2 * STRIDE)
        ix, iy = cx.long().clamp(0, w - 1), cy.long().clamp(0, h - 1)
        gy, gx = torch.meshgrid(torch.arange(h, device=out.device),
                                torch.arange(w, device=out.device), indexing="ij")  # fmt: skip
        g = torch.exp(
            -(
                (gx[None, None] - ix[..., None, None]) ** 2
                + (gy[None, None] - iy[..., None, None]) ** 2
            )
            / (2 * self.sigma**2)
        )  # (n, k, h, w)
        onehot = F.one_hot(cls.clamp_min(0), self.num_classes).float() * valid[..., None]
        heat = (g[:, :, None] * onehot[..., None, None]).amax(1)  # (n, classes, h, w)
        size = torch.stack([boxes[..., 3] - boxes[..., 1], boxes[..., 4] - boxes[..., 2]], -1)
        offset = torch.stack([cx - ix, cy - iy], -1)
        return heat, valid, ix, iy, size / STRIDE, offset

    def _regression(self, out: torch.Tensor, valid, ix, iy) -> torch.Tensor:
        b = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(ix)
        reg = out[:, self.num_classes :].permute(0, 2, 3, 1)[b, iy, ix]  # (n, k, 4)
        return reg[valid]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        heat, valid, ix, iy, size, offset = self._targets(output, target)
        p = torch.sigmoid(output[:, : self.num_classes]).clamp(1e-4, 1 - 1e-4)
        pos = heat.eq(1).float()
        focal = -(
            pos * (1 - p) ** 2 * torch.log(p)
            + (1 - pos) * (1 - heat) ** 4 * p**2 * torch.log(1 - p)
        ).sum() / pos.sum().clamp_min(1)
        reg = self._regression(output, valid, ix, iy)
        want = torch.cat([size, offset], -1)[valid]
        l1 = F.l1_loss(reg, want, reduction="sum") / max(1, len(want))
        return focal + 0.1 * l1

    def distill_loss(self, student, teacher, target, *, temperature: float, alpha: float):
        c, t = self.num_classes, temperature
        teacher = teacher.float()
        hs, ht = torch.sigmoid(student[:, :c] / t), torch.sigmoid(teacher[:, :c] / t)
        heat = F.mse_loss(hs, ht, reduction="sum") / len(student)
        weight = torch.sigmoid(teacher[:, :c]).amax(1, keepdim=True)  # where the objects are
        reg = (weight * (student[:, c:] - teacher[:, c:]).abs()).sum() / weight.sum().clamp_min(1)
        kd = heat + 0.1 * reg
        if alpha >= 1:
            return kd
        return alpha * kd + (1 - alpha) * self.loss(student, target)

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """Top-``TOP_K`` heatmap peaks as boxes: (N, TOP_K, 6) = x1, y1, x2, y2, score, class."""
        c = self.num_classes
        n, _, h, w = output.shape
        heat = torch.sigmoid(output[:, :c].float())
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
        score, idx = peaks.flatten(1).topk(TOP_K, 1)
        cls, cell = idx // (h * w), idx % (h * w)
        iy, ix = cell // w, cell % w
        reg = output[:, c:].float().flatten(2).gather(2, cell[:, None].expand(n, 4, TOP_K))
        cx, cy = (ix + reg[:, 2]) * STRIDE, (iy + reg[:, 3]) * STRIDE
        bw, bh = reg[:, 0].clamp_min(0) * STRIDE, reg[:, 1].clamp_min(0) * STRIDE
        return torch.stack(
            [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, score, cls.float()], -1
        )

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        m = MeanAveragePrecision(box_format="xyxy", backend="faster_coco_eval")
        preds, gts = [], []
        for p, y in zip(predictions, targets, strict=True):
            keep = y[:, 0] >= 0
            preds.append({"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5].long()})
            gts.append({"boxes": y[keep, 1:], "labels": y[keep, 0].long()})
        m.update(preds, gts)
        r = m.compute()
        return {"map": float(r["map"]), "map_50": float(r["map_50"])}

    def agreement(self, a: torch.Tensor, b: torch.Tensor, *, threshold: float = 0.3) -> float:
        """Decoded-box agreement: the share of confident boxes (score > ``threshold``) of each
        set that the other set also finds (same class, IoU >= 0.5), averaged both ways."""
        from torchvision.ops import box_iou

        def found(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
            hit = total = 0
            for p, q in zip(x, y, strict=True):
                p, q = p[p[:, 4] > threshold], q[q[:, 4] > threshold * 0.5]
                total += len(p)
                if len(p) and len(q):
                    iou = box_iou(p[:, :4], q[:, :4]) * (p[:, None, 5] == q[None, :, 5])
                    hit += int((iou.amax(1) >= 0.5).sum())
            return hit, total

        (h1, t1), (h2, t2) = found(a, b), found(b, a)
        return (h1 + h2) / (t1 + t2) if t1 + t2 else 1.0

    def check_output(self, output, *, batch, num_classes, image_shape):
        want = (batch, num_classes + 4, image_shape[1] // STRIDE, image_shape[2] // STRIDE)
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        return None if got == want else f"heads {want} (classes + 4 channels at stride 4)"

    def check_data(self, data):
        y = data.train.y
        ok = y.ndim == 3 and y.shape[2] == 5
        return None if ok else "padded boxes (N, K, 5): class, x1, y1, x2, y2"

    def load_data(self, **options: Any) -> DataSplits:
        return load_boxes(task=self, **options)


def task() -> DetectionTask:
    """The task factory (``--task examples/detection/detection.py:task``)."""
    return DetectionTask()


# -- the search, through the public API ------------------------------------------------------
SPACE = """
[distill]
temperature = [1.0, 2.0]
alpha = 0.9

[[rules]]
match = "*"
prune = {min = 0.0, max = 0.6, step = 0.2}
weight_bits = [8, 32]
act_bits = 8
"""


def search(out_dir: Path, *, quick: bool = False, progress: bool = True):
    """A detection search: teacher, trials, final level; returns autoslim's SearchResult."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "space.toml").write_text(SPACE)
    here = Path(__file__).resolve()
    spec = autoslim.load_study_spec(
        name="detection",
        model=f"{here}:{'build_small' if quick else 'build'}",
        # the task as a file (like the model): every later verb (report, pick, export, refine)
        # and every worker process finds it again; autoslim.search(spec, task=DetectionTask())
        # works too, for this process
        task=f"{here}:task",
        dataset="fashion-mnist-boxes",
        space=str(out_dir / "space.toml"),
        out_dir=str(out_dir / "study"),
        val_size=200 if quick else 1000,
        limit_train=1200 if quick else None,
        limit_test=200 if quick else None,
        trials=2 if quick else 12,
        budget=None,
        teacher_max_steps=120 if quick else 1500,
        teacher_batch_size=64,
        teacher_max_lr=0.05,
        recovery_steps=10 if quick else 150,
        recovery_batch_size=64,
        recovery_subset=1000 if quick else 5000,
        latency_runs=20 if quick else 200,
        gate_images=100 if quick else 500,
        gate_agreement=0.9 if quick else 0.95,
        final_points=1 if quick else 3,
        final_epochs=1 if quick else 3,
        final_steps_per_epoch=10 if quick else 200,
    )
    return autoslim.search(spec, progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="studies/runs/detection-example")
    p.add_argument("--quick", action="store_true", help="a 2-trial smoke run")
    a = p.parse_args(argv)
    r = search(Path(a.out_dir), quick=a.quick)
    base = r.study.user_attrs["baseline"]
    print(f"teacher (fp32 ONNX): val mAP {base['val_accuracy']:.4f}, "
          f"test mAP {base['test_accuracy']:.4f}, {base['size_bytes'] / 1e6:.2f} MB")  # fmt: skip
    front = r.front.sort_values("val_accuracy", ascending=False)
    if len(front):
        best = front.iloc[0]
        print(f"front's best point: trial {int(best['trial'])}, val mAP "
              f"{best['val_accuracy']:.4f}, {best['size_bytes'] / 1e6:.3f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
