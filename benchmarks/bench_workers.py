"""Many workers on one PostgreSQL study: trials per hour of 1, 2 and 4 workers on this machine.

For each ``--workers`` count K (default 1,2,4): a fresh database on a throwaway PostgreSQL
server (Debian's package, fsync on as a production server runs it) and ``autoslim search
--storage URL --workers K`` on the default study at its default fidelity (150 KD steps per
trial; every candidate trained: ``--budget none``), ``--trials`` in all, with the thread
setting autoslim picks (cores / K, at least 1) and the artifact store in a folder. Printed per
K: wall time of the whole command, trials per hour in the steady state (trials completed after
the first one, over the time from the first completion to the last), the median trial time, and the per-trial overhead outside the candidate's own
work: a trial's wall time in the storage (start to complete) minus the time its evaluation
reported (``seconds``), i.e. sampling, the storage's writes, the artifact upload, the heal and
predictor steps.

Then the storage and store alone: ``--ops`` synthetic trials against the same server that make
the runner's storage calls (ask; the ~30 user attributes a trial records; constraints; a 1 MB
artifact upload; tell) with nothing else, timed; and the same against a SQLite file.

The teacher is the default model's 1-epoch recipe (``--teacher-epochs``, cached after the
first run): a trial's cost does not depend on how long the teacher was trained.

Run: ``make bench-workers`` (``--workers 1,2,4``, ``--trials 10``, ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pgserver import throwaway_postgres  # noqa: E402

from autoslim.study.spec import STUDIES_DIR  # noqa: E402


def study_file(out: Path, teacher_epochs: int) -> Path:
    text = (STUDIES_DIR / "default.toml").read_text()
    text = text.replace("epochs = 6 ", f"epochs = {teacher_epochs} ")
    assert f"epochs = {teacher_epochs} " in text
    f = out / "bench-workers.toml"
    f.write_text(text)
    return f


def run_workers(f: Path, url: str, k: int, trials: int, out: Path) -> dict:
    name = f"w{k}"
    cmd = [
        str(Path(sys.executable).with_name("autoslim")), "search", str(f), "--name", name,
        "--storage", url, "--workers", str(k), "--trials", str(trials), "--budget", "none",
        "--out-dir", str(out / name), "--artifacts", str(out / f"store-{name}"), "--quiet",
        "--screen-images", "0", "--final-points", "0",  # level-1 trials: the worker's unit
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"workers={k} failed:\n{r.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=url)
    done = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete
    )
    # steady state: from the first completion to the last (the first trial of a run also pays
    # one-off work: size calibration, the first export's tracing)
    window = (done[-1].datetime_complete - done[0].datetime_complete).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    overhead = [
        d - float(t.user_attrs.get("seconds", d)) for d, t in zip(durations, done, strict=True)
    ]
    (out / f"{name}-trials.json").write_text(
        json.dumps(
            [
                {
                    "trial": t.number,
                    "start": t.datetime_start.isoformat(),
                    "complete": t.datetime_complete.isoformat(),
                    "seconds": t.user_attrs.get("seconds"),
                    "pid": t.user_attrs.get("owner", {}).get("pid"),
                    "size_bytes": t.user_attrs.get("size_bytes"),
                }
                for t in done
            ],
            indent=1,
        )
    )
    threads = {w["threads"] for k_, w in study.user_attrs.items() if k_.startswith("worker:")}
    return {
        "workers": k,
        "threads": sorted(threads),
        "trials": len(done),
        "wall_s": wall,
        "window_s": window,
        "per_hour": (len(done) - 1) / window * 3600,
        "median_trial_s": statistics.median(durations),
        "median_overhead_s": statistics.median(overhead),
        "failed": sum(t.state.name == "FAIL" for t in study.trials),
    }


def storage_ops(url: str, n: int, tmp: Path) -> float:
    """Median seconds of the storage calls one trial makes, with no work in between."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store_dir = tmp / f"store-{abs(hash(url))}"
    store_dir.mkdir()
    store = FileSystemArtifactStore(store_dir)
    blob = tmp / "model.onnx"
    blob.write_bytes(os.urandom(1 << 20))
    study = optuna.create_study(
        study_name=f"ops{abs(hash(url))}", storage=url, directions=["maximize", "minimize"]
    )
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        trial.suggest_float("prune", 0.0, 0.9)
        for j in range(30):
            trial.set_user_attr(f"attr{j}", {"value": i * j, "text": "x" * 40})
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [0.0])
        upload_artifact(artifact_store=store, file_path=str(blob), study_or_trial=trial)
        study.tell(trial, [0.9, 1.0])
        study.get_trials(deepcopy=False)  # the heal and predictor steps read the trials
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4", help="comma list of worker counts")
    ap.add_argument("--trials", type=int, default=10, help="trials per worker count")
    ap.add_argument("--ops", type=int, default=30, help="synthetic trials for the storage alone")
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--out-dir", default=".cache/bench-workers")
    a = ap.parse_args()
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    f = study_file(out, a.teacher_epochs)
    print(f"cores: {len(os.sched_getaffinity(0))}; default study, 150 KD steps, budget none")
    rows = []
    with throwaway_postgres(fsync=True) as new_database:
        for k in [int(x) for x in a.workers.split(",")]:
            rows.append(run_workers(f, new_database(), k, a.trials, out))
            r = rows[-1]
            print(
                f"workers {r['workers']} (threads {r['threads']}): {r['trials']} trials, "
                f"{r['per_hour']:.1f} trials/h over the trial window ({r['window_s']:.0f} s); "
                f"command wall {r['wall_s']:.0f} s; median trial {r['median_trial_s']:.1f} s, "
                f"overhead outside the evaluation {r['median_overhead_s']:.2f} s; "
                f"failed {r['failed']}",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            pg = storage_ops(new_database(), a.ops, Path(tmp))
            lite = storage_ops(f"sqlite:///{tmp}/ops.db", a.ops, Path(tmp))
    print(
        f"storage + store alone per trial (ask, 30 attributes, constraints, 1 MB artifact, tell, "
        f"read trials; median of {a.ops}): PostgreSQL {pg * 1000:.1f} ms, SQLite {lite * 1000:.1f} ms"
    )
    base = rows[0]["per_hour"]
    print("\n| workers | threads each | trials | trials/h | vs 1 worker | median trial (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workers']} | {','.join(map(str, r['threads']))} | {r['trials']} | "
            f"{r['per_hour']:.1f} | {r['per_hour'] / base:.2f}x | {r['median_trial_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
