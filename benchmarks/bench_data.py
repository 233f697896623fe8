"""Real-data benchmark: a user's ImageFolder at real size and volume, streamed.

The benchmark makes its own data (nothing downloaded): ``--images`` JPEGs (default 20,000) of
mixed sizes (160-320 px a side, aspect kept random) from Fashion-MNIST's training images,
upscaled and tinted per class, in ``PATH/<class>/``. Then, one machine, one process at a time:

1. ``loader``: images/s of the streamed training loader (decode + random-resized crop + flip,
   normalised float batches of 128) at each ``--sizes`` (default 224, 96), with the
   DataLoader workers autoslim picks from the cores given and with none.
2. ``search``: a ``--trials`` search (MobileNetV3-small, torchvision stem at 224 px, the
   small-image stem at 96 px; short teacher and recovery, stated) on the whole folder, run as
   ``autoslim search`` under ``/usr/bin/time -v``: peak RSS, wall time, teacher and per-trial
   wall times.
3. ``kd``: the same candidate (uniform 50% pruning, int8) recovered from one teacher with the
   teacher's logits cached for the evaluation view, and with the teacher run on each augmented
   batch (``recovery_augment``): wall time and validation accuracy of the exported file.

Run: ``make bench-data`` (``--part loader|search|kd``, ``--images N``, ``--sizes 224,96``).
Data and runs go under ``--out-dir`` (default ``.cache/bench-data``, ignored by git); the data
is made once and reused.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
CLASSES = [
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
]  # fmt: skip


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def make_folder(root: Path, n: int) -> Path:
    """``n`` JPEGs of mixed sizes under ``root/<class>/`` (made once; reused when complete)."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return root
    x = _idx(FMNIST, 16).reshape(-1, 28, 28)
    y = _idx(FMNIST_LABELS, 8)
    rng = np.random.default_rng(0)
    tints = rng.uniform(0.4, 1.0, (10, 3))
    t0 = time.perf_counter()
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(x)
        w, h = (int(v) for v in rng.integers(160, 321, 2))
        grey = Image.fromarray(x[k]).resize((w, h), Image.Resampling.BILINEAR)
        rgb = (np.asarray(grey, dtype=np.float32)[..., None] * tints[y[k]]).astype(np.uint8)
        Image.fromarray(rgb).save(root / CLASSES[y[k]] / f"{i:06d}.jpg", quality=90)
    done.write_text(str(n))
    print(f"made {n} JPEGs in {time.perf_counter() - t0:.0f} s under {root}", file=sys.stderr)
    return root


def loader(root: Path, sizes: list[int]) -> None:
    import torch

    from autoslim.data import data_workers, load_dataset

    torch.set_num_threads(2)
    print("\n| image size | DataLoader workers | images/s (train view, batches of 128) |")
    print("|---:|---:|---:|")
    for size in sizes:
        d = load_dataset(f"imagefolder:{root}", val_size=500, image_size=size, stream=True)
        for workers in sorted({data_workers(), 0}, reverse=True):
            d.train.workers = workers
            gen = torch.Generator().manual_seed(0)
            order = list(torch.randperm(len(d.train), generator=gen)[: 128 * 16].split(128))
            t0 = time.perf_counter()
            n = sum(len(x) for x in d.train.train_batches(order, gen=gen, padding=0, flip=True))
            rate = n / (time.perf_counter() - t0)
            print(f"| {size} | {workers} | {rate:,.0f} |", flush=True)


def _study(out: Path, root: Path, size: int, trials: int, name: str, **extra: object) -> Path:
    f = out / f"{name}.toml"
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    f.write_text(
        f'name = "{name}"\nmodel = "mobilenet_v3_small"\ndataset = "imagefolder:{root}"\n'
        f"image_size = {size}\nstream = true\ntrials = {trials}\nval_size = 500\n"
        'limit_test = 1000\nlatency_runs = 50\ngate_images = 300\nmax_accuracy_drop = "none"\n'
        f'objectives = ["accuracy", "size"]\nout_dir = "{out / name}"\n{lines}'
        "[teacher]\nmax_steps = 150\nbatch_size = 64\nmax_lr = 0.02\n"
        "[recovery]\nsteps = 60\nbatch_size = 64\nsubset = 5000\n"
    )
    return f


def searches(root: Path, out: Path, sizes: list[int], trials: int) -> None:
    cli = Path(sys.executable).with_name("autoslim")
    print(
        "\n| image size | peak RSS (MB) | wall (min) | teacher (s, val acc) | trials: seconds "
        "each | front best val acc |"
    )
    print("|---:|---:|---:|---|---|---:|")
    for size in sizes:
        name = f"data-{size}px"
        study = _study(out, root, size, trials, name)
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", str(cli), "search", str(study), "--quiet", "--json"],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"search at {size} px failed ({proc.returncode})")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
        from autoslim.study.storage import open_existing

        st = open_existing(out / name)
        teacher = st.user_attrs.get("teacher", {})
        secs = [t.user_attrs.get("seconds") for t in st.trials]
        accs = [t.user_attrs.get("val_accuracy") or 0 for t in st.trials]
        print(
            f"| {size} | {rss / 1024:,.0f} | {wall / 60:.1f} | "
            f"{teacher.get('train_seconds', '?')}, {teacher.get('val_accuracy', float('nan')):.4f} "
            f"| {', '.join(f'{s:.0f}' for s in secs if s is not None)} | {max(accs):.4f} |",
            flush=True,
        )


def kd(root: Path, out: Path, size: int, steps: int) -> None:
    import torch

    from autoslim.study.evaluation import evaluate
    from autoslim.study.spec import load_study_spec
    from autoslim.study.task import build_task

    torch.set_num_threads(2)
    print(
        f"\n| KD targets ({size} px, {steps} steps, uniform 50% + int8) | wall (s) | val acc "
        "(file) |"
    )
    print("|---|---:|---:|")
    for augment, runs in ((False, 2), (True, 1)):
        name = f"kd-{size}px-{'aug' if augment else 'cached'}"
        study = _study(out, root, size, 1, name, recovery_augment=augment)
        spec = load_study_spec(study, recovery_steps=steps)
        task = build_task(spec, progress=False)
        params = task.space.uniform_params(prune=0.5, weight_bits=8, act_bits=8)
        config = task.space.to_config(params)
        for run in range(runs):  # cached: the first run also computes the teacher's logits
            t0 = time.perf_counter()
            res = evaluate(task, config, out / name / f"trial{run}")
            if augment:
                what = "teacher on each augmented batch"
            else:
                what = "cached logits, evaluation view" + (
                    " (first trial: computes the cache)" if run == 0 else " (cache reused)"
                )
            print(
                f"| {what} | {time.perf_counter() - t0:.0f} | {res.get('val_accuracy', 0):.4f} |",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("loader", "search", "kd", "all"), default="all")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--sizes", default="224,96")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--kd-steps", type=int, default=300)
    ap.add_argument("--out-dir", default=".cache/bench-data")
    args = ap.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = make_folder(out / f"folder-{args.images}", args.images)
    if args.part in ("loader", "all"):
        loader(root, sizes)
    if args.part in ("search", "all"):
        searches(root, out, sizes, args.trials)
    if args.part in ("kd", "all"):
        kd(root, out, min(sizes), args.kd_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
