"""Final-front benchmark: autoslim's final front against the by-hand, a sensitivity-greedy and
a random-search pipeline, all with one teacher and one final recovery recipe, side by side.

On the default task (ResNet-18 teacher, Fashion-MNIST, ``--budget``, default 2MB):

- (a) ``autoslim search --budget 2MB``: the default study with its fidelity levels (BN-proxy
  screen, short recovery of the promoted, final recovery of the level-1 front);
- (b) by hand: the smallest uniform int8 pruning ratio (0.05 grid) whose size estimate fits,
  then the final recovery;
- (c) sensitivity-greedy: per-stage pruning ratios chosen by the BN proxy, re-screened at every
  step, until the estimate fits (:func:`autoslim.study.sensitivity.greedy_params` with
  ``rescreen=True``), then the final recovery;
- (d) the same search as (a) with ``--sampler random``.

``--parts proxy`` checks the level-0 premise instead: the same search with every candidate
trained (``--promote 1``, no final level), then the rank correlation (Spearman) between the BN
proxy's accuracy and the level-1 (150-step KD) accuracy over the trained trials, and how many of
the level-1 front the proxy would have promoted at ``promote = 0.34``.

The final recovery is the default study's (``final_epochs`` of KD over the training split, the
last 30% quantization-aware). Then every final file and the fp32 teacher file are timed in this
one process, interleaved (ONNX Runtime, 1 thread, batch 1; median of ``--rounds`` medians of
200 runs), and measured on the test split. Printed: a Markdown table of every point (test
accuracy, bytes, latency ratio vs the teacher), each pipeline's wall time, which points each
front dominates, and the issue's goals as met / NOT met.

``--seeds K`` recovers every point again with recipe seeds 1..K-1 (the final recovery's batch
order) and judges the goals on each point's mean test accuracy, to tell a real gap from the
recovery's noise (each seed's file is kept in ``--out-dir``/seeds and reused).

``--teacher-epochs`` (default: the study's 6) picks the teacher recipe: cached after the first
run. Run: ``make bench-final`` (``--parts a,b,c,d``; runs are kept in ``--out-dir`` and a
finished part is reused when run again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import autoslim
from autoslim.artifact import artifact_accuracy
from autoslim.measure import time_files
from autoslim.pareto import pareto_mask
from autoslim.results.refinement import RefineRecipe, train_and_export
from autoslim.study.sensitivity import greedy_params
from autoslim.study.spec import STUDIES_DIR, load_study_spec
from autoslim.study.task import build_task, estimate
from autoslim.units import parse_size


def study_file(out: Path, teacher_epochs: int | None) -> Path:
    text = (STUDIES_DIR / "default.toml").read_text()
    if teacher_epochs is not None:
        text = text.replace("epochs = 6 ", f"epochs = {teacher_epochs} ")
    f = out / "bench-final.toml"
    f.write_text(text)
    return f


def run_search(
    f: Path, out: Path, name: str, budget: str, sampler: str, extra: list[str]
) -> tuple[Path, float]:
    run = out / name
    done = run / "wall.json"
    if done.is_file():
        return run, json.loads(done.read_text())["wall_s"]
    cmd = [
        str(Path(sys.executable).with_name("autoslim")), "search", str(f), "--name", name,
        "--budget", budget, "--sampler", sampler, "--out-dir", str(run), "--quiet", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{r.stderr[-3000:]}")
    print(r.stdout, flush=True)
    done.write_text(json.dumps({"wall_s": wall}))
    return run, wall


def time_went_to(run: Path, label: str, wall: float) -> str:
    """Where a search's wall time went: screened-out candidates, trained ones, the final level."""
    view = autoslim.load_study(run)
    df = view.trials
    names = {"screened": "screened out", "ok": "trained", "over_budget": "over budget"}
    parts = [
        f"{len(g)} {names.get(status, status)} ({g['seconds'].sum() / 60:.1f} min)"
        for status, g in df.groupby("status")
    ]
    fin = [r for t, r in view.refined.items() if view.is_final(t)]
    if fin:
        parts.append(f"{len(fin)} final ({sum(r['seconds'] for r in fin) / 60:.1f} min)")
    return f"{label}: {wall / 60:.1f} min wall = " + ", ".join(parts)


