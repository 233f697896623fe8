"""Latency benchmark: a device agent against local measurement, a second device, the predictor.

Two parts, one process, one machine (the agents are real ``autoslim agent`` processes on
loopback, started and stopped by this script):

1. ``artifacts``: ``--artifacts`` random configurations of the default space on ResNet-18
   (Fashion-MNIST, 28 px), exported untrained (latency depends on the architecture and bit
   widths, not on the weights, so recovery is skipped). Each file is timed, interleaved, on
   three "devices": locally (ONNX Runtime CPU, 1 thread, this process), through agent A
   (same runtime settings, over HTTP) and through agent B (``--ort-optimization basic``: no
   fused int8 kernels, the stand-in for a runtime without int8 support). Prints Spearman and
   the median ratio agent A / local, and the predictor's held-out calibration (Spearman, share
   within +-10%) per device and model kind: fitted on the first ``--fit`` files, scored on
   the rest.
2. ``search``: the same ``--trials`` default search (``--budget``, ``--max-latency``) run twice,
   with and without the latency predictor: trained trials, timed trials, skipped ones, wall
   time, the front. Then the front of the search without the predictor is re-measured on
   agent B and both fronts (val accuracy vs latency ratio to the teacher on that device) are
   printed side by side.

Run: ``make bench-latency`` (``--part artifacts|search``, ``--artifacts N``, ``--fit N``,
``--trials N``, ``--recovery-steps N``, ``--rounds R``: R passes over the files, each file's
median kept). Outputs under ``--out-dir`` (a temp folder by default).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import autoslim
from autoslim.measure import OrtBackend
from autoslim.measure.auth import create_secret, load_secret
from autoslim.measure.predictor import KINDS, LatencyPredictor, spearman
from autoslim.measure.remote import RemoteBackend
from autoslim.pareto import pareto_mask
from autoslim.passes.distill import Recovery
from autoslim.pipeline import compress, export
from autoslim.study.spec import load_study_spec
from autoslim.study.task import build_task, shape
from autoslim.workflow import search

torch.set_num_threads(1)


def start_agent(base: Path, *extra: str) -> tuple[subprocess.Popen, RemoteBackend]:
    """An ``autoslim agent`` process on a free loopback port, and a backend signed for it."""
    base.mkdir(parents=True, exist_ok=True)
    secret = base / "agent.secret"
    create_secret(secret)
    log = base / "agent.log"
    cmd = [sys.executable, "-m", "autoslim.cli", "agent", "--port", "0", "--secret", str(secret)]
    with open(log, "w") as err:
        proc = subprocess.Popen([*cmd, "--store", str(base / "models"), *extra], stderr=err)
    for _ in range(600):
        text = log.read_text()
        if "listening on http://" in text:
            port = int(text.split("listening on http://127.0.0.1:")[1].split(",")[0])
            return proc, RemoteBackend("127.0.0.1", port, secret=load_secret(secret))
        if proc.poll() is not None:
            raise SystemExit(f"agent exited: {text}")
        time.sleep(0.1)
    raise SystemExit("agent did not start")


def random_params(dims, rng: np.random.Generator) -> dict:
    out = {}
    for d in dims:
        k = d.knob
        if k.choices is not None:
            out[d.name] = k.choices[int(rng.integers(len(k.choices)))]
        else:
            steps = int(round((k.high - k.low) / k.step)) if k.step else None
            v = (
                k.low + k.step * int(rng.integers(steps + 1))
                if steps
                else rng.uniform(k.low, k.high)
            )
            out[d.name] = round(float(v), 6)
    return out


def part_artifacts(args, out: Path, devices: dict) -> None:
    spec = load_study_spec(
        "default", trials=1, teacher_epochs=args.teacher_epochs, out_dir=str(out / "artifacts")
    )
    task = build_task(spec, progress=False)
    rng = np.random.default_rng(0)
    teacher = out / "artifacts" / "teacher_fp32.onnx"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    from autoslim.artifact import export_onnx

    export_onnx(task.teacher.model, teacher, example=task.example)
    shape_in = task.data.input_shape

    def timed(backend, path: Path):
        # paired with the teacher's file (the protocol's reference blocks): what a search does
        return backend.measure(path, input_shape=shape_in, reference=teacher)

    rows, paths, t0 = [], [], time.perf_counter()
    for i in range(args.artifacts):
        config = task.space.to_config(random_params(task.space.dims, rng))
        c = compress(
            task.teacher.model, config, data=task.data, recovery=Recovery(steps=0, bn_batches=2)
        )
        path = out / "artifacts" / f"{i:03d}.onnx"
        export(c, path)
        rows.append({"features": shape(task, config)[1], "summary": config.summary()})
        paths.append(path)
    # --rounds passes over every file; in each pass a file is timed on every device in turn
    # (a drift hits every device alike) and passes spread one file's timings over minutes, so
    # a slow spell of the machine lands in one pass of a file, not in all of them
    samples: list[dict[str, list[float]]] = [{} for _ in rows]
    for rnd in range(args.rounds):
        for i, path in enumerate(paths):
            for name, backend in devices.items():
                lat = timed(backend, path)
                samples[i].setdefault(name, []).append(lat.ratio)
                samples[i].setdefault(name + "_ms", []).append(lat.median_ms)
            if rnd == args.rounds - 1:
                rows[i].update({k: statistics.median(v) for k, v in samples[i].items()})
                print(
                    f"  {i:3d} {rows[i]['summary'][:60]:60s} "
                    + "  ".join(f"{n} {rows[i][n + '_ms']:.3f} ms" for n in devices),
                    flush=True,
                )
    print(
        f"{len(rows)} artifacts timed on {len(devices)} devices, {args.rounds} round(s), median "
        f"per file, in {time.perf_counter() - t0:.0f} s"
    )
    local = [r["local"] for r in rows]
    a = [r["agent"] for r in rows]
    rel = np.array(a) / np.array(local)
    raw = np.array([r["agent_ms"] for r in rows]) / np.array([r["local_ms"] for r in rows])
    print(
        f"agent A vs local ({len(rows)} artifacts), paired ratios to the teacher: Spearman "
        f"{spearman(a, local):.3f}, median agent/local {statistics.median(rel):.3f}, "
        f"{np.mean(np.abs(rel - 1) <= 0.1):.0%} within +-10%; unpaired medians (ms): Spearman "
        f"{spearman([r['agent_ms'] for r in rows], [r['local_ms'] for r in rows]):.3f}, "
        f"median agent/local {statistics.median(raw):.3f}, "
        f"{np.mean(np.abs(raw - 1) <= 0.1):.0%} within +-10%"
    )
    b = [r["agent_basic"] for r in rows]
    print(
        f"agent B (basic) vs local: Spearman {spearman(b, local):.3f}; median ratio "
        f"{statistics.median(np.array(b) / np.array(local)):.2f}"
    )
    fit, held = rows[: args.fit], rows[args.fit :]
    print(f"predictor: fitted on {len(fit)} artifacts, scored on {len(held)} held out")
    print("| device | kind | held-out Spearman | within +-10% | p90 error | fit-time CV rho |")
    print("|---|---|---:|---:|---:|---:|")
    for dev in ("local", "agent_basic"):
        for kind in KINDS:
            p = LatencyPredictor(kind=kind).fit([r["features"] for r in fit], [r[dev] for r in fit])
            pred = p.predict([r["features"] for r in held])
            true = np.array([r[dev] for r in held])
            err = np.abs(pred / true - 1)
            print(
                f"| {dev} | {kind} | {spearman(pred, true):.3f} | {np.mean(err <= 0.1):.0%} | "
                f"{np.quantile(err, 0.9):.1%} | {p.calibration.rho:.3f} |"
            )


def front_of(points: list[dict], key: str) -> list[dict]:
    if not points:
        return []
    vals = np.array([[p["acc"], p[key]] for p in points])
    mask = pareto_mask(vals, ["maximize", "minimize"])
    return sorted((p for p, m in zip(points, mask, strict=True) if m), key=lambda p: -p["acc"])


def part_search(args, out: Path, devices: dict) -> None:
    runs = {}
    for use in (False, True):
        spec = load_study_spec(
            "default",
            name=f"bench-latency-{'with' if use else 'without'}",
            trials=args.trials,
            teacher_epochs=args.teacher_epochs,
            budget=args.budget,
            max_latency_ms=args.max_latency,
            recovery_steps=args.recovery_steps,
            latency_predictor=use,
            screen_images=0,
            final_points=0,  # level 1 only: what this benchmark measures
            out_dir=str(out / f"search-{'with' if use else 'without'}"),
        )
        t0 = time.perf_counter()
        res = search(spec, progress=False)
        wall = time.perf_counter() - t0
        df = res.frame
        runs[use] = res
        timed = int((df["latency_source"] == "measured").sum())
        trained = int(df["status"].isin(["ok"]).sum())
        print(
            f"{'with' if use else 'without'} predictor: {len(df)} trials, {trained} trained, "
            f"{timed} timed, {int((df['status'] == 'over_latency').sum())} over latency "
            f"(predicted, not trained), "
            f"{int((df['latency_source'] == 'predicted').sum())} not timed (dominated), "
            f"{int((df['status'] == 'over_budget').sum())} over budget; wall {wall:.0f} s; "
            f"front {int(df['front'].sum())}"
        )
        cal = res.study.user_attrs.get("latency_predictor")
        if cal:
            print("  " + cal["line"])
    res = runs[False]
    df = res.frame
    # every trained trial with a measured latency (a latency limit is device-specific)
    ok = df[(df["status"] == "ok") & (df["latency_source"] == "measured")]
    view = autoslim.load_study(res.task.spec.run_dir)
    teacher = res.task.spec.run_dir / "teacher_fp32.onnx"
    shape_in = res.task.data.input_shape
    b = devices["agent_basic"]
    ref_b = b.measure(teacher, input_shape=shape_in).median_ms
    points = []
    for _, r in ok.iterrows():
        path = view.fetch(int(r["trial"]), view.run_dir / f"t{int(r['trial'])}.onnx")
        points.append(
            {
                "trial": int(r["trial"]),
                "acc": float(r["val_accuracy"]),
                "a": float(r["latency_ms"] / r["teacher_latency_ms"]),
                "b": b.measure(path, input_shape=shape_in).median_ms / ref_b,
                "summary": r["summary"],
            }
        )
    for key, name in (
        ("a", "device A (local ORT, all optimisations)"),
        ("b", "device B (agent, --ort-optimization basic)"),
    ):
        front = front_of(points, key)
        print(f"front on {name}: trials {[p['trial'] for p in front]}")
        for p in front:
            print(
                f"  trial {p['trial']:3d}  val {p['acc']:.4f}  latency ratio A {p['a']:.3f}  "
                f"B {p['b']:.3f}  {p['summary'][:70]}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["artifacts", "search", "all"], default="all")
    ap.add_argument("--artifacts", type=int, default=80)
    ap.add_argument("--fit", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the files (median)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--recovery-steps", type=int, default=30)
    ap.add_argument("--teacher-epochs", type=int, default=1, help="teacher recipe (cached)")
    ap.add_argument("--budget", type=int, default=2_000_000)
    ap.add_argument("--max-latency", type=float, default=0.4, help="ms (local)")
    ap.add_argument("--out-dir")
    args = ap.parse_args()
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-latency-"))
    procs = []
    try:
        pa, agent = start_agent(out / "agent-a")
        pb, basic = start_agent(out / "agent-b", "--ort-optimization", "basic")
        procs = [pa, pb]
        devices = {"local": OrtBackend(), "agent": agent, "agent_basic": basic}
        print(
            f"outputs in {out}; agent A {agent.device_identity()}, agent B "
            f"{basic.device_identity()}",
            flush=True,
        )
        if args.part in ("artifacts", "all"):
            part_artifacts(args, out, devices)
        if args.part in ("search", "all"):
            part_search(args, out, devices)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
