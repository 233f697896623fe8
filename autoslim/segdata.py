"""Segmentation datasets: images with one class per pixel (masks held as uint8).

- ``fashion-mnist-seg``: mosaics made deterministically from Fashion-MNIST: on a black canvas
  (64 px square by default; ``image_size`` sets it, >= 32) 1 to 4 items are placed at seeded
  positions (a later item covers an earlier one), each item's silhouette (pixels above
  :data:`SILHOUETTE` of 255) labelled with its class + 1, background 0: 11 classes. 20,000
  training mosaics from the training images, 4,000 test mosaics from the test images.
- ``maskfolder:PATH``: a user's images with PNG masks of the same stems, in the VOC layout
  (``PATH/JPEGImages`` + ``PATH/SegmentationClass``) or ``PATH/images`` + ``PATH/masks``;
  optionally ``PATH/train/...`` and ``PATH/test/...`` (otherwise 20% of the pairs, seeded, are
  the test split). A mask holds class indices (palette or grey PNG); 255 is ignored. With
  ``image_size`` images are resized (bilinear) and masks (nearest) alike, then center-cropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import DataError, one_line

__all__ = ["fashion_mnist_seg", "maskfolder", "SEG_TRAIN", "SEG_TEST", "SILHOUETTE"]

SEG_TRAIN, SEG_TEST = 20_000, 4_000
SILHOUETTE = 0.15  # an item pixel belongs to its silhouette above this share of full intensity
MAX_ITEMS = 4


def _mosaics(
    items: np.ndarray, labels: np.ndarray, n: int, side: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics of ``side`` px from 28x28 ``items``: uint8 images (n, 1, side, side) and
    masks (n, side, side), the same for the same seed."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, side, side), np.uint8)
    y = np.zeros((n, side, side), np.uint8)
    count = rng.integers(1, MAX_ITEMS + 1, n)
    pick = rng.integers(0, len(items), (n, MAX_ITEMS))
    pos = rng.integers(0, side - 28 + 1, (n, MAX_ITEMS, 2))
    flip = rng.random((n, MAX_ITEMS)) < 0.5
    cut = int(round(SILHOUETTE * 255))
    for i in range(n):
        for j in range(count[i]):
            it = items[pick[i, j]]
            if flip[i, j]:
                it = it[:, ::-1]
            r, c = pos[i, j]
            sil = it > cut
            win_x, win_y = x[i, 0, r : r + 28, c : c + 28], y[i, r : r + 28, c : c + 28]
            win_x[sil] = it[sil]
            win_y[sil] = labels[pick[i, j]] + 1
    return x, y


def fashion_mnist_seg(
    fashion_mnist: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], *, side: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Train and test mosaics (images, masks) of ``fashion-mnist-seg``, made from the
    Fashion-MNIST arrays (train images (N, 1, 28, 28), labels, test images, labels), and its
    class count."""
    side = side or 64
    if side < 32:
        raise DataError(
            f"fashion-mnist-seg mosaics are at least 32 px (items are 28 px); got {side}"
        )
    xtr, ytr, xte, yte = fashion_mnist
    a, b = _mosaics(xtr[:, 0], ytr, SEG_TRAIN, side, seed=1)
    c, d = _mosaics(xte[:, 0], yte, SEG_TEST, side, seed=2)
    return a, b, c, d, 11


_IMAGES = ("JPEGImages", "images")
_MASKS = ("SegmentationClass", "masks")
_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one folder in either layout, by stem; unpaired files refused."""
    img_dir = next((root / d for d in _IMAGES if (root / d).is_dir()), None)
    mask_dir = next((root / d for d in _MASKS if (root / d).is_dir()), None)
    if img_dir is None or mask_dir is None:
        raise DataError(
            f"maskfolder: {root} holds no image and mask folders; expected "
            "JPEGImages/ + SegmentationClass/ (VOC) or images/ + masks/"
        )
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _SUFFIXES}
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() == ".png"}
    if not images:
        raise DataError(f"maskfolder: no images under {img_dir}; expected .png/.jpg files")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(
            f"maskfolder: {len(missing)} images under {img_dir} have no PNG mask of the same stem "
            f"in {mask_dir} (first: {missing[0]}); add the masks or remove the images"
        )
    return [(images[s], masks[s]) for s in sorted(images)]


def _side(image_size: int, resize: int | None) -> int:
    """The shorter side before the center crop (as ``autoslim.data.short_side``)."""
    return resize or round(image_size * 8 / 7)


def _read_mask(
    mask: Path, image_size: int | None, resize: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """One mask's class indices (int64 (H, W)), with ``image_size`` resized (nearest) and
    center-cropped as its image is; and its own (height, width)."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(mask) as mm:
            mode = mm.mode
            y = np.asarray(mm).astype(np.int64)
            raw = y.shape
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"maskfolder: cannot decode mask {mask}: {one_line(str(e))}") from None
    if mode not in ("P", "L", "I;16", "I"):
        raise DataError(
            f"maskfolder: mask {mask} is a {mode} image; expected class indices "
            "(a palette or greyscale PNG, 255 = ignore)"
        )
    if image_size is not None:
        t = TF.resize(
            torch.from_numpy(y)[None],
            [_side(image_size, resize)],
            interpolation=InterpolationMode.NEAREST_EXACT,
        )
        y = TF.center_crop(t, [image_size] * 2)[0].numpy()
    return y, raw


