"""Datasets by name, held in memory as uint8 or streamed from files, with a deterministic
train/validation split.

Names:
- ``fashion-mnist``: IDX .gz files from ``/usr/share/datasets/fashion-mnist/`` (Debian package
  ``dataset-fashion-mnist``) or ``data_dir``.
- ``cifar10``: torchvision's on-disk layout (``cifar-10-batches-py``), never downloaded.
- ``imagefolder:PATH``: a user's own images, ``PATH/train/<class>/*`` and optionally
  ``PATH/test/<class>/*`` (otherwise 20% of train, seeded, becomes test). Images of any size and
  format PIL reads; with ``image_size`` each is resized (shorter side to ``resize``, default
  ``image_size * 8 / 7``) and center-cropped to ``image_size`` square. Unreadable files are
  refused with their path (``bad_images="refuse"``) or skipped and reported once (``"skip"``).
  Large folders (``stream``; by default above ``STREAM_ABOVE_BYTES`` of uint8 images) are
  streamed: each batch is decoded from its files by ``DataLoader`` workers, training batches
  with a random-resized crop and a flip, so memory does not grow with the number of images.

The test split is only for final reports; search decisions use the validation split.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, UsageError, one_line
from .segdata import fashion_mnist_seg, maskfolder
from .tasks import Classification, Segmentation, Task

__all__ = [
    "Split",
    "TensorSplit",
    "FolderSplit",
    "DataSplits",
    "load_dataset",
    "list_datasets",
    "data_workers",
    "train_device",
    "decode",
    "batched",
    "consecutive",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


MAX_BATCH_ELEMENTS = 1 << 22  # floats per evaluation batch (16 MB: 27 images at 224 px)


def data_workers() -> int:
    """DataLoader worker processes for streamed splits: one fewer than the cores this process
    may run on (its affinity), at most 4; none on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


DEVICE_ENV = "AUTOSLIM_DEVICE"  # where training runs: auto (CUDA when present), cpu, cuda[:N]


