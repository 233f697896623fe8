"""Datasets by name, held in memory as tensors, with a deterministic train/validation split.

Names:
- ``fashion-mnist``: IDX .gz files from ``/usr/share/datasets/fashion-mnist/`` (Debian package
  ``dataset-fashion-mnist``) or ``data_dir``.
- ``cifar10``: torchvision's on-disk layout (``cifar-10-batches-py``), never downloaded.
- ``imagefolder:PATH``: a user's own images, ``PATH/train/<class>/*`` and optionally
  ``PATH/test/<class>/*`` (otherwise 20% of train, seeded, becomes test). Images of any size and
  format PIL reads; with ``image_size`` each is resized (shorter side to ``resize``, default
  ``image_size * 8 / 7``) and center-cropped to ``image_size`` square. Unreadable files are
  refused with their path (``bad_images="refuse"``) or skipped and reported once (``"skip"``).

The test split is only for final reports; search decisions use the validation split.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["Split", "DataSplits", "load_dataset", "list_datasets", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Split:
    """Images as a float tensor (N, C, H, W), already normalised, and int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None) -> Split:
        """The first ``n`` samples (the split is already shuffled by its seed)."""
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test splits plus what is needed to reproduce and describe them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """A short hash naming the dataset, split sizes, seed and normalisation.

        Mean and std enter rounded to 6 decimals: their last float bits depend on how many
        threads reduced them, and a fingerprint must not change with the thread count.
        """
        mean = tuple(round(v, 6) for v in self.mean)
        std = tuple(round(v, 6) for v in self.std)
        key = (
            f"{self.name}|{len(self.train)}|{len(self.val)}|{len(self.test)}|{self.seed}"
            f"|{mean}|{std}|{self.meta.get('source_hash', '')}"
            + (
                f"|{self.meta['image_size']}/{self.meta['resize']}"
                if self.meta.get("image_size")
                else ""
            )
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return ["fashion-mnist", "cifar10", "imagefolder:PATH"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file; reinstall the dataset package")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: IDX header says {dims} but holds {data.size} bytes; file is truncated"
        )
    return data.reshape(dims)


def _fashion_mnist(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    missing = [f for pair in _FMNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: expected {', '.join(missing)} in {root}; "
            "install it with `sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR"
        )
    xtr, ytr = (_read_idx(root / f) for f in _FMNIST_FILES["train"])
    xte, yte = (_read_idx(root / f) for f in _FMNIST_FILES["test"])
    return xtr[:, None], ytr, xte[:, None], yte


def _cifar10(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = Path(data_dir) if data_dir else Path("data")
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (base / "data_batch_1").is_file():
        raise DataError(
            f"CIFAR-10 not found: expected torchvision's layout cifar-10-batches-py/data_batch_1 "
            f"under {root}; autoslim never downloads, so place the extracted archive there and "
            "pass --data-dir DIR"
        )

    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in names:
            with open(base / n, "rb") as f:
                # torchvision's own CIFAR-10 layout is a pickle; only read from the user's data dir.
                d = pickle.load(f, encoding="latin1")  # noqa: S301
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = load(["test_batch"])
    return xtr, ytr, xte, yte


BAD_IMAGES = ("refuse", "skip")


def _fit(img: np.ndarray, image_size: int | None, resize: int | None) -> np.ndarray:
    """(C, H, W) uint8 -> resized (shorter side ``resize``) and center-cropped ``image_size``."""
    if image_size is None:
        return img
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.ascontiguousarray(img).copy())
    short = resize or round(image_size * 8 / 7)
    t = TF.resize(t, [short], antialias=True)  # shorter side, aspect kept
    return TF.center_crop(t, [image_size, image_size]).numpy()


def _imagefolder(
    path: str,
    seed: int,
    *,
    image_size: int | None = None,
    resize: int | None = None,
    bad_images: str = "refuse",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import sys

    from PIL import Image

    root = Path(path)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir():
        raise DataError(
            f"imagefolder: {root} is not a directory; expected PATH/train/<class>/<image> "
            "(or PATH/<class>/<image>)"
        )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and d.name != "test")
    if len(classes) < 2:
        raise DataError(
            f"imagefolder: found {len(classes)} class folders in {train_dir}; need at least 2 "
            "subfolders, one per class"
        )

    if bad_images not in BAD_IMAGES:
        raise DataError(f"bad_images must be one of {BAD_IMAGES}; got {bad_images!r}")

    def load(d: Path) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, bad = [], [], []
        for ci, c in enumerate(classes):
            for p in sorted((d / c).glob("*")):
                if p.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}:
                    continue
                try:
                    with Image.open(p) as im:
                        img = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except (OSError, SyntaxError, ValueError) as e:  # PIL's errors on bad files
                    if bad_images == "refuse":
                        raise DataError(
                            f"imagefolder: cannot decode image {p}: {e}; fix or remove the "
                            'file, or skip such files (bad_images = "skip")'
                        ) from None
                    bad.append(f"{p}: {e}")
                    continue
                xs.append(_fit(img.transpose(2, 0, 1), image_size, resize))
                ys.append(ci)
        if bad:  # one line, however many
            print(
                f"note: imagefolder: skipped {len(bad)} unreadable images under {d} "
                f"(first: {bad[0]})",
                file=sys.stderr,
            )
        if not xs:
            raise DataError(f"imagefolder: no images under {d}; expected .png/.jpg files")
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(
                f"imagefolder: images under {d} have {len(shapes)} different sizes; "
                "give image_size (study file) or --image-size N to resize and crop them"
            )
        return np.stack(xs), np.asarray(ys, dtype=np.int64)

    x, y = load(train_dir)
    if (root / "test").is_dir():
        xte, yte = load(root / "test")
        return x, y, xte, yte
    perm = np.random.default_rng(seed + 1).permutation(len(y))
    n_test = max(1, len(y) // 5)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def load_dataset(
    name: str = "fashion-mnist",
    *,
    data_dir: str | Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    resize: int | None = None,
    bad_images: str = "refuse",
) -> DataSplits:
    """Load a dataset by name and split its training set into train and validation.

    The split is a seeded permutation of the training set: the same ``seed`` and ``val_size``
    always give the same, disjoint train and validation sets. The test set is kept apart and
    untouched. Images are scaled to [0, 1] and normalised by the train split's per-channel mean
    and std, which are recorded with the split. ``limit_train`` keeps only the first N training
    images after the split, ``limit_test`` the first N test images (quick runs and tests).
    ``image_size``, ``resize`` and ``bad_images`` apply to ``imagefolder:`` (module docstring).
    """
    if image_size is not None and not name.startswith("imagefolder:"):
        raise DataError(
            f"image_size applies to imagefolder: datasets; {name} has a fixed size (drop it)"
        )
    if image_size is not None and image_size < 8:
        raise DataError(f"image_size must be >= 8 pixels; got {image_size}")
    if resize is not None and (image_size is None or resize < image_size):
        raise DataError(
            f"resize (shorter side, {resize}) needs image_size and must be >= it ({image_size})"
        )
    dd = Path(data_dir) if data_dir else None
    if name == "fashion-mnist":
        xtr, ytr, xte, yte = _fashion_mnist(dd)
    elif name == "cifar10":
        xtr, ytr, xte, yte = _cifar10(dd)
    elif name.startswith("imagefolder:"):
        xtr, ytr, xte, yte = _imagefolder(
            name.split(":", 1)[1],
            seed,
            image_size=image_size,
            resize=resize,
            bad_images=bad_images,
        )
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(list_datasets())}")
    n = len(ytr)
    if not 0 < val_size < n:
        raise DataError(
            f"val_size must be between 1 and {n - 1} for {name} ({n} training images); got {val_size}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if limit_train is not None:
        train_idx = train_idx[:limit_train]
    if limit_test is not None:
        if limit_test < 1:
            raise DataError(f"limit_test must be >= 1 test images; got {limit_test}")
        xte, yte = xte[:limit_test], yte[:limit_test]
    num_classes = int(max(ytr.max(), yte.max())) + 1

    xtr_f = torch.from_numpy(xtr[train_idx]).float().div_(255.0)
    mean = tuple(float(v) for v in xtr_f.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in xtr_f.std(dim=(0, 2, 3)))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.array(a, copy=True)).float().div_(255.0) - m) / s

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ytr).tobytes())
    h.update(np.ascontiguousarray(yte).tobytes())
    return DataSplits(
        name=name,
        train=Split((xtr_f - m) / s, torch.from_numpy(ytr[train_idx]).long()),
        val=Split(norm(xtr[val_idx]), torch.from_numpy(ytr[val_idx]).long()),
        test=Split(norm(xte), torch.from_numpy(np.array(yte)).long()),
        num_classes=num_classes,
        mean=mean,
        std=std,
        seed=seed,
        meta={
            "source_hash": h.hexdigest()[:16],
            "val_indices_hash": hashlib.sha256(val_idx.tobytes()).hexdigest()[:16],
            "limit_train": limit_train,
            "image_size": image_size,
            "resize": resize,
        },
    )
