"""Fidelity levels inside one search: the BN-proxy screen (level 0), the short recovery of the
promoted candidates (level 1), the final recovery of the level-1 front (level 2)."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import continuous_prune_space, run_cli, start_cli, tiny_study_file

import autoslim
from autoslim._files import sha256_file
from autoslim.cli import main
from autoslim.config import CompressionConfig, LayerConfig
from autoslim.pareto import crowding_distances, nondominated_ranks, promoted
from autoslim.results.selection import final_picks, pick
from autoslim.study.storage import open_existing

FIDELITY = (
    "[fidelity]\nscreen_images = 200\npromote = 0.34\n"
    "final_points = 2\nfinal_epochs = 1\nfinal_steps_per_epoch = 4\n"
    "final_temperature = 2.0\nfinal_alpha = 0.7\n"
)


TIGHT = 14_500
SPACE = continuous_prune_space("[8, 32]")


def fidelity_study(tmp: Path, name: str, trials: int) -> Path:
    f = tiny_study_file(tmp, name, trials)
    # continuous pruning ratios and int8 or fp32 weights per layer: candidates of many sizes,
    # some dominated at level 0 (the same proxy accuracy in more bytes)
    (tmp / "space.toml").write_text(SPACE)
    f.write_text(f.read_text() + FIDELITY)
    return f


def test_nondominated_ranks_and_promotion_by_share() -> None:
    # (accuracy up, size down): a front of two, then one behind each, then the worst
    v = np.array([[0.9, 10], [0.8, 5], [0.85, 12], [0.7, 6], [0.6, 20]])
    assert nondominated_ranks(v, ["maximize", "minimize"]).tolist() == [0, 0, 1, 1, 2]
    d = ["maximize", "minimize"]
    assert promoted(v[:1], d, 0.34)  # the first candidate: nothing to compare with
    assert promoted(v[:2], d, 0.34)  # on the front
    assert not promoted(v[:5], d, 0.34)  # the worst of five: outside the best third
    assert promoted(np.vstack([v[:4], [[0.95, 4]]]), d, 0.2)  # a new best dominates all
    assert promoted(v[:4], d, 1.0)  # share 1: every candidate is trained


def test_promotion_within_a_crowded_front_prefers_spread_out_points() -> None:
    d = ["maximize", "minimize"]
    # one front of five (accuracy and size both rising); the fourth sits next to the fifth
    front = np.array([[0.5, 1.0], [0.6, 2.0], [0.7, 3.0], [0.79, 3.95], [0.8, 4.0]])
    crowd = crowding_distances(front)
    assert np.isinf(crowd[[0, 4]]).all() and crowd[3] < min(crowd[1], crowd[2])
    order = [0, 4, 1, 2, 3]  # candidates arrive ends first, the crowded one last
    assert not promoted(front[order], d, 0.6)  # 3 places: both ends and one of the spread two
    assert promoted(front[order], d, 1.0)
    assert promoted(front[[0, 4, 3, 2, 1]], d, 0.6)  # the most spread-out interior point is
    assert promoted(np.vstack([front[:2], front[:2]]), d, 0.25)  # ties all promoted
    # a candidate behind the crossing front is never promoted, one ahead of it always is
    assert not promoted(np.vstack([front, [[0.4, 5.0]]]), d, 0.8)
    assert promoted(np.vstack([front, [[0.9, 0.5]]]), d, 0.1)


def _front(points: list[tuple]) -> pd.DataFrame:
    """A level-1 front of (trial, latency ms, val accuracy, rank ratio of its 4 layers[, bytes])
    (bytes default to rising with the latency)."""
    rows = []
    for t, ms, acc, rank, *size in points:
        layers = {
            f"l{i}": LayerConfig(weight_bits=8, act_bits=8, rank_ratio=rank) for i in range(4)
        }
        rows.append(
            {"trial": t, "latency_ms": ms, "val_accuracy": acc,
             "size_bytes": size[0] if size else ms * 1e7,
             "config": CompressionConfig(layers=layers).to_json()}
        )  # fmt: skip
    return pd.DataFrame(rows)


def test_final_picks_keep_both_ends_every_kind_and_spread() -> None:
    # eight int8 points along a front; one low-rank point sits between two int8 ones, where a
    # spread by latency alone passes it by
    front = _front(
        [(0, 0.10, 0.880, None), (1, 0.11, 0.885, None), (2, 0.13, 0.890, None),
         (3, 0.20, 0.900, None), (4, 0.22, 0.902, 0.5), (5, 0.26, 0.910, None),
         (6, 0.30, 0.915, None), (7, 0.40, 0.920, None)]
    )  # fmt: skip
    assert CompressionConfig.from_json(front.config[4]).kind() == ((8,), "most")
    assert CompressionConfig.from_json(front.config[0]).kind() == ((8,), "none")
    picks = final_picks(front.sample(frac=1, random_state=0), 4)  # any row order
    assert picks[0] == 0 and picks[-1] == 7 and 4 in picks and len(picks) == 4
    assert picks == sorted(picks, key=lambda t: front.latency_ms[t])  # fastest first
    assert final_picks(front, 8) == list(range(8))  # a small front: all of it
    assert final_picks(front, 1) == [7]  # one: the most accurate
    # without a second kind: the spread by log latency, both ends kept
    plain = _front([(t, ms, a, None) for t, ms, a, *_ in front.itertuples(index=False)])
    assert final_picks(plain, 3) == [0, 3, 7]


def test_final_picks_keep_the_smallest_and_each_kinds_most_accurate() -> None:
    # the default study's level-1 front of one full-scale run (trial, ms, val acc, rank, bytes):
    # the smallest point is not the fastest, and the most accurate unfactorised point sits
    # inside the front next to the smallest; a spread by latency from both ends and one point
    # per kind picked 15, 18, 33, 30, 14, without the smallest (finally 0.35 pt below the
    # teacher at 266,724 B, the smallest within 0.5 pt)
    front = _front(
        [(15, 0.093, 0.8956, None, 311_086), (17, 0.094, 0.8960, None, 476_563),
         (31, 0.1125, 0.9062, None, 266_724), (18, 0.1165, 0.9090, None, 338_086),
         (33, 0.1842, 0.9130, 0.5, 514_526), (22, 0.1965, 0.9144, 0.5, 650_069),
         (30, 0.2187, 0.9162, 0.5, 729_883), (14, 0.2691, 0.9202, 0.5, 1_100_050)]
    )  # fmt: skip
    assert final_picks(front, 5) == [15, 31, 18, 33, 14]
    assert final_picks(front, 3) == [15, 31, 14]  # the ends: fastest, smallest, most accurate
    assert final_picks(front, 6) == [15, 31, 18, 33, 30, 14]  # then the spread by latency


def _final_started(db: Path) -> bool:
    try:
        with sqlite3.connect(db) as c:
            rows = c.execute("select key from study_user_attributes where key = 'final'")
            return bool(rows.fetchall())
    except sqlite3.Error:
        return False


def test_a_search_screens_promotes_and_ends_with_final_models(tmp_path: Path, capsys) -> None:
    """Every candidate is screened; only promoted ones (and the baselines) are trained; the
    search then finally recovers points of the level-1 front, and its final front, pick and
    export use those numbers. A Ctrl-C during the final level exits 130 and the same command
    finishes it without redoing a level; run again, it redoes nothing."""
    f = fidelity_study(tmp_path, "levels", trials=9)
    db = tmp_path / "levels" / "study.db"
    p = start_cli("search", str(f), "--quiet")
    deadline = time.time() + 600
    while not _final_started(db) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    interrupted = autoslim.load_study(db.parent)
    trials_before = (
        interrupted.trials[["trial", "status", "val_accuracy"]].fillna(-1).to_dict("records")
    )

    r = run_cli("search", str(f))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 to run" in r.stderr  # levels 0 and 1 were not redone
    assert "final front (1-epoch recovery" in r.stdout
    view = autoslim.load_study(db.parent)
    df = view.trials
    assert df[["trial", "status", "val_accuracy"]].fillna(-1).to_dict("records") == trials_before
    # level 0: every candidate screened; the screened-out ones were never trained
    assert df["screen_accuracy"].notna().sum() == (df["status"] != "over_budget").sum()
    screened = df[df["status"] == "screened"]
    assert len(screened) >= 1, df[["trial", "status", "screen_accuracy", "size_estimate"]]
    assert (screened["artifact_id"] == "").all() and screened["val_accuracy"].isna().all()
    # cheaper than a trained trial (medians: one trial can be slowed by the machine)
    assert screened["seconds"].median() < df.loc[df["status"] == "ok", "seconds"].median()
    # the baselines (enqueued) are always trained
    seeded = [t for t in open_existing(db.parent).trials if t.user_attrs.get("enqueued_as")]
    assert seeded and all(t.user_attrs["status"] != "screened" for t in seeded)
    # level 2: points of the level-1 front, finally recovered, recorded on the study
    final = df[df["final"]]
    assert 1 <= len(final) <= 2 and final["front"].all()
    assert (final["refined_epochs"] == 1).all()
    for t in final["trial"]:  # the study file's final distillation loss, not each trial's own
        recipe = view.refined[int(t)]["recipe"]
        assert (recipe["temperature"], recipe["alpha"]) == (2.0, 0.7)
    assert (final["refined_size_bytes"] == final["size_bytes"]).all()
    assert df["final_front"].any() and not df.loc[~df["final"], "final_front"].any()
    assert view.front.loc[view.front["final"], "trial"].tolist() == final["trial"].tolist()
    # pick and export default to the final numbers; --search-time to the search's
    row = pick(view, prefer="accuracy")
    assert row["numbers"] == "final" and row["val_accuracy"] == row["refined_val_accuracy"]
    t = int(row.trial)
    assert main(["pick", str(db.parent), "--prefer", "accuracy"]) == 0
    assert "final numbers (1-epoch recovery" in capsys.readouterr().out
    assert main(["pick", str(db.parent), "--search-time", "--json"]) == 0
    assert "numbers" not in json.loads(capsys.readouterr().out)
    out = tmp_path / "final.onnx"
    assert main(["export", str(db.parent), "--trial", str(t), "-o", str(out)]) == 0
    assert sha256_file(out) == view.refined[t]["sha256"]
    # a third run: nothing is redone (the final records are reused as they are)
    shas = {k: v["sha256"] for k, v in view.refined.items()}
    r = run_cli("search", str(f), "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    final_json = json.loads(r.stdout)["final_front"]
    assert {p["trial"] for p in final_json} == set(df.loc[df["final_front"], "trial"])
    assert all(p["val_accuracy"] == p["refined_val_accuracy"] for p in final_json)
    again = autoslim.load_study(db.parent)
    assert main(["report", str(db.parent), "--format", "table"]) == 0
    assert "final front (1-epoch recovery" in capsys.readouterr().out
    # the HTML report opens with the final front, search-time front after it
    page = (db.parent / "report.html").read_text()
    assert f"Final front: {len(final)} points after the 1-epoch final recovery" in page
    assert page.index('id="final"') < page.index('id="scatter"')
    assert page.index('id="scatter"') < page.index('id="picked"')  # both plots above the pick
    assert {k: v["sha256"] for k, v in again.refined.items()} == shas
    assert len(again.trials) == len(df)


def test_sensitivity_greedy_widths_fit_the_budget(tiny_study) -> None:
    """Per-stage widths chosen by BN-proxy sensitivity (the search's seed, and the re-screening
    greedy baseline of bench-final) fit a budget the unpruned int8 model does not."""
    from autoslim.study.sensitivity import greedy_params, stage_sensitivity
    from autoslim.study.task import build_task, estimate

    task = build_task(tiny_study.spec, progress=False)
    sens = stage_sensitivity(task)
    assert any(v["saved"] > 0 for v in sens.values()) and all(v["drop"] >= 0 for v in sens.values())
    int8 = task.space.uniform_params(prune=0.0, weight_bits=8, act_bits=8)
    assert estimate(task, task.space.to_config(int8)) > TIGHT
    for rescreen in (False, True):
        params = greedy_params(task, TIGHT, rescreen=rescreen)
        assert params is not None
        assert estimate(task, task.space.to_config(params)) <= TIGHT
    assert greedy_params(task, 1000) is None  # nothing that small exists: said, not guessed


def test_sensitivity_greedy_factorises_when_pruning_alone_cannot_fit(
    tmp_path: Path, autoslim_cache: Path
) -> None:
    """With ``low_rank`` the greedy may factorise a stage (the search's second seed): a budget
    that the most pruned unfactorised model misses is met, by a valid low-rank choice, and a
    search of that budget starts from it."""
    from autoslim.study.sensitivity import can_factorise, greedy_params, stage_sensitivity
    from autoslim.study.spec import load_study_spec
    from autoslim.study.task import build_task, estimate

    f = tiny_study_file(tmp_path, "lowrank", 2)
    (tmp_path / "space.toml").write_text(
        '[[rules]]\nmatch = "*"\nprune = {min = 0.0, max = 0.5, step = 0.25}\n'
        'weight_bits = 8\nact_bits = 8\nrank = ["off", 0.5]\n'
    )
    f.write_text(f.read_text().replace(":build", ":wide"))
    task = build_task(load_study_spec(f), progress=False)
    rank_dims = [d.name for d in task.space.dims if d.kind == "rank"]
    assert rank_dims and can_factorise(task)
    pruned = task.space.uniform_params(prune=0.5, weight_bits=8, act_bits=8)
    size = estimate(task, task.space.to_config(pruned))  # the most pruned, unfactorised
    alone = min(estimate(task, task.space.to_config({**pruned, d: 0.5})) for d in rank_dims)
    assert alone < size  # factorising one wide conv saves bytes beyond the most pruning
    budget = (size + alone) // 2
    assert greedy_params(task, budget) is None
    sens = stage_sensitivity(task, low_rank=True)
    assert set(rank_dims) <= set(sens)
    # the search screens once for both seeds: the same choices as measuring anew
    for lr in (False, True):
        shared = greedy_params(task, budget, low_rank=lr, sensitivity=sens)
        assert shared == greedy_params(task, budget, low_rank=lr)
    for rescreen in (False, True):
        params = greedy_params(task, budget, low_rank=True, rescreen=rescreen)
        assert params is not None and estimate(task, task.space.to_config(params)) <= budget
        assert {params[d] for d in rank_dims} <= {"off", 0.5}
        assert any(params[d] == 0.5 for d in rank_dims)
    # a search of that budget starts from the factorising seed (no uniform baseline fits)
    f.write_text(f.read_text() + "[fidelity]\nscreen_images = 200\nfinal_points = 0\n")
    res = autoslim.search(load_study_spec(f, budget=budget, trials=1), progress=False)
    row = res.frame.iloc[0]
    assert row["status"] == "ok" and row["size_bytes"] <= budget
    seed = open_existing(f.parent / "lowrank").trials[0]
    assert seed.user_attrs["enqueued_as"] == "sensitivity-low-rank"


@pytest.mark.parametrize(
    "bad",
    ["promote = 0", "promote = 1.5", "final_epochs = 0", "final_temperature = 0",
     "final_alpha = 1.5", "final_alpha = 'high'"],
)  # fmt: skip
def test_bad_fidelity_settings_are_one_line_errors(
    tmp_path: Path, bad: str, capsys: pytest.CaptureFixture
) -> None:
    """In this process (a real process prints the same line: tests/test_cli_errors.py)."""
    from autoslim.cli import main

    f = tiny_study_file(tmp_path, "bad", 2)
    f.write_text(f.read_text() + f"[fidelity]\n{bad}\n")
    assert main(["search", str(f), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and bad.split()[0] in lines[0], lines
    assert not (tmp_path / "bad").exists()
