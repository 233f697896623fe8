"""Runtimes benchmark: the same default space and teacher searched against ONNX Runtime,
OpenVINO and ExecuTorch (XNNPACK), each front's configurations exported for and timed on the
other two runtimes.

The default study (``studies/default.toml``: default space, BN-proxy screen, 150-step KD) with
the model swapped (MobileNetV3-small: the model whose int8 file ran slower than fp32 on an AVX2
CPU), ``--trials`` trials and no final level (the fronts compared are the level-1 fronts: every
configuration here, own or foreign, is recovered by the same 150-step KD, so a front and the
configurations it is compared with differ only by the search that chose them). Per runtime R:

1. ``autoslim search --backend R``: the default space's ``weight_bits = "runtime"`` times the
   teacher's uniform-int8 file against its fp32 file on R at setup and offers fp32 beside int8
   per stage where int8 is not at least 2x faster there (the ratio is printed);
2. every other search's front configurations, and the unpruned all-int8 configuration, are
   recovered and exported for R (``evaluate``: same recipe, same gate);
3. in one timing pass per runtime, interleaved (``time_files``, 5 rounds, 1 thread, batch 1):
   R's fp32 teacher file, R's own front files, the foreign files and the all-int8 file.

Printed: per runtime a Markdown table (test accuracy, bytes, latency ratio to R's fp32
teacher), whether a foreign configuration dominates a point of R's own front, and the three
runtimes' teacher and best-front latencies side by side.

Run: ``make bench-runtimes`` (finished searches in ``--out-dir`` are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import autoslim
from autoslim.measure import time_files
from autoslim.measure.backends import available_runtimes, backend_kind
from autoslim.record import OK
from autoslim.study.evaluation import evaluate
from autoslim.study.spec import STUDIES_DIR, load_study_spec
from autoslim.study.task import build_task, time_teacher

RUNTIMES = ("onnxruntime-cpu", "openvino-cpu", "executorch-xnnpack")
SHORT = {"onnxruntime-cpu": "ORT", "openvino-cpu": "OpenVINO", "executorch-xnnpack": "ExecuTorch"}


def study_file(out: Path, a: argparse.Namespace) -> Path:
    text = (STUDIES_DIR / "default.toml").read_text()
    text = text.replace('model = "resnet18"', f'model = "{a.model}"')
    text = text.replace("trials = 40 ", f"trials = {a.trials} ")
    text = text.replace("epochs = 6 ", f"epochs = {a.teacher_epochs} ")
    text = text.replace("final_points = 5 ", "final_points = 0 ")
    if a.gate is not None:  # a short-trained teacher's near-tied logits (see the section)
        text = text.replace("seed = 0\n", f"seed = 0\ngate_agreement = {a.gate}\n")
    f = out / ("bench-runtimes.toml" if a.gate is None else f"bench-runtimes-gate{a.gate}.toml")
    f.write_text(text)
    return f


def search(f: Path, out: Path, runtime: str) -> tuple[Path, float]:
    run = out / runtime
    done = run / "wall.json"
    if done.is_file():
        return run, json.loads(done.read_text())["wall_s"]
    cmd = [
        str(Path(sys.executable).with_name("autoslim")), "search", str(f), "--name", runtime,
        "--backend", runtime, "--out-dir", str(run), "--quiet",
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"search on {runtime} failed:\n{r.stderr[-3000:]}")
    done.write_text(json.dumps({"wall_s": wall}))
    return run, wall


def front_points(run: Path, runtime: str, tmp: Path) -> list[dict]:
    """The study's level-1 front: each point's config, file (fetched), accuracy and bytes."""
    view = autoslim.load_study(run)
    out = []
    for _, r in view.front.iterrows():
        t = int(r.trial)
        path = tmp / f"{runtime}-t{t}.{backend_kind(runtime)}"
        if not path.is_file():
            view.fetch(t, path)
        out.append(
            {
                "search": runtime,
                "label": f"{SHORT[runtime]} trial {t}",
                "config": view.config(t),
                "summary": str(r["summary"]),
                "test_accuracy": float(r["test_accuracy"]),
                "size_bytes": int(r["size_bytes"]),
                "path": path,
            }
        )
    return out


def foreign(point: dict, task, runtime: str, tmp: Path) -> dict | None:
    """``point``'s configuration recovered and exported for ``runtime`` (the same recipe)."""
    d = tmp / f"on-{runtime}" / point["label"].replace(" ", "-")
    res = json.loads((d / "res.json").read_text()) if (d / "res.json").is_file() else None
    if res is None:
        res = evaluate(task, point["config"], d, promote=True)
        res = {k: res.get(k) for k in ("status", "test_accuracy", "size_bytes", "fail_reason")}
        (d / "res.json").write_text(json.dumps(res))
    if res["status"] != OK:
        print(f"  {point['label']} on {runtime}: {res['status']} {res.get('fail_reason') or ''}")
        return None
    return {**point, "path": d / f"model.{backend_kind(runtime)}", **res}


