"""Datasets: deterministic disjoint splits, recorded normalisation, clear errors, imagefolder."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_DIR
from PIL import Image

from autoslim import DataError, DataSplits, Split, list_datasets, load_dataset


def _raw_idx(name: str) -> np.ndarray:
    """An IDX file read independently of autoslim (big-endian header, then bytes)."""
    with gzip.open(FMNIST_DIR / name, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _to_uint8(split: Split, data: DataSplits) -> np.ndarray:
    """Undo the normalisation: the original 0..255 pixels, one row per image."""
    m = torch.tensor(data.mean).view(1, -1, 1, 1)
    s = torch.tensor(data.std).view(1, -1, 1, 1)
    px = ((split.x * s + m) * 255.0).round()
    assert float(px.min()) >= 0 and float(px.max()) <= 255
    return px.to(torch.uint8).reshape(len(split), -1).numpy()


def _row_keys(rows: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter(r.tobytes() + bytes([int(y)]) for r, y in zip(rows, labels, strict=True))


@pytest.fixture(scope="module")
def full_seed0() -> DataSplits:
    return load_dataset("fashion-mnist", val_size=5000, seed=0)


def test_same_seed_gives_same_split(fmnist: DataSplits) -> None:
    again = load_dataset("fashion-mnist", val_size=500, limit_train=2000, seed=0)
    assert torch.equal(again.train.x, fmnist.train.x)
    assert torch.equal(again.train.y, fmnist.train.y)
    assert torch.equal(again.val.x, fmnist.val.x)
    assert again.meta["val_indices_hash"] == fmnist.meta["val_indices_hash"]
    assert again.fingerprint() == fmnist.fingerprint()


def test_other_seed_gives_other_split(fmnist: DataSplits) -> None:
    other = load_dataset("fashion-mnist", val_size=500, limit_train=2000, seed=1)
    assert other.meta["val_indices_hash"] != fmnist.meta["val_indices_hash"]
    assert not torch.equal(other.val.x, fmnist.val.x)
    assert not torch.equal(other.train.y, fmnist.train.y)
    assert other.fingerprint() != fmnist.fingerprint()


def test_train_and_val_partition_the_training_set(full_seed0: DataSplits) -> None:
    """Train + val hold every training image exactly once (as a multiset of image+label rows),
    so no image is in both and none is lost."""
    d = full_seed0
    assert (len(d.train), len(d.val)) == (55000, 5000)
    raw_x = _raw_idx("train-images-idx3-ubyte.gz").reshape(60000, -1)
    raw_y = _raw_idx("train-labels-idx1-ubyte.gz")
    train_keys = _row_keys(_to_uint8(d.train, d), d.train.y.numpy())
    val_keys = _row_keys(_to_uint8(d.val, d), d.val.y.numpy())
    assert train_keys + val_keys == _row_keys(raw_x, raw_y)
    # Every validation image that also appears in train is a true duplicate in the raw data.
    raw_keys = _row_keys(raw_x, raw_y)
    for k in val_keys.keys() & train_keys.keys():
        assert raw_keys[k] >= 2


def test_test_split_is_the_same_for_any_seed_and_val_size(
    fmnist: DataSplits, full_seed0: DataSplits
) -> None:
    other = load_dataset("fashion-mnist", val_size=777, limit_train=100, seed=3)
    raw_x = _raw_idx("t10k-images-idx3-ubyte.gz").reshape(10000, -1)
    raw_y = _raw_idx("t10k-labels-idx1-ubyte.gz")
    for d in (fmnist, full_seed0, other):
        assert len(d.test) == 10000
        assert np.array_equal(_to_uint8(d.test, d), raw_x)  # same images, same order
        assert np.array_equal(d.test.y.numpy(), raw_y)


def test_normalisation_is_recorded_and_train_is_standardised(full_seed0: DataSplits) -> None:
    d = full_seed0
    raw_mean = _raw_idx("train-images-idx3-ubyte.gz").mean() / 255.0
    assert len(d.mean) == len(d.std) == 1
    assert d.mean[0] == pytest.approx(raw_mean, abs=0.01)
    assert 0.2 < d.std[0] < 0.5
    assert abs(float(d.train.x.mean())) < 1e-3
    assert float(d.train.x.std()) == pytest.approx(1.0, abs=1e-3)
    # Validation uses the train statistics, so it is only roughly standardised.
    assert abs(float(d.val.x.mean())) < 0.05


def test_shapes_classes_and_limit_train(fmnist: DataSplits) -> None:
    assert fmnist.input_shape == (1, 28, 28)
    assert fmnist.num_classes == 10
    assert (len(fmnist.train), len(fmnist.val)) == (2000, 500)
    assert fmnist.train.x.dtype == torch.float32 and fmnist.train.y.dtype == torch.int64
    assert set(fmnist.train.y.tolist()) == set(range(10))
    assert fmnist.train.subset(10).x.shape == (10, 1, 28, 28)
    assert fmnist.train.subset(None) is fmnist.train


def test_missing_data_dir_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg
    assert "nowhere" in msg
    assert "\n" not in msg


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist-9000'") as e:
        load_dataset("mnist-9000")
    assert e.value.exit_code == 2
    assert "fashion-mnist" in str(e.value)  # lists what is accepted
    assert "fashion-mnist" in list_datasets()


@pytest.mark.parametrize("val_size", [0, -5, 60000, 70000])
def test_val_size_out_of_range(val_size: int) -> None:
    with pytest.raises(DataError, match=rf"val_size must be between 1 and 59999 .*got {val_size}"):
        load_dataset("fashion-mnist", val_size=val_size)


def _write_pngs(folder: Path, value: int, n: int, size=(12, 10)) -> None:
    """``n`` solid RGB images of ``size`` (width, height) with pixel value ``value``."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (value, value // 2, 255 - value)).save(folder / f"{i}.png")


