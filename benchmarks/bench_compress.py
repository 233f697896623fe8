"""Compression benchmark on the default teacher (ResNet-18, Fashion-MNIST), side by side.

ONNX Runtime, 1 thread, batch 1, median of 300 runs after 30 warm-up runs, for: the fp32 teacher
artifact, the identity config, 50% structural pruning + int8, the same with int4 weights, and
the same with low-rank 0.5 on the 3x3 convs. Accuracy is the artifact's on the test split.
Run: ``make bench-compress`` (prints a Markdown table; ~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import autoslim
from autoslim.artifact import artifact_accuracy, export_onnx
from autoslim.measure import get_backend


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=430, help="KD steps (430 = one epoch)")
    ap.add_argument("--runs", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(2)
    data = autoslim.load_dataset()
    teacher = autoslim.get_teacher("resnet18", data)
    x = torch.zeros(1, *data.input_shape)
    groups = [g.name for g in autoslim.list_groups(teacher.model, x, classifier="fc")]
    convs3 = [
        n
        for n, m in teacher.model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"
    ]
    rec = autoslim.Recovery(steps=a.steps, subset=len(data.train))
    lowrank = autoslim.CompressionConfig(
        prune={g: 0.5 for g in groups},
        default=autoslim.LayerConfig(8, 8),
        layers={n: autoslim.LayerConfig(8, 8, 0.5) for n in convs3},
    )
    cases = [
        ("identity", autoslim.CompressionConfig()),
        (
            "prune 0.5 + int8",
            autoslim.CompressionConfig.uniform(prune=0.5, weight_bits=8, groups=groups),
        ),
        (
            "prune 0.5 + int4 w / uint8 act",
            autoslim.CompressionConfig.uniform(prune=0.5, weight_bits=4, groups=groups),
        ),
        ("prune 0.5 + int8 + low-rank 0.5 (3x3)", lowrank),
    ]
    backend = get_backend("onnxruntime-cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "teacher.onnx"
        export_onnx(copy.deepcopy(teacher.model), base, example=x)
        t_lat = backend.measure(base, input_shape=data.input_shape, runs=a.runs, warmup=30)
        t_acc = artifact_accuracy(base, data.test)[0]
        rows.append(("teacher fp32 ONNX", t_acc, base.stat().st_size, t_lat.median_ms, 1.0, 0.0))
        for name, cfg in cases:
            t0 = time.perf_counter()
            c = autoslim.compress(
                teacher.model,
                cfg,
                data=data,
                recovery=rec,
                teacher_key=teacher.content_hash,
                progress=True,
            )
            p = Path(tmp) / "m.onnx"
            r = autoslim.export(c, p, check=data.val.subset(1000))
            wall = time.perf_counter() - t0
            lat = backend.measure(p, input_shape=data.input_shape, runs=a.runs, warmup=30)
            acc = artifact_accuracy(p, data.test)[0]
            rows.append(
                (name, acc, r.size_bytes, lat.median_ms, lat.median_ms / t_lat.median_ms, wall)
            )
            print(
                f"{name}: acc {acc:.4f} size {r.size_bytes} lat {lat.median_ms:.3f} ms "
                f"agree {r.agreement:.4f}",
                file=sys.stderr,
            )
    print(
        f"\nteacher test accuracy (PyTorch): {teacher.meta['test_accuracy']:.4f}; "
        f"recovery: {a.steps} KD steps, batch 128\n"
    )
    print(
        "| artifact | test acc | size (bytes) | latency median (ms) | vs teacher | compress+recover (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, acc, size, lat, ratio, wall in rows:
        print(f"| {name} | {acc:.4f} | {size:,} | {lat:.3f} | {ratio:.3f}x | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
