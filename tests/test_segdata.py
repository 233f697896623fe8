"""Segmentation datasets: the fashion-mnist-seg mosaics and a user's maskfolder:PATH."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoslim import DataError, DataSplits, load_dataset
from autoslim.errors import UsageError
from autoslim.segdata import SILHOUETTE
from autoslim.study.spec import StudySpec
from autoslim.tasks import Classification, Segmentation

SMALL = {"val_size": 200, "limit_train": 300, "limit_test": 100}


def _digest(data: DataSplits) -> str:
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        h.update(split.u8.numpy().tobytes())
        h.update(split.y.numpy().tobytes())
    return h.hexdigest()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def seg() -> DataSplits:
    return load_dataset("fashion-mnist-seg", **SMALL)


# -- fashion-mnist-seg --------------------------------------------------------------------


def test_mosaics_are_deterministic(seg: DataSplits) -> None:
    again = load_dataset("fashion-mnist-seg", **SMALL)
    assert _digest(again) == _digest(seg)
    assert again.fingerprint() == seg.fingerprint()
    other_split = load_dataset("fashion-mnist-seg", **SMALL, seed=1)
    assert _digest(other_split) != _digest(seg)  # another validation split, same mosaics


def test_mosaics_have_eleven_classes_in_uint8_masks(seg: DataSplits) -> None:
    assert seg.num_classes == 11
    assert isinstance(seg.task, Segmentation) and seg.task.num_classes == 11
    assert seg.input_shape == (1, 64, 64)
    assert (len(seg.train), len(seg.val), len(seg.test)) == (300, 200, 100)
    for split in (seg.train, seg.val, seg.test):
        assert split.task is seg.task
        assert split.y.dtype == torch.uint8
        assert split.y.shape == (len(split), 64, 64)
        assert int(split.y.min()) == 0 and int(split.y.max()) <= 10
    seen = torch.cat([s.y.flatten() for s in (seg.train, seg.val, seg.test)]).unique()
    assert seen.tolist() == list(range(11))  # background and every item class occur
    assert seg.task.check_data(seg) is None


def test_background_is_the_majority_and_every_mosaic_has_an_item(seg: DataSplits) -> None:
    for split in (seg.train, seg.val, seg.test):
        y = split.y.reshape(len(split), -1)
        background = (y == 0).float().mean(1)
        assert float(background.min()) > 0.5  # in every mosaic
        assert bool((y != 0).any(1).all())  # at least one item pixel in each
        counts = torch.bincount(y.flatten().long(), minlength=11)
        assert int(counts.argmax()) == 0


def test_masks_align_with_images(seg: DataSplits) -> None:
    cut = round(SILHOUETTE * 255)
    for split in (seg.train, seg.val, seg.test):
        x, y = split.u8[:, 0], split.y
        assert x.shape == y.shape
        assert bool((x[y > 0] > cut).all())  # an item's silhouette is bright
        assert bool((x[y == 0] == 0).all())  # the canvas is black
    # the served (normalised) images keep the alignment: background pixels at the minimum
    img = seg.train.images(slice(0, 4))[:, 0]
    lo = img.amin(dim=(1, 2), keepdim=True).expand_as(img)
    assert torch.equal(img == lo, seg.train.y[:4] == 0)


def test_dense_training_batches_are_not_augmented(seg: DataSplits) -> None:
    idx = torch.arange(8)
    gen = torch.Generator().manual_seed(0)
    (batch,) = seg.train.train_batches([idx], gen=gen, padding=4, flip=True)
    assert torch.equal(batch, seg.train.images(idx))


def test_mosaic_size() -> None:
    data = load_dataset("fashion-mnist-seg", image_size=48, **SMALL)
    assert data.input_shape == (1, 48, 48)
    assert data.train.y.shape == (300, 48, 48)
    assert int(data.train.y.max()) <= 10
    assert data.num_classes == 11
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist-seg", image_size=24, **SMALL)
    assert "32" in _one_line(e)


def test_mosaics_are_not_a_classification_dataset(seg: DataSplits) -> None:
    with pytest.raises(DataError) as e:
        seg.with_task(Classification())
    assert "classification" in _one_line(e)
    fm = load_dataset("fashion-mnist", val_size=100, limit_train=200, limit_test=50)
    with pytest.raises(DataError):
        fm.with_task(Segmentation(num_classes=10))


def test_study_task_must_fit_the_dataset() -> None:
    small = {"val_size": 100, "limit_train": 200, "limit_test": 50}
    with pytest.raises(UsageError) as e:
        StudySpec(task="segmentation", dataset="fashion-mnist", **small).load_data()
    assert "fashion-mnist-seg" in _one_line(e)
    with pytest.raises(UsageError) as e:
        StudySpec(task="classification", dataset="fashion-mnist-seg", **small).load_data()
    _one_line(e)
    data = StudySpec(task="segmentation", dataset="fashion-mnist-seg", **small).load_data()
    assert isinstance(data.task, Segmentation) and data.num_classes == 11


# -- maskfolder:PATH ----------------------------------------------------------------------

N = 10
SIDE = 16
LABELS = {0, 1, 2, 3, 255}  # class 3 in one mask only; 255 (ignored) in several
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def _mask(i: int, side: int = SIDE) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    m[2:10, 2 + i % 4 : 10 + i % 4] = 1 + i % 2  # an object of class 1 or 2
    m[12:, :4] = 2
    if i == 3:
        m[6:9, 6:9] = 3  # central: a center crop keeps it
    if i % 3 == 0:
        m[10, :] = 255  # an outline: ignored
    return m


def _image(i: int, side: int = SIDE) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _mask_png(m: np.ndarray, mode: str) -> Image.Image:
    if mode == "P":
        im = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
        im.putpalette(PALETTE)
        return im
    return Image.frombytes("L", (m.shape[1], m.shape[0]), m.tobytes())


def _layout(root: Path, layout: str, n: int = N, start: int = 0) -> Path:
    """``n`` RGB images and their masks under ``root`` in the VOC layout (JPEGImages +
    SegmentationClass, palette masks) or images + masks (greyscale masks)."""
    voc = layout == "voc"
    img_dir = root / ("JPEGImages" if voc else "images")
    mask_dir = root / ("SegmentationClass" if voc else "masks")
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for i in range(start, start + n):
        # PNG images (lossless) so that the served pixels can be compared
        _image(i).save(img_dir / f"img_{i:03d}.png")
        _mask_png(_mask(i), "P" if voc else "L").save(mask_dir / f"img_{i:03d}.png")
    return root


@pytest.mark.parametrize("layout", ["voc", "plain"])
def test_maskfolder_layouts(tmp_path: Path, layout: str) -> None:
    root = _layout(tmp_path / "ds", layout)
    data = load_dataset(f"maskfolder:{root}", val_size=2)
    assert data.num_classes == 4  # the largest index (3) + 1; 255 is ignored
    assert isinstance(data.task, Segmentation) and data.task.num_classes == 4
    # 20% of the 10 pairs are the test split, 2 of the 8 others the validation split
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 2)
    assert data.input_shape == (3, SIDE, SIDE)
    masks = {}
    for split in (data.train, data.val, data.test):
        assert split.y.dtype == torch.uint8 and split.y.shape[1:] == (SIDE, SIDE)
        assert set(split.y.unique().tolist()) <= LABELS
        for x, y in zip(split.u8, split.y, strict=True):
            masks[x.numpy().tobytes()] = y.numpy()
    # every pair kept together: each image comes with its own mask
    for i in range(N):
        px = np.asarray(_image(i)).transpose(2, 0, 1).copy()
        assert np.array_equal(masks[px.tobytes()], _mask(i))
    assert len(masks) == N
    again = load_dataset(f"maskfolder:{root}", val_size=2)
    assert torch.equal(again.test.y, data.test.y)  # the test share is seeded


def test_maskfolder_train_and_test_folders(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _layout(root / "train", "plain", n=8)
    _layout(root / "test", "plain", n=3, start=8)
    data = load_dataset(f"maskfolder:{root}", val_size=2)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 3)


@pytest.mark.parametrize("size", [12, 24])
def test_maskfolder_resizes_masks_nearest(tmp_path: Path, size: int) -> None:
    root = _layout(tmp_path / "ds", "voc")
    data = load_dataset(f"maskfolder:{root}", val_size=2, image_size=size)
    assert data.input_shape == (3, size, size)
    assert data.num_classes == 4
    for split in (data.train, data.val, data.test):
        assert split.y.shape[1:] == (size, size)
        assert set(split.y.unique().tolist()) <= LABELS  # no blended class ids


def test_maskfolder_different_sizes_need_image_size(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "plain")
    _image(99, side=20).save(root / "images" / "big.png")
    _mask_png(_mask(1, side=20), "L").save(root / "masks" / "big.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    assert "image_size" in _one_line(e)
    data = load_dataset(f"maskfolder:{root}", val_size=2, image_size=16)
    assert len(data.train) + len(data.val) + len(data.test) == N + 1


def test_maskfolder_refuses_an_image_without_mask(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "plain")
    _image(50).save(root / "images" / "lonely.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    assert "lonely" in _one_line(e)


def test_maskfolder_refuses_an_rgb_mask(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "voc")
    bad = root / "SegmentationClass" / "img_004.png"
    _mask_png(_mask(4), "P").convert("RGB").save(bad)
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    msg = _one_line(e)
    assert "RGB" in msg and "img_004" in msg and "palette" in msg


def test_maskfolder_rgb_mask_is_not_called_undecodable(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "voc")
    _mask_png(_mask(4), "P").convert("RGB").save(root / "SegmentationClass" / "img_004.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    assert "cannot decode" not in _one_line(e)


def test_maskfolder_refuses_a_mask_of_another_size(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "plain")
    _mask_png(_mask(5, side=12), "L").save(root / "masks" / "img_005.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    msg = _one_line(e)
    assert "img_005" in msg and "12x12" in msg and "16x16" in msg


@pytest.mark.parametrize("what", ["empty", "images-only", "imagefolder-like", "missing"])
def test_maskfolder_refuses_a_folder_without_either_layout(tmp_path: Path, what: str) -> None:
    root = tmp_path / "ds"
    if what == "images-only":
        (root / "images").mkdir(parents=True)
        _image(0).save(root / "images" / "a.png")
    elif what == "imagefolder-like":
        for c in ("cat", "dog"):
            (root / c).mkdir(parents=True)
            _image(0).save(root / c / "a.png")
    elif what == "empty":
        root.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    assert str(root) in _one_line(e)


def test_maskfolder_refuses_a_single_class(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        _image(i).save(root / "images" / f"{i}.png")
        _mask_png(np.zeros((SIDE, SIDE), np.uint8), "L").save(root / "masks" / f"{i}.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=1)
    assert "single class" in _one_line(e)


def test_maskfolder_refuses_an_undecodable_mask(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "plain")
    (root / "masks" / "img_002.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as e:
        load_dataset(f"maskfolder:{root}", val_size=2)
    assert "img_002" in _one_line(e)


def test_maskfolder_streams_images_and_keeps_masks_in_memory(tmp_path: Path) -> None:
    """stream=True: images decoded from their files per batch (a FolderSplit), masks in memory;
    the same masks, images and classes as the in-memory load; dense: no crop or flip."""
    import numpy as np
    import torch
    from PIL import Image

    from autoslim.data import FolderSplit, TensorSplit

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            root / "images" / f"p{i}.png"
        )
        m = np.zeros((20, 24), np.uint8)
        m[4:16, 6:18] = 1 + i % 3
        Image.fromarray(m, "L").save(root / "masks" / f"p{i}.png")
    held = load_dataset(f"maskfolder:{root}", val_size=2, image_size=16, stream=False)
    streamed = load_dataset(f"maskfolder:{root}", val_size=2, image_size=16, stream=True)
    assert isinstance(held.train, TensorSplit) and isinstance(streamed.train, FolderSplit)
    assert streamed.num_classes == held.num_classes == 4
    assert torch.equal(streamed.train.y, held.train.y) and streamed.train.y.dtype == torch.uint8
    assert torch.allclose(
        streamed.train.images(slice(0, 3)), held.train.images(slice(0, 3)), atol=1e-4
    )  # the same pixels; mean and std computed in float64 when streamed
    batch = next(
        streamed.train.train_batches(
            [torch.arange(3)], gen=torch.Generator().manual_seed(0), padding=4, flip=True
        )
    )
    assert torch.allclose(batch, streamed.train.images(torch.arange(3)))