def test_imagefolder_with_test_folder(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("test", 2)):
        _write_pngs(tmp_path / split / "ants", 10, n)
        _write_pngs(tmp_path / split / "bees", 240, n)
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    d = load_dataset(f"imagefolder:{tmp_path}", val_size=2, seed=0)
    assert d.num_classes == 2
    assert d.input_shape == (3, 10, 12)  # channels, height, width
    assert (len(d.train), len(d.val), len(d.test)) == (10, 2, 4)
    assert d.test.y.tolist() == [0, 0, 1, 1]  # classes in sorted folder order
    # Class 0 ('ants') is the dark one in the red channel, class 1 the bright one.
    red = _to_uint8(d.test, d).reshape(4, 3, -1)[:, 0, 0]
    assert red.tolist() == [10, 10, 240, 240]
    assert len(d.mean) == 3


def test_imagefolder_without_test_folder_holds_out_a_fifth(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "a", 0, 10)
    _write_pngs(tmp_path / "b", 255, 10)
    d = load_dataset(f"imagefolder:{tmp_path}", val_size=4, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 4, 4)
    assert sorted(d.train.y.tolist() + d.val.y.tolist() + d.test.y.tolist()) == [0] * 10 + [1] * 10


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    _write_pngs(tmp_path / "only_class", 0, 3)
    with pytest.raises(DataError, match="need at least 2"):
        load_dataset(f"imagefolder:{tmp_path}")
    _write_pngs(tmp_path / "other", 0, 2, size=(8, 8))
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(f"imagefolder:{tmp_path}", val_size=1)


def _mixed_folder(root: Path) -> Path:
    """Two classes of RGB, grey and palette images of six sizes and three formats."""
    sizes = [(40, 30), (17, 64), (96, 96), (33, 21), (128, 80), (50, 51)]
    for ci, c in enumerate(("cats", "dogs")):
        (root / c).mkdir(parents=True)
        for i, size in enumerate(sizes):
            img = Image.new("RGB", size, (200 * ci, 60, 30 * i))
            mode, ext = [("RGB", "png"), ("L", "jpg"), ("P", "gif")][i % 3]
            img.convert(mode).save(root / c / f"{i}.{ext}")
    return root


