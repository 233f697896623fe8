"""Tasks benchmark: segmentation searched like a classifier, and the detection example.

Segmentation (``fashion-mnist-seg``, LR-ASPP MobileNetV3-Large, 64 px, 11 classes): the
default study's fidelity levels with the model and dataset swapped (see ``study_file``), at a
budget of a fifth of the teacher's uniform-int8 file (its size estimate), against the by-hand
pipeline at the same budget (the smallest uniform int8 pruning ratio on a 0.05 grid whose
estimate fits) recovered with the same final recipe. Every final file and the fp32 teacher file
are then timed in this one process, interleaved (ONNX Runtime, 1 thread, batch 1), and scored on
the test split (mIoU). Printed: the teacher recipe, a Markdown table of the points, the gate's
pass rate over the measured candidates, and the issue's goals as met / NOT met.

Detection (``--parts det``): ``examples/detection/detection.py`` at its full settings: the
teacher's mAP and the front's best point.

Run: ``make bench-tasks`` (``--parts seg,det``; finished parts in ``--out-dir`` are reused).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench_final import by_params, final_points, run_search, time_went_to, uniform_by_hand

import autoslim
from autoslim.artifact import artifact_scores
from autoslim.measure import time_files
from autoslim.pareto import pareto_mask
from autoslim.results.refinement import RefineRecipe
from autoslim.study.spec import STUDIES_DIR, load_study_spec
from autoslim.study.task import build_task, estimate

MODEL = "lraspp_mobilenet_v3_large"
ROOT = Path(__file__).resolve().parents[1]


def study_file(out: Path, a: argparse.Namespace) -> Path:
    """The default study with the segmentation model and data and this benchmark's sizes."""
    text = (STUDIES_DIR / "default.toml").read_text()
    text = text.replace('model = "resnet18"', f'model = "{MODEL}"')
    text = text.replace(
        'dataset = "fashion-mnist"', 'dataset = "fashion-mnist-seg"\nval_size = 2000'
    )
    text = text.replace(
        "epochs = 6 ", f"epochs = {a.teacher_epochs}\nbatch_size = 64\nmax_lr = 0.05\n"
    )
    text = text.replace("trials = 40 ", f"trials = {a.trials} ")
    # 2,500 recovery images: the teacher's fp16 maps (11 x 64 x 64 each) fit the output cache
    text = text.replace("subset = 5000", "subset = 2500").replace(
        "batch_size = 128", "batch_size = 64"
    )
    text = text.replace("final_points = 5 ", "final_points = 3 ")
    text = text.replace(
        "final_epochs = 5 ",
        f"final_epochs = {a.final_epochs}\nfinal_steps_per_epoch = {a.final_steps} ",
    )
    f = out / "bench-tasks.toml"
    f.write_text(text)
    return f