def _image_size(img: Path) -> tuple[int, int]:
    """(width, height) from the header."""
    from PIL import Image

    try:
        with Image.open(img) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"maskfolder: cannot decode image {img}: {one_line(str(e))}") from None


def maskfolder(
    path: str,
    *,
    seed: int,
    image_size: int | None,
    resize: int | None = None,
    stream: bool | None = None,
    stream_above: int = 1 << 30,
    read_image: Callable[[Path], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, tuple[int, int, int] | None]:
    """Train and test images, masks, the number of classes (the largest index below 255, plus
    one) and, when streamed, the (C, H, W) images are served at.

    Masks are held in memory (uint8, a byte per pixel). Images are too, unless ``stream`` (by
    default: when their uint8 bytes exceed ``stream_above``): then the image arrays are their
    file paths and ``autoslim.data`` decodes them per batch, as for ``imagefolder:``.
    ``read_image``: one image file -> its uint8 (C, H, W) evaluation view (``autoslim.data``'s
    decode and fit, so held and streamed images are the same pixels).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"maskfolder: {root} is not a directory; expected PATH/JPEGImages + "
            "PATH/SegmentationClass (or PATH/images + PATH/masks)"
        )
    if (root / "train").is_dir():
        train = _pairs(root / "train")
        test = _pairs(root / "test") if (root / "test").is_dir() else []
    else:
        train, test = _pairs(root), []
    if not test:
        perm = np.random.default_rng(seed + 1).permutation(len(train))
        n_test = max(1, len(train) // 5)
        test = [train[i] for i in perm[:n_test]]
        train = [train[i] for i in sorted(perm[n_test:])]
    if len(train) < 2:
        raise DataError(f"maskfolder: {root} has {len(train)} training pairs; need at least 2")
    sizes = {_image_size(i) for i, _ in train + test}
    if image_size is None and len(sizes) > 1:
        raise DataError(
            f"maskfolder: images under {root} have {len(sizes)} different sizes; give "
            "image_size (study file) or --image-size N to resize and crop them"
        )
    w, h = next(iter(sizes))
    if image_size is None and min(w, h) < 8:
        raise DataError(f"maskfolder: images under {root} are {w}x{h} px; give --image-size N")
    shape = (3, image_size, image_size) if image_size else (3, h, w)
    if stream is None:
        stream = len(train + test) * int(np.prod(shape)) > stream_above
    out: list[np.ndarray] = []
    top = 0
    for pairs in (train, test):
        ys = []
        for img, mask in pairs:
            y, raw = _read_mask(mask, image_size, resize)
            iw, ih = _image_size(img)
            if raw != (ih, iw):
                raise DataError(
                    f"maskfolder: mask {mask} is {raw[1]}x{raw[0]} px, its image "
                    f"{iw}x{ih}; expected the same size"
                )
            ys.append(y)
        y = np.stack(ys)
        bad = (y < 0) | ((y > 254) & (y != 255))
        if bad.any():
            raise DataError(
                f"maskfolder: masks under {root} hold class index {int(y[bad][0])}; expected "
                "0-254 (255 = ignore)"
            )
        valid = y[y != 255]
        top = max(top, int(valid.max()) if valid.size else 0)
        if stream:
            x = np.array([str(i) for i, _ in pairs])
        else:
            x = np.stack([read_image(i) for i, _ in pairs])
        out += [x, y.astype(np.uint8)]
    if top < 1:
        raise DataError(f"maskfolder: masks under {root} hold a single class; expected >= 2")
    return out[0], out[1], out[2], out[3], top + 1, shape if stream else None
