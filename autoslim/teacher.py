"""Teacher training and the teacher cache.

``train_teacher`` trains a model with a recipe and saves a checkpoint with metadata (recipe,
val/test accuracy, size, content hash) in the cache directory; ``get_teacher`` returns the cached
checkpoint for the same (model, dataset split, recipe) key or trains it once. Checkpoints are
plain state dicts plus JSON-able metadata, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import DataSplits, Split, batched, device_of, load_dataset, train_device
from .errors import UsageError
from .models import build_model
from .passes.distill import recalibrate_bn

__all__ = [
    "TeacherRecipe",
    "Teacher",
    "train_teacher",
    "get_teacher",
    "load_checkpoint",
    "evaluate_accuracy",
    "evaluate",
    "predictions",
    "cache_dir",
]


def cache_dir() -> Path:
    """Where teachers and other reusable results live: ``$AUTOSLIM_CACHE`` or ~/.cache/autoslim."""
    return Path(os.environ.get("AUTOSLIM_CACHE", Path.home() / ".cache" / "autoslim"))


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained. SGD + Nesterov, one-cycle LR, random crop (+flip)."""

    epochs: int = 6
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    crop_padding: int = 2
    flip: bool = True
    seed: int = 0
    max_steps: int | None = None  # stop early after this many steps (quick runs, tests)
    # BatchNorm statistics re-estimated on this many un-augmented training batches after each
    # epoch (cumulative average): torchvision's MobileNetV3/EfficientNet use BN momentum 0.01,
    # so after a short recipe their running statistics are still near their initial values
    # (val 0.15 after one epoch of MobileNetV3-small measured; 0 turns it off)
    bn_batches: int = 20

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class Teacher:
    """A trained model plus the metadata its checkpoint carries."""

    model: nn.Module
    meta: dict
    path: Path | None = None

    @property
    def content_hash(self) -> str:
        return str(self.meta.get("content_hash", ""))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | Split, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on the images ``x`` or a split's, batched."""
    was_training = model.training
    model.eval()
    dev = device_of(model)
    out = [model(xb.to(dev)).cpu() for xb in batched(x, batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def predictions(model: nn.Module, split: Split, batch_size: int = 512) -> torch.Tensor:
    """The split task's compact predictions (class ids, argmax maps, ...) of ``model`` on
    ``split``, batch by batch: dense outputs are never all held at once."""
    was_training = model.training
    model.eval()
    dev = device_of(model)
    task = split.task
    out = [task.predictions(model(xb.to(dev))).cpu() for xb in batched(split, batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> dict[str, float]:
    """Every metric of the split's task for a PyTorch model on ``split``."""
    return split.task.score(predictions(model, split, batch_size), split.y)


def evaluate_accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """The split task's metric (top-1 accuracy for a classifier, mIoU for segmentation) of a
    PyTorch model on ``split``."""
    return evaluate(model, split, batch_size)[split.task.metric]


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _model_size_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def train_teacher(
    model_name: str,
    data: DataSplits,
    *,
    recipe: TeacherRecipe | None = None,
    progress: bool = True,
    save_to: Path | None = None,
) -> Teacher:
    """Train ``model_name`` on ``data.train`` with ``recipe`` (on
    :func:`~autoslim.data.train_device`); evaluate on val and test. The model returned is on the
    CPU."""
    recipe = recipe or TeacherRecipe()
    torch.manual_seed(recipe.seed)
    c, h, _ = data.input_shape
    model = build_model(
        model_name, in_channels=c, num_classes=data.num_classes, image_size=h, task=data.task
    )
    dev = train_device()
    model.to(dev)
    gen = torch.Generator().manual_seed(recipe.seed)
    n = len(data.train)
    steps_per_epoch = max(1, n // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.max_lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=recipe.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, total_steps=total)
    t0 = time.perf_counter()
    step, val_acc = 0, float("nan")
    epochs = -(-total // steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        n_steps = min(steps_per_epoch, total - step)
        bar = tqdm(
            range(n_steps),
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )
        order = [perm[i * recipe.batch_size : (i + 1) * recipe.batch_size] for i in range(n_steps)]
        batches = data.train.train_batches(
            order, gen=gen, padding=recipe.crop_padding, flip=recipe.flip
        )
        for i, idx, x in zip(bar, order, batches, strict=False):
            x, y = x.to(dev, non_blocking=True), data.train.y[idx].to(dev, non_blocking=True)
            loss = data.task.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if i % 20 == 0:  # val accuracy is measured at the end of each epoch
                shown = {"val_acc": f"{val_acc:.4f}"} if val_acc == val_acc else {}
                bar.set_postfix(loss=f"{loss.item():.3f}", **shown)
        bs = recipe.batch_size
        sample = [perm[j : j + bs] for j in range(0, min(n, recipe.bn_batches * bs), bs)]
        recalibrate_bn(
            model,
            data.train.batches_at(sample),
            batches=recipe.bn_batches,
            batch_size=recipe.batch_size,
        )
        val_acc = evaluate_accuracy(model, data.val)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{val_acc:.4f}")
        bar.close()
    train_time = time.perf_counter() - t0
    model.to("cpu").eval()
    state = model.state_dict()
    meta = {
        "model": model_name,
        "dataset": data.name,
        "data_fingerprint": data.fingerprint(),
        "recipe": dataclasses.asdict(recipe),
        "metric": data.task.metric,  # what val_accuracy/test_accuracy hold
        "val_accuracy": val_acc,
        "test_accuracy": evaluate_accuracy(model, data.test),
        "size_bytes": _model_size_bytes(model),
        "num_params": sum(p.numel() for p in model.parameters()),
        "content_hash": state_hash(state),
        "train_seconds": round(train_time, 1),
        "steps": step,
        "torch": str(torch.__version__),
    }
    teacher = Teacher(model, meta)
    if save_to is not None:
        _save(teacher, save_to)
    return teacher


def _save(teacher: Teacher, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": teacher.model.state_dict(), "meta": teacher.meta}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    teacher.path = path


def load_checkpoint(path: str | Path, model_name: str, data: DataSplits) -> Teacher:
    """Load a checkpoint (a state dict, or autoslim's {state_dict, meta}) with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder; expected a checkpoint file in it")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; train one with `autoslim train`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UsageError(
            f"cannot load {path} with weights_only=True ({type(e).__name__}); save a plain "
            "state_dict with torch.save(model.state_dict(), path)"
        ) from e
    state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    meta = dict(obj.get("meta", {})) if isinstance(obj, dict) and "meta" in obj else {}
    c, h, _ = data.input_shape
    model = build_model(
        model_name, in_channels=c, num_classes=data.num_classes, image_size=h, task=data.task
    )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(
            f"checkpoint {path} does not fit model {model_name!r} for {data.name}: "
            f"{str(e).splitlines()[0]}; pass the --model it was trained as"
        ) from e
    model.eval()
    if not meta:
        meta = {"model": model_name, "dataset": data.name, "source": str(path)}
    meta.setdefault("content_hash", state_hash(model.state_dict()))
    meta.setdefault("size_bytes", _model_size_bytes(model))
    if "test_accuracy" not in meta:
        meta["val_accuracy"] = evaluate_accuracy(model, data.val)
        meta["test_accuracy"] = evaluate_accuracy(model, data.test)
    return Teacher(model, meta, path)


def teacher_path(model_name: str, data: DataSplits, recipe: TeacherRecipe) -> Path:
    """The cache path for (model, dataset split, recipe)."""
    key = f"{model_name}|{data.fingerprint()}|{recipe.key()}"
    if data.task.name != "classification":  # classifiers' cached teachers keep their paths
        key += f"|{data.task.key()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in model_name)[-40:]
    return cache_dir() / "teachers" / f"{safe}-{data.name.split(':')[0]}-{digest}.pt"


def get_teacher(
    model_name: str = "resnet18",
    data: DataSplits | None = None,
    *,
    recipe: TeacherRecipe | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> Teacher:
    """The teacher for (model, data, recipe): a user checkpoint, the cached one, or train it now."""
    data = data or load_dataset()
    if checkpoint is not None:
        return load_checkpoint(checkpoint, model_name, data)
    recipe = recipe or TeacherRecipe()
    path = teacher_path(model_name, data, recipe)
    if path.is_file():
        return load_checkpoint(path, model_name, data)
    # said even without progress bars: the longest phase of a first search
    print(f"training teacher {model_name} on {data.name} (cached at {path})", file=sys.stderr)
    return train_teacher(model_name, data, recipe=recipe, progress=progress, save_to=path)