def segmentation(a: argparse.Namespace, out: Path) -> None:
    f = study_file(out, a)
    spec = load_study_spec(f)
    task = build_task(spec)
    int8 = task.space.to_config(task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8))
    budget = estimate(task, int8) // 5
    print(f"teacher {MODEL}: recipe {task.teacher.meta.get('recipe')}, trained in "
          f"{task.teacher.meta.get('train_seconds')} s; uniform int8 estimate "
          f"{estimate(task, int8):,} bytes -> budget {budget:,} bytes", flush=True)  # fmt: skip
    recipe = RefineRecipe(
        epochs=spec.final_epochs,
        max_steps_per_epoch=spec.final_steps_per_epoch,
        temperature=spec.final_temperature,
        alpha=spec.final_alpha,
    )
    wall: dict[str, float] = {}
    extra = [] if a.max_drop is None else ["--max-accuracy-drop", a.max_drop]
    run, wall["autoslim"] = run_search(f, out, "seg-tpe", f"{budget}B", "tpe", extra)
    points = final_points(run, "autoslim", out / "files")
    view = autoslim.load_study(run)
    df = view.trials
    why = df["fail_reason"].fillna("") if "fail_reason" in df.columns else df["status"].map(str)
    trained = df[(df["status"] == "ok") | why.str.contains("correctness gate")]
    gated = int((df["status"] == "ok").sum())
    print(f"gate: {gated} of {len(trained)} trained candidates passed (pixel agreement >= "
          f"{spec.gate_agreement:.0%}); agreement min "
          f"{df.loc[df['status'] == 'ok', 'agreement'].min():.4f}")  # fmt: skip
    print(time_went_to(run, "autoslim", wall["autoslim"]))
    task = build_task(spec)  # the study's own (its size calibration, its teacher)

    points.append(
        by_params(task, recipe, out, "by hand", lambda: uniform_by_hand(task, budget), wall)
    )
    teacher = run / "teacher_fp32.onnx"
    timed = time_files(
        [teacher] + [p["path"] for p in points],
        backend=spec.backend,
        rounds=a.rounds,
        input_shape=task.data.input_shape,
    )
    med = [t.median_ms for t in timed]
    t_scores = artifact_scores(teacher, task.data.test)[0]
    for i, p in enumerate(points, start=1):
        s = artifact_scores(p["path"], task.data.test)[0]
        p.update(test=s["miou"], pix=s["pixel_accuracy"], bytes=os.path.getsize(p["path"]),
                 ms=med[i], ratio=med[i] / med[0])  # fmt: skip
    print(f"\nbudget {budget:,} bytes; final recovery {recipe.to_dict()}")
    print(f"teacher fp32: test mIoU {t_scores['miou']:.4f} (pixel accuracy "
          f"{t_scores['pixel_accuracy']:.4f}), {teacher.stat().st_size:,} bytes, {med[0]:.3f} ms\n")  # fmt: skip
    print("| pipeline | point | bytes | test mIoU | pixel acc | latency (ms) | vs teacher |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p in sorted(points, key=lambda p: (p["pipeline"], p["ratio"])):
        print(f"| {p['pipeline']} | {p['what'].replace('|', '/')} | {p['bytes']:,} | "
              f"{p['test']:.4f} | {p['pix']:.4f} | {p['ms']:.3f} | {p['ratio']:.3f} |")  # fmt: skip
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()))
    auto = [p for p in points if p["pipeline"] == "autoslim" and p["bytes"] <= budget]
    if auto:
        v = np.array([[p["test"], p["ratio"]] for p in auto])
        auto = [p for p, m in zip(auto, pareto_mask(v, ["maximize", "minimize"]), strict=True) if m]
    hand = [p for p in points if p["pipeline"] == "by hand"]
    print(f"goal: every measured candidate passes the gate: {gated}/{len(trained)} -> "
          f"{'met' if gated == len(trained) else 'NOT met'}")  # fmt: skip
    print(f"goal: the final front has >= 3 points: {len(auto)} -> "
          f"{'met' if len(auto) >= 3 else 'NOT met'}")  # fmt: skip
    for h in hand:
        ok = any(q["test"] >= h["test"] and q["ratio"] <= h["ratio"] for q in auto)
        print(f"goal: the front dominates by hand ({h['what']}): {'met' if ok else 'NOT met'}")
    near = [p for p in auto if p["ratio"] <= 0.25]
    best = max((p["test"] for p in near), default=None)
    print("goal: a point within 1 pt mIoU of the teacher at <= 25% of its latency: " + (
        f"best {best - t_scores['miou']:+.2%} -> "
        f"{'met' if best >= t_scores['miou'] - 0.01 else 'NOT met'}"
        if best is not None else "no point at <= 25% latency -> NOT met"))  # fmt: skip


def detection(a: argparse.Namespace, out: Path) -> None:
    path = ROOT / "examples" / "detection" / "detection.py"
    spec = importlib.util.spec_from_file_location("detection_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t0 = time.perf_counter()
    r = mod.search(out / "detection", progress=False)
    base = r.study.user_attrs["baseline"]
    print(f"\ndetection example ({(time.perf_counter() - t0) / 60:.1f} min): teacher fp32 "
          f"val mAP {base['val_accuracy']:.4f}, test mAP {base['test_accuracy']:.4f}, "
          f"{base['size_bytes']:,} bytes, {base['latency_ms']:.3f} ms")  # fmt: skip
    df = r.frame
    print("| point | bytes | val mAP | test mAP | latency (ms) | vs teacher |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = (
        df[df["final_front"]]
        if "final_front" in df.columns and df["final_front"].any()
        else r.front
    )
    for _, p in rows.sort_values("latency_ms").iterrows():
        print(f"| trial {int(p['trial'])}: {p['summary'].replace('|', '/')} | "
              f"{int(p['size_bytes']):,} | {p['val_accuracy']:.4f} | {p['test_accuracy']:.4f} | "
              f"{p['latency_ms']:.3f} | {p['latency_ms'] / base['latency_ms']:.3f} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="seg,det")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--final-steps", type=int, default=200, help="steps per final epoch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--max-drop",
        default=None,
        help="the search's --max-accuracy-drop (default: the default study's 0.05; 'none')",
    )
    ap.add_argument("--out-dir", default=".cache/bench-tasks")
    a = ap.parse_args()
    out = Path(a.out_dir).resolve()
    (out / "files").mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    if "seg" in parts:
        segmentation(a, out)
    if "det" in parts:
        detection(a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