def dominates(a: dict, b: dict) -> bool:
    return (
        a["test_accuracy"] >= b["test_accuracy"]
        and a["ratio"] <= b["ratio"]
        and (a["test_accuracy"] > b["test_accuracy"] or a["ratio"] < b["ratio"])
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_small")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--out-dir", default=".cache/bench-runtimes")
    p.add_argument(
        "--gate",
        type=float,
        default=None,
        help="the searches' gate_agreement (default: the study's, 0.99); a search already "
        "finished in --out-dir keeps the gate it ran with",
    )
    a = p.parse_args()
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "files"
    tmp.mkdir(exist_ok=True)
    runtimes = [r for r in a.runtimes.split(",") if r]
    missing = [r for r in runtimes if r not in available_runtimes()]
    if missing:
        raise SystemExit(
            f"not installed here: {missing} (pip install 'autoslim[openvino,executorch]')"
        )
    f = study_file(out, a)
    print(f"machine: {os.cpu_count()} cores; model {a.model}; {a.trials} trials per search, "
          f"teacher {a.teacher_epochs} epochs, no final level", flush=True)  # fmt: skip
    runs, fronts = {}, {}
    for r in runtimes:
        run, wall = search(f, out, r)
        view = autoslim.load_study(run)
        runs[r] = run
        fronts[r] = front_points(run, r, tmp)
        ok = int((view.trials["status"] == OK).sum())
        failed = int((view.trials["status"] == "failed").sum())
        print(f"search on {r}: {wall / 60:.1f} min wall, {ok} trained and measured, "
              f"{failed} failed, gate {view.spec.get('gate_agreement')}, "
              f"front {len(fronts[r])} points", flush=True)  # fmt: skip
    summary = []
    for r in runtimes:
        spec = load_study_spec(f, backend=r, out_dir=str(tmp / f"task-{r}"), latency_runs=20)
        task = build_task(spec, progress=False)
        bits = [d for d in task.space.dims if d.kind == "weight_bits"]
        print(f"\n### {r} ({task.latency.version()})\n\nint8/fp32 latency of the teacher's "
              f"uniform files at setup: {task.int8_ratio:.3f} -> per-stage precision "
              f"{'int8 or fp32' if bits else 'int8 only'}\n", flush=True)  # fmt: skip
        teacher = runs[r] / task.teacher_file
        time_teacher(task, runs[r])
        int8 = task.space.to_config(task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8))
        base = {"search": "-", "label": "all-int8 (unpruned)", "config": int8,
                "summary": int8.summary()}  # fmt: skip
        points = list(fronts[r])
        extra = [foreign(x, task, r, tmp) for s in runtimes if s != r for x in fronts[s]]
        extra.append(foreign(base, task, r, tmp))
        points += [x for x in extra if x is not None]
        timed = time_files([teacher] + [x["path"] for x in points], backend=r, rounds=a.rounds)
        teacher_ms = timed[0].median_ms
        for x, t in zip(points, timed[1:], strict=True):
            x["ratio"], x["ms"] = t.ratio, t.median_ms
        own = [x for x in points if x["search"] == r]
        others = [x for x in points if x["search"] != r]
        print("| point | chosen by | config | test acc | bytes | latency ratio |")
        print("|---|---|---|---:|---:|---:|")
        print(f"| fp32 teacher | - | - | {load_teacher_acc(runs[r]):.4f} | "
              f"{teacher.stat().st_size:,} | 1.000 ({teacher_ms:.3f} ms) |")  # fmt: skip
        for x in sorted(points, key=lambda x: x["ratio"]):
            print(f"| {x['label']} | {SHORT.get(x['search'], '-')} | {x['summary'].replace(' | ', '; ')[:70]} | "
                  f"{x['test_accuracy']:.4f} | {x['size_bytes']:,} | {x['ratio']:.3f} |")  # fmt: skip
        beaten = [(o["label"], p["label"]) for p in own for o in others if dominates(o, p)]
        print(f"\nown front dominated by a configuration another search chose: "
              f"{'NO (goal met)' if not beaten else 'yes: ' + '; '.join(f'{o} beats {p}' for o, p in beaten)}")  # fmt: skip
        best = min(own, key=lambda x: x["ratio"]) if own else None
        summary.append((r, teacher_ms, best))
    print(
        "\n| runtime | fp32 teacher (ms) | fastest own front point | its test acc | its ms | ratio |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for r, ms, best in summary:
        if best is not None:
            print(f"| {r} | {ms:.3f} | {best['label']} | {best['test_accuracy']:.4f} | "
                  f"{best['ms']:.3f} | {best['ratio']:.3f} |")  # fmt: skip
    return 0


def load_teacher_acc(run: Path) -> float:
    return float(autoslim.load_study(run).baseline.get("test_accuracy", float("nan")))


if __name__ == "__main__":
    sys.exit(main())