def final_points(run: Path, label: str, tmp: Path) -> list[dict]:
    view = autoslim.load_study(run)
    out = []
    for _, r in view.trials[view.trials["final"]].iterrows():
        t = int(r.trial)
        path = view.fetch(t, tmp / f"{label}-t{t}.onnx", refined=True)
        out.append(
            {
                "pipeline": label,
                "what": f"trial {t}: {r.summary}",
                "path": path,
                "config": view.config(t),
            }
        )
    return out


def by_recipe(task, config, recipe, out: Path, label: str, what: str) -> tuple[dict, float]:
    ident = {"bench_final": label, "config": config.to_json(), "recipe": recipe.to_dict()}
    res, _, secs = train_and_export(task, config, recipe, out / label, ident=ident, label=label)
    return {"pipeline": label, "what": what, "path": Path(res.path), "config": config}, secs


def uniform_by_hand(task, budget: int) -> tuple[dict, dict]:
    """The by-hand pipeline's choice: the smallest uniform int8 pruning ratio (0.05 grid) whose
    size estimate fits ``budget``."""
    for i in range(20):
        r = round(i * 0.05, 2)
        params = task.space.uniform_params(prune=r, weight_bits=8, act_bits=8)
        if estimate(task, task.space.to_config(params)) <= budget:
            break
    return params, {"what": f"uniform {r:.2f}, int8"}


def by_params(task, recipe, out: Path, label: str, choose, wall: dict) -> dict:
    """A hand-made or greedy pipeline: ``choose()`` -> (params, info), then the final recovery.
    A finished part (its params, file and wall time in ``out/label.json``) is reused."""
    done = out / f"{label}.json"
    if done.is_file():
        d = json.loads(done.read_text())
        wall[label] = d["wall_s"]
        config = task.space.to_config(d["params"])
        return {"pipeline": label, "what": d["what"], "path": Path(d["path"]), "config": config}
    t0 = time.perf_counter()
    params, info = choose()
    p, _ = by_recipe(task, task.space.to_config(params), recipe, out, label, info["what"])
    wall[label] = time.perf_counter() - t0
    done.write_text(
        json.dumps({"params": params, "wall_s": wall[label], **info, "path": str(p["path"])})
    )
    return p


def other_seeds(task, points: list[dict], recipe: RefineRecipe, n: int, out: Path) -> None:
    """Recover every point's model again with recipe seeds 1..n-1 (the batch order: the final
    recovery's training noise) and put the test accuracy of every seed in ``p["tests"]``.

    The same architecture and bits give the same bytes whatever the seed (checked), so a
    point's latency is its seed-0 file's. Each seed's file is kept in ``out/seeds`` and reused.
    """
    for p in points:
        p["tests"] = [p["test"]]
        for k in range(1, n):
            r = dataclasses.replace(recipe, seed=k)
            trial = p["what"].split(":")[0] if p["what"].startswith("trial") else ""
            name = "-".join(filter(None, [p["pipeline"], trial, f"s{k}"])).replace(" ", "-")
            f = out / "seeds" / name / "model.onnx"
            if not f.is_file():
                t0 = time.perf_counter()
                by_recipe(task, p["config"], r, out / "seeds", name, p["what"])
                print(f"{name}: recovered in {time.perf_counter() - t0:.0f} s", flush=True)
            if (size := os.path.getsize(f)) != p["bytes"]:
                raise SystemExit(f"{f} is {size:,} bytes, its seed 0 {p['bytes']:,}")
            p["tests"].append(artifact_accuracy(f, task.data.test)[0])
        p["test"] = float(np.mean(p["tests"]))  # the goals below judge the seeds' mean


def dominated_by(p: dict, front: list[dict], *, strict: bool = False) -> bool:
    """Whether a point of ``front`` has test accuracy >= and latency <= ``p``'s (the goal's
    test); ``strict``: and is better in one of them (the same model is not "dominating")."""
    return any(
        q["test"] >= p["test"]
        and q["ratio"] <= p["ratio"]
        and (not strict or q["test"] > p["test"] or q["ratio"] < p["ratio"])
        for q in front
    )


