"""Refine benchmark: autoslim's refined front point vs the by-hand pipeline, side by side.

On the default study (ResNet-18 teacher, Fashion-MNIST, ``--budget 2MB``; searched first if it
is not stored yet), with the same teacher and the same recovery recipe (``--epochs`` of KD over
the training split, the last 30% quantization-aware):

- by hand: one pruning ratio in every prunable group (the smallest on a 0.05 grid whose int8
  artifact fits the budget), KD, ONNX Runtime int8;
- autoslim: the most accurate feasible front point at <= budget whose search-time latency is no
  worse than the by-hand config's (a baseline trial of the study; 25% noise margin), refined
  with ``autoslim.refine``.

Both artifacts and the fp32 teacher artifact are then timed in one process, interleaved
(ONNX Runtime, 1 thread, batch 1; median of ``--rounds`` medians). Prints a Markdown table.
Run: ``make bench-refine`` (~20 min on 2 cores with a stored study and cached teacher).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import autoslim
from autoslim.artifact import artifact_accuracy
from autoslim.measure import get_backend, time_files
from autoslim.results.refinement import RefineRecipe, train_and_export
from autoslim.results.view import load_study
from autoslim.study.spec import StudySpec, load_study_spec
from autoslim.study.task import build_task, estimate
from autoslim.units import parse_size
from autoslim.workflow import search


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="default", help="stored study name or folder")
    ap.add_argument("--budget", default="2MB")
    ap.add_argument("--epochs", type=int, default=RefineRecipe.epochs)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="quick runs only")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--trial", type=int, default=None, help="use this front point, not the pick")
    ap.add_argument(
        "--sweep",
        default=None,
        help="only sweep the epochs of the autoslim point's refine, e.g. 1,2,3,5: final test "
        "accuracy and wall time per setting (how the default --epochs was chosen)",
    )
    a = ap.parse_args()
    budget = parse_size(a.budget)
    recipe = RefineRecipe(epochs=a.epochs, max_steps_per_epoch=a.max_steps_per_epoch)
    try:
        view = load_study(a.study)
    except autoslim.UsageError:
        print(f"no stored study {a.study!r}: running `autoslim search --budget {a.budget}`")
        t = time.perf_counter()
        search(load_study_spec(None, name=a.study, budget=a.budget, final_points=0))
        print(f"search took {time.perf_counter() - t:.0f} s", file=sys.stderr)
        view = load_study(a.study)
    task = build_task(StudySpec.from_dict(view.spec))
    base = view.baseline

    # by hand: the smallest uniform int8 ratio that fits
    ratio, config = None, None
    for i in range(0, 19):
        r = round(i * 0.05, 2)
        cfg = task.space.to_config(task.space.uniform_params(prune=r, weight_bits=8, act_bits=8))
        if estimate(task, cfg) <= budget:
            ratio, config = r, cfg
            break
    if config is None:
        print(f"no uniform int8 ratio fits {budget:,} bytes", file=sys.stderr)
        return 1
    work = view.run_dir / "bench-refine" / f"by-hand-{ratio:.2f}"
    ident = {"by_hand": ratio, "config": config.to_json(), "recipe": recipe.to_dict()}
    hand, hand_hist, hand_s = train_and_export(
        task, config, recipe, work, ident=ident, label=f"by hand (uniform {ratio:.2f}, int8)"
    )

    # autoslim: the most accurate feasible front point at <= budget whose search-time latency is
    # no worse than the by-hand config's search-time latency (it is a baseline trial of every
    # study; 25% margin for timing noise). Both were measured in the same study run.
    backend_name = view.spec.get("backend", "onnxruntime-cpu")
    backend = get_backend(backend_name)
    shape = task.data.input_shape
    same = view.trials[
        (view.trials["config"] == config.to_json()) & (view.trials["status"] == "ok")
    ]
    if len(same):
        max_latency = float(same.iloc[0]["latency_ms"]) * 1.25
    else:  # not in the study: its latency relative to the teacher's, measured now
        ratio = statistics.median(
            backend.measure(hand.path, input_shape=shape, runs=200).median_ms
            / backend.measure(
                view.run_dir / "teacher_fp32.onnx", input_shape=shape, runs=200
            ).median_ms
            for _ in range(3)
        )
        max_latency = base["latency_ms"] * ratio * 1.25
    front = replace(view, trials=view.front)
    row = autoslim.pick(front, max_size=budget, max_latency_ms=max_latency, prefer="accuracy")
    trial = int(row.trial) if a.trial is None else a.trial
    if a.trial is not None:
        row = view.measured_row(trial)
    if a.sweep:
        return sweep(task, view, trial, [int(e) for e in a.sweep.split(",")], a)
    final = view.run_dir / f"refined-t{trial}.onnx"
    ref = autoslim.refine(view, trial, final, recipe=recipe)
    search_s = float(view.trials["seconds"].sum())

    # side-by-side measurement
    paths = {
        "teacher": view.run_dir / "teacher_fp32.onnx",
        "by hand": hand.path,
        "autoslim": final,
    }
    timed = time_files(
        list(paths.values()), backend=backend_name, rounds=a.rounds, input_shape=shape
    )
    med = {k: t.median_ms for k, t in zip(paths, timed, strict=True)}
    acc = {k: artifact_accuracy(p, task.data.test)[0] for k, p in paths.items()}
    size = {k: os.path.getsize(p) for k, p in paths.items()}
    secs = {"teacher": float("nan"), "by hand": hand_s, "autoslim": ref["seconds"]}
    what = {
        "teacher": "fp32 ONNX",
        "by hand": f"uniform prune {ratio:.2f}, int8, {recipe.epochs} epochs KD",
        "autoslim": f"trial {trial}: {row.summary.replace('|', '/')}, refined {recipe.epochs} epochs",
    }
    print(f"\nbudget {budget:,} bytes; recipe {recipe.to_dict()}\n")
    print("| artifact | config | test acc | bytes | latency (ms) | vs teacher | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for k in paths:
        print(
            f"| {k} | {what[k]} | {acc[k]:.4f} | {size[k]:,} | {med[k]:.3f} | "
            f"{med[k] / med['teacher']:.3f}x | {secs[k]:.0f} |"
        )
    print(
        f"\nautoslim search time (sum of its {len(view.trials)} trials): {search_s:.0f} s; "
        f"search-time test acc of trial {trial}: {row.test_accuracy:.4f}"
    )
    print("per-epoch val accuracy (PyTorch model):")
    print("  by hand: " + ", ".join(f"{h['val_accuracy']:.4f}" for h in hand_hist))
    print("  autoslim: " + ", ".join(f"{h['val_accuracy']:.4f}" for h in ref["history"]))
    gap_teacher = (acc["teacher"] - acc["autoslim"]) * 100
    gap_hand = (acc["autoslim"] - acc["by hand"]) * 100
    print(
        f"\ngoal 1: within 0.3 pt of the teacher: {-gap_teacher:+.2f} pt vs the teacher -> "
        f"{'met' if gap_teacher <= 0.3 else 'NOT met'}"
    )
    print(
        f"goal 2: >= 1.0 pt above by hand at no worse latency: {gap_hand:+.2f} pt, latency "
        f"{med['autoslim'] / med['by hand']:.2f}x by hand's -> "
        f"{'met' if gap_hand >= 1.0 and med['autoslim'] <= med['by hand'] * 1.05 else 'NOT met'}"
    )
    return 0


def sweep(task, view, trial: int, epochs: list[int], a: argparse.Namespace) -> int:
    """Refine the same config with several epoch counts (own folders; the study is untouched)."""
    config = view.config(trial)
    print(f"\ntrial {trial} ({view.row(trial).summary.replace('|', '/')}), refined with E epochs\n")
    print("| epochs | test acc | val acc | wall (s) |")
    print("|---|---|---|---|")
    for e in epochs:
        recipe = RefineRecipe(epochs=e, max_steps_per_epoch=a.max_steps_per_epoch)
        work = view.run_dir / "bench-refine" / f"sweep-t{trial}-e{e}"
        ident = {"sweep": trial, "config": config.to_json(), "recipe": recipe.to_dict()}
        res, _, secs = train_and_export(
            task, config, recipe, work, ident=ident, label=f"trial {trial}, {e} epochs"
        )
        test = artifact_accuracy(res.path, task.data.test)[0]
        val = artifact_accuracy(res.path, task.data.val)[0]
        print(f"| {e} | {test:.4f} | {val:.4f} | {secs:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