def train_device() -> torch.device:
    """Where teacher training, KD recovery and the teacher's logits run: ``$AUTOSLIM_DEVICE``
    (``auto`` by default: the first CUDA GPU when torch sees one, else the CPU). Batches are
    served on the CPU and moved per step; exports, pruning and calibration stay on the CPU."""
    want = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(
            f"{DEVICE_ENV}={want!r} is not a training device; expected auto, cpu or cuda[:N]"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{DEVICE_ENV}={want} but torch sees no CUDA GPU (torch {torch.__version__}); "
            f"unset it or use {DEVICE_ENV}=cpu"
        )
    return dev


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Split(ABC):
    """One split: int64 labels ``y`` in memory, images served normalised on demand.

    Library code reads images through :meth:`images` (random access, evaluation view),
    :meth:`batches` (in order) and :meth:`train_batches` (augmented training view), so a split
    never has to hold its images as float32: :class:`TensorSplit` keeps them as uint8 in
    memory (the fast path for small data), :class:`FolderSplit` decodes them from their files.
    ``x`` materialises every image as float32 (small splits and tests only).
    """

    y: torch.Tensor  # targets: class ids (N,), masks (N, H, W) uint8, or a task's own
    shape: tuple[int, int, int]  # (channels, height, width) of one served image
    task: Task = Classification()  # what the targets are for (set by DataSplits)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @abstractmethod
    def images(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Normalised float32 images (N, C, H, W) at ``idx``: the evaluation view."""

    @abstractmethod
    def subset(self, n: int | None) -> Split:
        """The first ``n`` samples (the split is already shuffled by its seed)."""

    @abstractmethod
    def train_batches(
        self, index_batches: list[torch.Tensor], *, gen: torch.Generator, padding: int, flip: bool
    ) -> Iterator[torch.Tensor]:
        """Augmented training batches for ``index_batches``, in order; randomness from ``gen``."""

    def batches_at(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Evaluation-view batches for ``index_batches``, in order."""
        for idx in index_batches:
            yield self.images(idx)

    def batches(self, batch_size: int = 512, *, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The first ``limit`` (default: all) images in order, ``batch_size`` at a time (fewer
        for large images: at most ``MAX_BATCH_ELEMENTS`` floats per batch, so evaluating at
        224 px does not hold 512 images and their activations at once)."""
        per_image = max(1, int(np.prod(self.shape)))
        batch_size = max(1, min(batch_size, MAX_BATCH_ELEMENTS // per_image))
        n = len(self) if limit is None else min(limit, len(self))
        yield from self.batches_at(consecutive(n, batch_size))

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images as one tensor (calibration sets, gate diagnoses)."""
        return self.images(slice(0, min(n, len(self))))

    @property
    def x(self) -> torch.Tensor:
        """Every image, float32 (N, C, H, W): memory-hungry; for small splits and tests."""
        return self.images(slice(0, len(self)))

    def _normalise(self, u8: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (u8.float().div_(255.0) - m) / s


def consecutive(n: int, batch_size: int) -> list[torch.Tensor]:
    """Indices ``0 .. n-1`` in batches of ``batch_size`` (the last one shorter)."""
    return [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def batched(x: torch.Tensor | Split, batch_size: int) -> Iterator[torch.Tensor]:
    """Images in order, ``batch_size`` at a time: slices of a tensor, or a split's
    :meth:`Split.batches` (its evaluation view)."""
    if isinstance(x, Split):
        yield from x.batches(batch_size)
    else:
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]


class TensorSplit(Split):
    """Images held in memory as uint8 (N, C, H, W): a quarter of float32's bytes."""

    def __init__(
        self, u8: torch.Tensor, y: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.u8, self.y, self.mean, self.std = u8, y, mean, std
        self.shape = tuple(int(v) for v in u8.shape[1:])  # type: ignore[assignment]

    def images(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return self._normalise(self.u8[idx])

    def subset(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        out = TensorSplit(self.u8[:n], self.y[:n], self.mean, self.std)
        out.task = self.task
        return out

    def train_batches(
        self, index_batches: list[torch.Tensor], *, gen: torch.Generator, padding: int, flip: bool
    ) -> Iterator[torch.Tensor]:
        if self.task.dense:  # a crop or flip would move the image and not its mask
            yield from self.batches_at(index_batches)
            return
        for idx in index_batches:
            yield pad_crop_flip(self.images(idx), padding=padding, flip=flip, gen=gen)


def pad_crop_flip(
    x: torch.Tensor, *, padding: int, flip: bool, gen: torch.Generator
) -> torch.Tensor:
    """Random crop after zero padding plus horizontal flip, per sample (small images)."""
    b, _, h, w = x.shape
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
        bi = torch.arange(b)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x.contiguous()


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def decode(path: str | Path, *, min_side: int | None = None) -> torch.Tensor:
    """One image file as uint8 RGB (3, H, W), decoded by Pillow. With ``min_side``, JPEGs are
    decoded at the smallest power-of-two reduction whose shorter side is still >= it (Pillow's
    ``draft``): a 4000 px photo served at 224 px decodes several times faster."""
    from PIL import Image

    with Image.open(path) as im:
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _decode_named(path: str | Path, min_side: int | None) -> torch.Tensor:
    """:func:`decode`, with a file that fails named in a one-line :class:`DataError`."""
    try:
        return decode(path, min_side=min_side)
    except (RuntimeError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"imagefolder: cannot decode image {path}: {one_line(str(e))}; fix or remove the file"
        ) from None


def short_side(image_size: int | None, resize: int | None) -> int | None:
    """The shorter side images are resized to before the center crop (``image_size * 8 / 7``
    unless ``resize`` says otherwise); None: images are served at their own size."""
    if image_size is None:
        return None
    return resize or round(image_size * 8 / 7)


def fit(img: torch.Tensor, image_size: int | None, resize: int | None) -> torch.Tensor:
    """(C, H, W) uint8 -> shorter side :func:`short_side`, then a center crop of
    ``image_size`` square: the evaluation view. Unchanged without a size."""
    if image_size is None:
        return img
    from torchvision.transforms.v2 import functional as TF

    # the shorter side to its size, aspect kept
    img = TF.resize(img, [short_side(image_size, resize)], antialias=True)
    return TF.center_crop(img, [image_size, image_size])


class _Decoded(torch.utils.data.Dataset):
    """Items ``(i, seed)`` of a :class:`FolderSplit` as uint8 tensors; ``seed < 0``: evaluation
    view, else a random-resized crop + flip drawn from that seed (same seed, same view)."""

    def __init__(self, split: FolderSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        i, seed = key
        sp = self.split
        img = _decode_named(sp.paths[i], short_side(sp.image_size, sp.resize))
        if seed < 0:
            out = fit(img, sp.image_size, sp.resize)
        else:
            from torchvision.transforms import v2

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                crop = v2.RandomResizedCrop(list(sp.shape[1:]), scale=(0.25, 1.0), antialias=True)
                out = v2.RandomHorizontalFlip()(crop(img))
        if tuple(out.shape) != sp.shape:
            raise DataError(
                f"imagefolder: {sp.paths[i]} is {tuple(out.shape[1:])} px, the others "
                f"{sp.shape[1:]}; give image_size (study file) or --image-size N to resize them"
            )
        return out


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads


class FolderSplit(Split):
    """Images decoded from their files when served (bounded memory at any dataset size).

    Batches go through a ``DataLoader`` with :func:`data_workers` worker processes; training
    batches get a random-resized crop (scale 0.25-1) and a horizontal flip.
    """

    def __init__(
        self,
        paths: list[str],
        y: torch.Tensor,
        *,
        shape: tuple[int, int, int],
        image_size: int | None,
        resize: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        workers: int | None = None,
    ) -> None:
        self.paths, self.y, self.shape = paths, y, shape
        self.image_size, self.resize, self.mean, self.std = image_size, resize, mean, std
        self.workers = data_workers() if workers is None else workers

    def subset(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        out = FolderSplit(
            self.paths[:n],
            self.y[:n],
            shape=self.shape,
            image_size=self.image_size,
            resize=self.resize,
            mean=self.mean,
            std=self.std,
            workers=self.workers,
        )
        out.task = self.task
        return out

    def images(self, idx: torch.Tensor | slice) -> torch.Tensor:
        keys = range(len(self))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
        ds = _Decoded(self)
        if not keys:
            return torch.empty(0, *self.shape)
        return self._normalise(torch.stack([ds[(i, -1)] for i in keys]))

    def _load(self, key_batches: list[list[tuple[int, int]]]) -> Iterator[torch.Tensor]:
        if not key_batches:
            return
        loader = torch.utils.data.DataLoader(
            _Decoded(self),
            batch_sampler=key_batches,
            num_workers=self.workers,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=2 if self.workers else None,
            pin_memory=self.workers > 0 and torch.cuda.is_available(),
        )
        it = iter(loader)
        while True:
            try:
                u8 = next(it)
            except StopIteration:
                return
            except DataError as e:  # a worker's error arrives with its traceback: one line
                raise DataError(
                    str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]
                ) from None
            yield self._normalise(u8)

    def batches_at(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from self._load([[(int(i), -1) for i in idx] for idx in index_batches])

    def train_batches(
        self, index_batches: list[torch.Tensor], *, gen: torch.Generator, padding: int, flip: bool
    ) -> Iterator[torch.Tensor]:
        if self.task.dense:  # a crop or flip would move the image and not its mask
            yield from self.batches_at(index_batches)
            return
        keys = []
        for idx in index_batches:
            seeds = torch.randint(0, 2**31 - 1, (len(idx),), generator=gen)
            keys.append([(int(i), int(s)) for i, s in zip(idx, seeds, strict=True)])
        yield from self._load(keys)


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
    task: Task = field(default_factory=Classification)  # what the targets are for

    def __post_init__(self) -> None:
        for split in (self.train, self.val, self.test):
            split.task = self.task

    def with_task(self, task: Task) -> DataSplits:
        """These splits for another task (a user's task on a built-in dataset), checked."""
        wrong = task.check_data(self)
        if wrong is not None:
            raise DataError(
                f"dataset {self.name} does not fit task {task.name}: expected {wrong}; pick a "
                "dataset made for that task"
            )
        return dataclasses.replace(self, task=task)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return self.train.shape

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
            + ("|stream" if self.meta.get("stream") else "")
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return ["fashion-mnist", "cifar10", "imagefolder:PATH", "fashion-mnist-seg", "maskfolder:PATH"]


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
MIN_IMAGE_SIDE = 8  # the smallest side an image is served at (as --image-size's least value)
STREAM_ABOVE_BYTES = 1 << 30  # an imagefolder whose uint8 images exceed this is streamed
STATS_SAMPLE = 1000  # training images a streamed split's mean and std are computed on


def _scan(
    d: Path, classes: list[str], bad_images: str, *, every_class: bool = False
) -> tuple[list[str], list[int], set[tuple[int, int]]]:
    """Image files under ``d/<class>/`` with their labels and the set of (width, height) sizes
    (headers only). Unreadable files are refused, or skipped and reported in one line."""
    import sys

    from PIL import Image

    paths, labels, sizes, bad = [], [], set(), []
    for ci, c in enumerate(classes):
        for p in sorted((d / c).glob("*")):
            if p.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(p) as im:
                    sizes.add(im.size)
            except (OSError, SyntaxError, ValueError) as e:  # PIL's errors on bad files
                if bad_images == "refuse":
                    raise DataError(
                        f"imagefolder: cannot decode image {p}: {one_line(str(e))}; fix or remove "
                        'the file, or skip such files (bad_images = "skip", --bad-images skip)'
                    ) from None
                bad.append(f"{p}: {e}")
                continue
            paths.append(str(p))
            labels.append(ci)
    if bad:  # one line, however many
        print(
            f"note: imagefolder: skipped {len(bad)} unreadable images under {d} "
            f"(first: {one_line(bad[0])})",
            file=sys.stderr,
        )
    if not paths:
        raise DataError(f"imagefolder: no images under {d}; expected .png/.jpg files")
    seen = set(labels)
    empty = [c for ci, c in enumerate(classes) if ci not in seen]
    if every_class and empty:  # a class without images would be dropped or never learned
        raise DataError(
            f"imagefolder: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} under "
            f"{d} hold{'' if len(empty) > 1 else 's'} no readable images; expected images in "
            "every class folder: add some or remove the folder"
        )
    return paths, labels, sizes


def _imagefolder_files(
    path: str, seed: int, bad_images: str, image_size: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Train and test file paths and labels of ``PATH/train/<class>/*`` (test: ``PATH/test`` or
    20% of train, seeded), and the (C, H, W) every image is served at."""
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
    p, y, sizes = _scan(train_dir, classes, bad_images, every_class=True)
    if (root / "test").is_dir():
        pte, yte, more = _scan(root / "test", classes, bad_images)
        sizes |= more
        tr_p, tr_y, te_p, te_y = np.array(p), np.array(y), np.array(pte), np.array(yte)
    else:
        perm = np.random.default_rng(seed + 1).permutation(len(y))
        n_test = max(1, len(y) // 5)
        te, tr = perm[:n_test], perm[n_test:]
        tr_p, tr_y, te_p, te_y = np.array(p)[tr], np.array(y)[tr], np.array(p)[te], np.array(y)[te]
    if image_size is None and len(sizes) > 1:
        raise DataError(
            f"imagefolder: images under {root} have {len(sizes)} different sizes; "
            "give image_size (study file) or --image-size N to resize and crop them"
        )
    w, h = next(iter(sizes))
    if image_size is None and min(w, h) < MIN_IMAGE_SIDE:
        raise DataError(
            f"imagefolder: images under {root} are {w}x{h} px; expected at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (the models downsample several times): give "
            f"--image-size N (N >= {MIN_IMAGE_SIDE}) to resize them, or use larger images"
        )
    shape = (3, image_size, image_size) if image_size else (3, h, w)
    return tr_p, tr_y.astype(np.int64), te_p, te_y.astype(np.int64), shape


def _decode_all(paths: np.ndarray, image_size: int | None, resize: int | None) -> np.ndarray:
    """Every file's evaluation view, uint8 (N, C, H, W): the in-memory fast path."""
    side = short_side(image_size, resize)
    return np.stack([fit(_decode_named(p, side), image_size, resize).numpy() for p in paths])


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
    stream: bool | None = None,
) -> DataSplits:
    """Load a dataset by name and split its training set into train and validation.

    The split is a seeded permutation of the training set: the same ``seed`` and ``val_size``
    always give the same, disjoint train and validation sets. The test set is kept apart and
    untouched. Images are scaled to [0, 1] and normalised by the train split's per-channel mean
    and std, which are recorded with the split. ``limit_train`` keeps only the first N training
    images after the split, ``limit_test`` the first N test images (quick runs and tests).
    ``image_size``, ``resize`` and ``bad_images`` apply to ``imagefolder:`` (module docstring).
    ``stream`` (imagefolder only): decode images from their files when served instead of
    holding them in memory; default: when their uint8 bytes exceed ``STREAM_ABOVE_BYTES``.
    """
    sized = name.startswith(("imagefolder:", "maskfolder:")) or name == "fashion-mnist-seg"
    if image_size is not None and not sized:
        raise DataError(
            f"image_size applies to imagefolder:, maskfolder: and fashion-mnist-seg; {name} has "
            "a fixed size (drop it)"
        )
    if stream and not name.startswith(("imagefolder:", "maskfolder:")):
        raise DataError(
            f"stream applies to imagefolder: and maskfolder: datasets; {name} is held in memory"
        )
    if image_size is not None and image_size < 8:
        raise DataError(f"image_size must be >= 8 pixels; got {image_size}")
    if resize is not None and (image_size is None or resize < image_size):
        raise DataError(
            f"resize (shorter side, {resize}) needs image_size and must be >= it ({image_size})"
        )
    if limit_test is not None and limit_test < 1:
        raise DataError(f"limit_test must be >= 1 test images; got {limit_test}")
    dd = Path(data_dir) if data_dir else None
    files = None
    seg_classes = None  # a segmentation dataset's class count (its masks may hold 255)
    if name == "fashion-mnist-seg":
        xtr, ytr, xte, yte, seg_classes = fashion_mnist_seg(_fashion_mnist(dd), side=image_size)
    elif name.startswith("maskfolder:"):
        xtr, ytr, xte, yte, seg_classes, shape = maskfolder(
            name.split(":", 1)[1],
            seed=seed,
            image_size=image_size,
            resize=resize,
            stream=stream,
            stream_above=STREAM_ABOVE_BYTES,
            read_image=lambda p: fit(_decode_named(p, None), image_size, resize).numpy(),
        )
        if shape is not None:  # streamed: the image arrays are paths, the masks in memory
            files = (xtr, xte, shape)
    elif name == "fashion-mnist":
        xtr, ytr, xte, yte = _fashion_mnist(dd)
    elif name == "cifar10":
        xtr, ytr, xte, yte = _cifar10(dd)
    elif name.startswith("imagefolder:"):
        ptr, ytr, pte, yte, shape = _imagefolder_files(
            name.split(":", 1)[1], seed, bad_images, image_size
        )
        if stream is None:
            stream = (len(ptr) + len(pte)) * int(np.prod(shape)) > STREAM_ABOVE_BYTES
        if stream:
            files = (ptr, pte, shape)
        else:
            xtr, xte = _decode_all(ptr, image_size, resize), _decode_all(pte, image_size, resize)
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
        yte = yte[:limit_test]
    if seg_classes is not None:
        num_classes = seg_classes
    else:
        num_classes = int(max(ytr.max(), yte.max())) + 1
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ytr).tobytes())
    h.update(np.ascontiguousarray(yte).tobytes())
    meta = {
        "source_hash": h.hexdigest()[:16],
        "val_indices_hash": hashlib.sha256(val_idx.tobytes()).hexdigest()[:16],
        "limit_train": limit_train,
        "image_size": image_size,
        "resize": resize,
        "stream": bool(files),
    }

    def labels(a: np.ndarray) -> torch.Tensor:
        if seg_classes is not None:  # masks stay uint8: a byte per pixel
            return torch.from_numpy(np.array(a, dtype=np.uint8))
        return torch.from_numpy(np.array(a, dtype=np.int64))

    if files is not None:
        ptr, pte, shape = files
        pte = pte[: len(yte)]

        def folder(paths: np.ndarray, y: np.ndarray, mean=(0.0,) * 3, std=(1.0,) * 3) -> Split:
            return FolderSplit(
                [str(p) for p in paths],
                labels(y),
                shape=shape,
                image_size=image_size,
                resize=resize,
                mean=mean,
                std=std,
            )

        # mean and std of the evaluation view of a seeded sample (decoded once, in batches)
        sample = folder(ptr[train_idx[:STATS_SAMPLE]], ytr[train_idx[:STATS_SAMPLE]])
        total, sq, count = (
            torch.zeros(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            0,
        )
        for xb in sample.batches(128):  # mean 0, std 1: the pixels in [0, 1]
            xb = xb.double()
            total += xb.sum(dim=(0, 2, 3))
            sq += (xb * xb).sum(dim=(0, 2, 3))
            count += xb.numel() // 3
        mean_t = total / count
        std_t = ((sq - count * mean_t * mean_t) / max(1, count - 1)).clamp_min(1e-12).sqrt()
        mean = tuple(float(v) for v in mean_t)
        std = tuple(float(v) for v in std_t)
        train, val, test = (
            folder(ptr[train_idx], ytr[train_idx], mean, std),
            folder(ptr[val_idx], ytr[val_idx], mean, std),
            folder(pte, yte, mean, std),
        )
    else:
        xte = xte[: len(yte)]
        xtr_f = torch.from_numpy(xtr[train_idx]).float().div_(255.0)
        mean = tuple(float(v) for v in xtr_f.mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in xtr_f.std(dim=(0, 2, 3)))
        del xtr_f

        def held(a: np.ndarray, y: np.ndarray) -> Split:
            return TensorSplit(torch.from_numpy(np.array(a, copy=True)), labels(y), mean, std)

        train = held(xtr[train_idx], ytr[train_idx])
        val, test = held(xtr[val_idx], ytr[val_idx]), held(xte, yte)
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        mean=mean,
        std=std,
        seed=seed,
        meta=meta,
        task=Segmentation(num_classes=num_classes) if seg_classes is not None else Classification(),
    )