def proxy_check(f: Path, out: Path, budget: str) -> None:
    from scipy.stats import spearmanr

    from autoslim.pareto import promoted

    run = out / "proxy"
    cmd = [
        str(Path(sys.executable).with_name("autoslim")), "search", str(f), "--name", "proxy",
        "--budget", budget, "--promote", "1", "--final-points", "0", "--trials", "20",
        "--out-dir", str(run), "--quiet",
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"proxy search failed:\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    df = autoslim.load_study(run).trials
    ok = df[df["status"] == "ok"].sort_values("trial")
    rho = spearmanr(ok["screen_accuracy"], ok["val_accuracy"]).statistic
    # which trials promotion at 0.34 would have trained, in trial order as the search sees them
    pts, kept = [], []
    for _, row in ok.iterrows():
        pts.append([row.screen_accuracy, row.size_estimate])
        kept.append(promoted(np.array(pts), ["maximize", "minimize"], 0.34))
    ok = ok.assign(kept=kept)
    front = ok[ok["front"]]
    seconds = df.groupby("status")["seconds"].median().to_dict()
    print(
        f"proxy check ({len(ok)} trained trials, {wall / 60:.1f} min): Spearman(BN proxy, "
        f"level-1 val accuracy) = {rho:.3f}; promote 0.34 would keep {int(ok['kept'].sum())} "
        f"of {len(ok)}, {int(front['kept'].sum())} of the {len(front)} level-1 front points; "
        f"median seconds by status: {seconds}"
    )
    print("| trial | proxy acc | level-1 val acc | size | front | promoted at 0.34 |")
    print("|---:|---:|---:|---:|---|---|")
    for _, row in ok.iterrows():
        print(
            f"| {int(row.trial)} | {row.screen_accuracy:.4f} | {row.val_accuracy:.4f} | "
            f"{int(row.size_bytes):,} | {'yes' if row.front else ''} | "
            f"{'yes' if row.kept else 'no'} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="2MB")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out-dir", default=".cache/bench-final")
    ap.add_argument("--trials", type=int, default=None, help="default: the study's")
    ap.add_argument("--final-epochs", type=int, default=None, help="default: the study's")
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="recover every point with this many recipe seeds; the goals judge their mean",
    )
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    out = Path(a.out_dir).resolve()
    (out / "files").mkdir(parents=True, exist_ok=True)
    f = study_file(out, a.teacher_epochs)
    extra = [] if a.trials is None else ["--trials", str(a.trials)]
    if a.final_epochs is not None:
        extra += ["--final-epochs", str(a.final_epochs)]
    spec = load_study_spec(f, budget=a.budget, final_epochs=a.final_epochs)
    budget = parse_size(a.budget)
    recipe = RefineRecipe(
        epochs=spec.final_epochs,
        max_steps_per_epoch=spec.final_steps_per_epoch,
        temperature=spec.final_temperature,
        alpha=spec.final_alpha,
    )  # one final recovery recipe for all pipelines
    points, wall, went = [], {}, []
    for part, sampler, label in (("a", "tpe", "autoslim"), ("d", "random", "random")):
        if part in parts:
            run, wall[label] = run_search(f, out, f"final-{sampler}", a.budget, sampler, extra)
            points += final_points(run, label, out / "files")
            went.append(time_went_to(run, label, wall[label]))
    if "proxy" in parts:
        proxy_check(f, out, a.budget)
        if parts == {"proxy"}:
            return 0
    task = build_task(spec)
    if "b" in parts:
        points.append(
            by_params(task, recipe, out, "by hand", lambda: uniform_by_hand(task, budget), wall)
        )
    if "c" in parts:

        def greedy() -> tuple[dict, dict]:
            t0 = time.perf_counter()
            params = greedy_params(task, budget, rescreen=True)
            cfg = task.space.to_config(params)
            print(f"sensitivity-greedy widths chosen in {time.perf_counter() - t0:.0f} s: "
                  f"{cfg.summary()}")  # fmt: skip
            return params, {"what": cfg.summary()}

        points.append(by_params(task, recipe, out, "greedy", greedy, wall))

    # side by side: every file and the teacher's, interleaved, in this process
    teacher = out / "files" / "teacher_fp32.onnx"
    if not teacher.is_file():
        from autoslim.artifact import export_onnx

        export_onnx(task.teacher.model, teacher, example=task.example)
    # byte-identical files (two pipelines that chose the same model) are timed once per round
    # by time_files, so they share one latency instead of two draws of the machine's noise
    timed = time_files(
        [teacher] + [p["path"] for p in points],
        backend=spec.backend,
        rounds=a.rounds,
        input_shape=task.data.input_shape,
    )
    med = {i: t.median_ms for i, t in enumerate(timed)}
    print(f"{len({t.sha256 for t in timed[1:]})} distinct files among the {len(points)} points")
    t_test = artifact_accuracy(teacher, task.data.test)[0]
    for i, p in enumerate(points, start=1):
        p.update(
            test=artifact_accuracy(p["path"], task.data.test)[0],
            bytes=os.path.getsize(p["path"]),
            ms=med[i],
            ratio=med[i] / med[0],
        )
    seeds = a.seeds > 1
    if seeds:
        other_seeds(task, points, recipe, a.seeds, out)
    print(f"\nbudget {budget:,} bytes; final recovery {recipe.to_dict()}")
    print(f"teacher fp32: test {t_test:.4f}, {teacher.stat().st_size:,} bytes, {med[0]:.3f} ms\n")
    acc = f"test acc (mean of {a.seeds} seeds) | per seed | sd" if seeds else "test acc"
    print(f"| pipeline | point | bytes | {acc} | latency (ms) | vs teacher |")
    print("|---|---|---:|---:|" + ("---|---:|" if seeds else "") + "---:|---:|")
    for p in sorted(points, key=lambda p: (p["pipeline"], p["ratio"])):
        per = (
            f" {', '.join(f'{t:.4f}' for t in p['tests'])} | {np.std(p['tests'], ddof=1):.4f} |"
            if seeds
            else ""
        )
        print(
            f"| {p['pipeline']} | {p['what'].replace('|', '/')} | {p['bytes']:,} | "
            f"{p['test']:.4f} |{per} {p['ms']:.3f} | {p['ratio']:.3f} |"
        )
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()))
    for line in went:
        print(line)
    fronts = {}
    for label in ("autoslim", "random"):
        pts = [p for p in points if p["pipeline"] == label and p["bytes"] <= budget]
        if pts:
            v = np.array([[p["test"], p["ratio"]] for p in pts])
            mask = pareto_mask(v, ["maximize", "minimize"])
            fronts[label] = [p for p, m in zip(pts, mask, strict=True) if m]
    auto = fronts.get("autoslim", [])
    for other in ("by hand", "greedy"):
        for p in [p for p in points if p["pipeline"] == other]:
            ok = dominated_by(p, auto)
            print(
                f"goal: autoslim's front dominates {other} ({p['what']}): {'met' if ok else 'NOT met'}"
            )
    if auto:
        best = max(p["test"] for p in auto)
        small = [p["test"] for p in auto if p["bytes"] <= 300_000]
        print(
            f"goal: a point >= teacher + 0.8 pt: best {best - t_test:+.2%} -> "
            f"{'met' if best >= t_test + 0.008 else 'NOT met'}"
        )
        print(
            "goal: a point <= 300,000 bytes within 0.5 pt of the teacher: "
            + (
                f"best {max(small) - t_test:+.2%} -> "
                f"{'met' if max(small) >= t_test - 0.005 else 'NOT met'}"
                if small
                else "no such point -> NOT met"
            )
        )
    if "random" in fronts and auto:
        beaten = all(dominated_by(p, fronts["random"], strict=True) for p in auto)
        print(
            f"goal: random search does not dominate autoslim's front: {'NOT met' if beaten else 'met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