def test_imagefolder_of_any_size_and_format_is_resized_and_cropped(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    with pytest.raises(DataError, match="--image-size"):
        load_dataset(f"imagefolder:{root}", val_size=2)
    d = load_dataset(f"imagefolder:{root}", val_size=2, image_size=24)
    assert d.input_shape == (3, 24, 24)
    assert len(d.train) + len(d.val) + len(d.test) == 12
    other = load_dataset(f"imagefolder:{root}", val_size=2, image_size=24, resize=48)
    assert other.fingerprint() != d.fingerprint()  # another preprocessing, another teacher
    with pytest.raises(DataError, match="image_size applies to imagefolder"):
        load_dataset("fashion-mnist", image_size=32)


def test_a_corrupt_image_is_refused_by_path_or_skipped_once(tmp_path: Path, capsys) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    for k in range(3):
        (root / "dogs" / f"bad{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"bad0\.png"):
        load_dataset(f"imagefolder:{root}", val_size=2, image_size=16)
    d = load_dataset(f"imagefolder:{root}", val_size=2, image_size=16, bad_images="skip")
    assert len(d.train) + len(d.val) + len(d.test) == 12
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 3 unreadable images" in err[0] and "bad0.png" in err[0]


def test_a_mixed_size_folder_trains_a_teacher(tmp_path: Path, capsys) -> None:
    from conftest import TINY

    from autoslim.cli import main

    root = _mixed_folder(tmp_path / "mixed")
    args = ["train", "--model", TINY, "--dataset", f"imagefolder:{root}", "--val-size", "2"]
    assert main([*args, "--image-size", "32", "--max-steps", "3", "--batch-size", "4"]) == 0
    assert "teacher" in capsys.readouterr().out


def test_fingerprint_does_not_depend_on_the_thread_count() -> None:
    """Teachers are cached by it: a CLI run (all threads) must find the test run's (1 thread)."""
    prints = []
    for n in (1, 2):
        torch.set_num_threads(n)
        prints.append(load_dataset("fashion-mnist", val_size=500, limit_train=1500).fingerprint())
    torch.set_num_threads(1)
    assert prints[0] == prints[1]


def _denormalised(d: DataSplits, x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)


def test_a_streamed_folder_serves_the_images_the_in_memory_one_holds(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    held = load_dataset(f"imagefolder:{root}", val_size=2, image_size=24, stream=False)
    streamed = load_dataset(f"imagefolder:{root}", val_size=2, image_size=24, stream=True)
    assert type(held.train).__name__ == "TensorSplit" and held.train.u8.dtype == torch.uint8
    assert type(streamed.train).__name__ == "FolderSplit"
    assert streamed.input_shape == held.input_shape == (3, 24, 24)
    assert streamed.fingerprint() != held.fingerprint()  # other augmentation: other teacher
    for a, b in ((held.val, streamed.val), (held.test, streamed.test)):
        assert torch.equal(a.y, b.y)
        diff = _denormalised(held, a.x) - _denormalised(streamed, b.x)
        assert float(diff.abs().max()) < 1e-5
    assert streamed.mean == pytest.approx(held.mean, abs=1e-6)
    assert streamed.std == pytest.approx(held.std, abs=1e-6)
    batches = [torch.arange(0, 4), torch.arange(4, 8)]
    got = list(streamed.train.batches_at(batches))
    assert all(torch.equal(g, streamed.train.images(i)) for g, i in zip(got, batches, strict=True))


def test_streamed_training_batches_are_augmented_and_reproducible(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    d = load_dataset(f"imagefolder:{root}", val_size=2, image_size=24, stream=True)
    order = [torch.arange(0, 4), torch.arange(4, 8)]

    def views(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return list(d.train.train_batches(order, gen=gen, padding=0, flip=True))

    first, again, other = views(0), views(0), views(1)
    assert [tuple(v.shape) for v in first] == [(4, 3, 24, 24), (4, 3, 24, 24)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])  # another seed, other crops
    assert not torch.equal(first[0], d.train.images(order[0]))  # not the evaluation view


def test_a_file_that_breaks_after_the_scan_is_named_in_one_line(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    d = load_dataset(f"imagefolder:{root}", val_size=2, image_size=16, stream=True)
    victim = Path(d.val.paths[0])
    victim.write_bytes(b"not an image any more")
    for serve in (lambda: d.val.images(slice(0, 2)), lambda: list(d.val.batches(2))):
        with pytest.raises(DataError, match=re.escape(str(victim))) as e:
            serve()  # in this process, and in a DataLoader worker
        assert "\n" not in str(e.value)


_RSS_PROBE = """
import sys, torch
torch.set_num_threads(1)
from autoslim import load_dataset
d = load_dataset(sys.argv[1], val_size=50, image_size=128, stream=sys.argv[2] == "stream")
gen = torch.Generator().manual_seed(0)
order = list(torch.randperm(len(d.train), generator=gen).split(64))
for x in d.train.train_batches(order, gen=gen, padding=0, flip=True):
    pass
for x in d.val.batches(64):
    pass
# the peak of this process image (ru_maxrss would carry the parent's over the exec)
print([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0])  # kB
"""


def _solid_jpegs(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(140, 200, 2))
        Image.new("RGB", (w, h), (i % 256, 80, 160)).save(root / "ab"[i % 2] / f"{i}.jpg")
    return root


def test_streamed_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """Peak RSS of loading and serving every image once: 300 vs 1500 images at 128 px
    (uint8 in memory: +59 MB; float32: +236 MB). Streamed, the peak stays where it was."""
    peaks = {}
    for n in (300, 1500):
        root = _solid_jpegs(tmp_path / f"n{n}", n)
        for how in ("stream", "memory"):
            out = subprocess.run(
                [sys.executable, "-c", _RSS_PROBE, f"imagefolder:{root}", how],
                capture_output=True,
                text=True,
                check=True,
                # glibc's dynamic mmap threshold keeps freed batch buffers in the heap by
                # chance (+-200 MB between identical runs); a fixed one makes peaks repeatable
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
            )
            peaks[how, n] = int(out.stdout.split()[-1]) / 1024  # MB
    held = peaks["memory", 1500] - peaks["memory", 300]
    streamed = peaks["stream", 1500] - peaks["stream", 300]
    assert held > 40, peaks  # the probe sees memory that grows with the images
    assert streamed < 15, peaks
