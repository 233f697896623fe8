"""Distillation recovery (our own code, small): KD from the uncompressed teacher.

The loss is the task's (:meth:`autoslim.tasks.Task.distill_loss`); for a classifier
``alpha * T^2 * KL(softmax(s/T) || softmax(t/T)) + (1 - alpha) * CE(s, y)``, for segmentation
the same per pixel. The teacher's outputs for the fine-tune subset are computed once and cached
(in memory and on disk, keyed by teacher hash and subset), since a teacher forward costs several
times a pruned student's forward+backward; outputs the task finds too large to cache (dense
maps over many images) are recomputed per batch instead. Batch-norm statistics are re-estimated
after pruning.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DistillConfig
from ..data import Split, batched, consecutive, device_of, train_device
from ..tasks import Classification, Task

__all__ = ["Recovery", "kd_loss", "teacher_logits", "recalibrate_bn", "distill"]


@dataclass(frozen=True)
class Recovery:
    """Fine-tune budget set by the caller: SGD + Nesterov with cosine decay."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    subset: int = 10000  # training images used for recovery (teacher logits cached for them)
    bn_batches: int = 20
    qat_fraction: float = 0.3  # last share of the steps runs with fake quantization
    seed: int = 0
    augment: bool = False  # teacher run on augmented batches instead of cached logits


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    cfg: DistillConfig,
    task: Task | None = None,
) -> torch.Tensor:
    """The task's distillation loss at ``cfg``'s temperature and alpha (classification:
    Hinton KD on logits)."""
    task = task or Classification()
    return task.distill_loss(student, teacher, y, temperature=cfg.temperature, alpha=cfg.alpha)


_MEMO: dict[str, torch.Tensor] = {}


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, split: Split, *, key: str, cache: Path | None = None, batch_size: int = 512
) -> torch.Tensor | None:
    """The teacher's outputs on ``split``, computed once per (teacher, subset) key; None where
    the split's task says they are too large to cache (dense outputs: the teacher then runs on
    each recovery batch). A dense task's outputs are cached in fp16."""
    dense = split.task.dense
    digest = hashlib.sha256(f"{key}|{len(split)}".encode()).hexdigest()[:16]
    if digest in _MEMO:
        return _MEMO[digest]
    teacher.eval()
    one = teacher(split.images(slice(0, 1)).to(device_of(teacher)))
    if not split.task.cache_outputs(samples=len(split), output_numel=int(one[0].numel())):
        return None
    path = cache / f"{digest}.pt" if cache else None
    if path is not None and path.is_file():
        out = torch.load(path, weights_only=True)
    else:
        teacher.eval()
        dev = device_of(teacher)
        dtype = torch.float16 if dense else torch.float32
        out = torch.cat([teacher(xb.to(dev)).to(dtype).cpu() for xb in split.batches(batch_size)])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, tmp)
            os.replace(tmp, path)
    _MEMO[digest] = out
    return out


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    x: torch.Tensor | Split | Iterable[torch.Tensor],
    *,
    batches: int,
    batch_size: int,
) -> int:
    """Re-estimate BatchNorm running statistics (cumulative average) on the first ``batches``
    batches of ``x``: images, a split (evaluation view), or an iterable of batches. Returns
    the number of BN layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return len(bns)
    if isinstance(x, torch.Tensor):
        x = batched(x, batch_size)
    elif isinstance(x, Split):  # training-sized batches (BN statistics are per batch)
        x = x.batches_at(consecutive(min(len(x), batches * batch_size), batch_size))
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = device_of(model)
    for xb in itertools.islice(x, batches):
        model(xb.to(dev))
    for m, mom in saved:
        m.momentum = mom
    model.eval()
    return len(bns)


def distill(
    student: nn.Module,
    split: Split,
    logits: torch.Tensor | None,
    cfg: DistillConfig,
    *,
    steps: int,
    recovery: Recovery,
    start_step: int = 0,
    total_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    teacher: nn.Module | None = None,
) -> float:
    """Run ``steps`` KD steps on ``split``; return the last loss.

    With cached teacher ``logits`` (one row per image of ``split``) the batches are the split's
    evaluation view; with ``logits=None`` the ``teacher`` runs on each batch, which is then
    the split's augmented training view (:meth:`Split.train_batches`). The cosine schedule spans
    ``total_steps`` (default ``steps``) starting at ``start_step``, so recovery can be split
    into phases (float, then fake-quantised) on one schedule. The steps run on
    :func:`~autoslim.data.train_device` (a CUDA GPU when present); the student and teacher come
    back on the CPU.
    """
    if steps <= 0:
        return float("nan")
    if logits is None and teacher is None:
        raise ValueError("distill needs the teacher's cached logits or the teacher")
    total = total_steps or steps
    dev = train_device()
    student.to(dev)
    if logits is None:
        teacher.to(dev)
    try:
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=recovery.lr, momentum=0.9, nesterov=True, weight_decay=recovery.weight_decay
        )
        gen = torch.Generator().manual_seed(recovery.seed + start_step)
        n, loss_v = len(split), float("nan")
        perm = torch.randperm(n, generator=gen)
        pos, order = 0, []
        for _ in range(steps):  # the batches' indices, drawn up front so a loader can prefetch
            if pos + recovery.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            order.append(perm[pos : pos + recovery.batch_size])
            pos += recovery.batch_size
        if logits is None:
            batches = split.train_batches(order, gen=gen, padding=4, flip=True)
            teacher.eval()
        else:
            batches = split.batches_at(order)
        student.train()
        for s, idx, x in zip(range(start_step, start_step + steps), order, batches, strict=True):
            lr = 0.5 * recovery.lr * (1 + math.cos(math.pi * s / total))
            for g in opt.param_groups:
                g["lr"] = lr
            x = x.to(dev, non_blocking=True)
            if logits is None:
                with torch.no_grad():
                    target = teacher(x)
            else:
                target = logits[idx].to(dev, non_blocking=True).float()
            y = split.y[idx].to(dev, non_blocking=True)
            loss = kd_loss(student(x), target, y, cfg, split.task)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"recovery loss became {loss.item()} at step {s}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = loss.item()
            if on_step is not None:
                on_step(s, loss_v)
        student.eval()
        return loss_v
    finally:
        student.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
