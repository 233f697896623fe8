"""Search benchmark: TPE vs NSGA-II vs random at equal trial counts, several seeds.

For each sampler and seed a fresh study of the default study definition (or ``--study``) runs
``--trials`` trials; the hypervolume of its feasible front (val accuracy up, latency down) is
taken in (val accuracy, latency / the fp32 teacher's latency measured in the same study run)
against two fixed reference points, both at latency ratio 1.0: accuracy 0.5 (the whole useful
range) and accuracy 0.85 (the region a user picks from). Prints
median and spread per sampler, the ceiling (the hypervolume of all studies' feasible trials
together: the most any sampler could have reached with the points seen), how many trials each
study needed to reach random search's median hypervolume, the feasible share and the median trial
wall time / trials per hour. Run: ``make bench-search`` (defaults: 40 trials x 3 seeds x 3
samplers at the study's own fidelity: about 75 minutes on 2 cores); ``--rescore --out-dir DIR``
reprints the tables from kept studies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from autoslim.pareto import hypervolume
from autoslim.study.spec import load_study_spec
from autoslim.workflow import search


def score(df: pd.DataFrame, refs: tuple[float, ...]) -> tuple[list[float], pd.DataFrame]:
    """Hypervolume of the feasible measured trials in (val accuracy, latency / teacher latency).

    The latency ratio uses the teacher latency measured in the same study run (``speedup`` =
    teacher / trial), so the reference point (accuracy ``ref``, ratio 1.0 = as slow as the
    teacher) is the same for every study, whatever the machine's load was during each one.
    """
    ok = df[(df["status"] == "ok") & df["feasible"]]
    pts = np.column_stack([ok["val_accuracy"].to_numpy(), 1.0 / ok["speedup"].to_numpy()])
    hvs = [
        hypervolume(pts, ["maximize", "minimize"], (acc, 1.0)) if len(ok) else 0.0 for acc in refs
    ]
    return hvs, ok


def trials_to_reach(df: pd.DataFrame, target: float, ref: float) -> int | None:
    """How many trials (in trial order) the study needed for its hypervolume to reach ``target``."""
    df = df.sort_values("trial")
    for k in range(1, len(df) + 1):
        if score(df.iloc[:k], (ref,))[0][0] >= target:
            return k
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=None)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--samplers", default="tpe,nsga2,random")
    ap.add_argument("--budget", default="2MB")
    ap.add_argument("--recovery-steps", type=int, default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--out-dir", default=None, help="keep the studies here (default: a temporary folder)"
    )
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="run nothing: score the studies already in --out-dir (their trials.parquet)",
    )
    a = ap.parse_args()
    refs = (0.5, 0.85)
    out: dict[tuple[str, float], list[float]] = {}
    feasible, secs = [], []
    frames: dict[tuple[str, int], pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = a.out_dir or scratch
        for sampler in a.samplers.split(","):
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                if a.rescore:
                    df = pd.read_parquet(Path(tmp) / f"{sampler}-{seed}" / "trials.parquet")
                else:
                    spec = load_study_spec(
                        a.study,
                        name=f"bench-{sampler}-{seed}",
                        out_dir=f"{tmp}/{sampler}-{seed}",
                        sampler=sampler,
                        seed=seed,
                        trials=a.trials,
                        budget=a.budget,
                        recovery_steps=a.recovery_steps,
                        limit_train=a.limit_train,
                        model=a.model,
                        screen_images=0,
                        final_points=0,  # level 1 only: samplers at the default fidelity
                    )
                    df = search(spec, progress=False).frame
                frames[(sampler, seed)] = df
                values, ok = score(df, refs)
                hvs = []
                for acc, hv in zip(refs, values, strict=True):
                    out.setdefault((sampler, acc), []).append(hv)
                    hvs.append(f"{hv:.5f}")
                feasible.append(len(ok) / max(1, len(df)))
                secs += list(df.loc[df["status"] == "ok", "seconds"])
                print(
                    f"{sampler} seed {seed}: hypervolume {' / '.join(hvs)} (ref acc "
                    f"{' / '.join(map(str, refs))}), {len(ok)}/{len(df)} feasible, "
                    f"best feasible val acc {ok['val_accuracy'].max():.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"\n{a.trials} trials x {a.seeds} seeds; hypervolume in (val accuracy, latency / fp32 "
        "teacher latency) against (ref acc, 1.0)\n"
    )
    print("| sampler | ref acc | hypervolume median | min | max | median / random's |")
    print("|---|---|---|---|---|---|")
    for (s, acc), hvs in out.items():
        rnd = out.get(("random", acc))
        rel = f"{statistics.median(hvs) / statistics.median(rnd):.2f}x" if rnd else "-"
        print(
            f"| {s} | {acc} | {statistics.median(hvs):.5f} | {min(hvs):.5f} | {max(hvs):.5f} "
            f"| {rel} |"
        )
    if frames:
        union, _ = score(pd.concat(frames.values()), refs)
        rel = [
            f"{hv / statistics.median(out[('random', acc)]):.2f}x" if ("random", acc) in out else ""
            for hv, acc in zip(union, refs, strict=True)
        ]
        print(
            f"\nceiling: the feasible trials of all {len(frames)} studies together have hypervolume "
            + " / ".join(f"{hv:.5f} {r}" for hv, r in zip(union, rel, strict=True))
            + f" (ref acc {' / '.join(map(str, refs))}; x = vs random's median): the most any "
            "sampler could have reached with the best points seen"
        )
    if any(s == "random" for s, _ in frames):
        print(
            "\nsample efficiency: trials each study needed to reach random search's median "
            "hypervolume after all its trials (- = not reached)\n"
        )
        print("| sampler | ref acc | per seed | median |")
        print("|---|---|---|---|")
        for acc in refs:
            target = statistics.median(out[("random", acc)])
            for s in dict.fromkeys(k[0] for k in frames):
                need = [
                    trials_to_reach(df, target, acc) for (ss, _), df in frames.items() if ss == s
                ]
                shown = ", ".join("-" if n is None else str(n) for n in need)
                # not reached counts as more than the trials run
                med_n = statistics.median(a.trials + 1 if n is None else n for n in need)
                print(f"| {s} | {acc} | {shown} | {'-' if med_n > a.trials else f'{med_n:g}'} |")
    med = float(np.median(secs)) if secs else float("nan")
    print(
        f"\nfeasible share {np.mean(feasible):.2f}; median measured-trial wall time {med:.1f} s "
        f"({3600 / med:.0f} trials/hour)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
