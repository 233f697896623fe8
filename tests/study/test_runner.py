"""The search end to end on a tiny model and real Fashion-MNIST: budgets, outputs, resume."""

from __future__ import annotations

import json
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BUDGET, SHUFFLENET, TINY_TRIALS, XDIST, run_cli, start_cli, tiny_study_file

from autoslim.errors import UsageError
from autoslim.models import list_models
from autoslim.results.view import load_study
from autoslim.study.spec import load_study_spec
from autoslim.study.storage import _open_or_create, open_existing


def test_tiny_study_front_meets_budget(tiny_study, tmp_path: Path):
    spec, res = tiny_study.spec, tiny_study.result
    df = res.frame
    rejected = int((df["status"] == "over_budget").sum())  # free: not counted in the trials
    assert len(df) == TINY_TRIALS + rejected
    assert (df["state"] == "COMPLETE").sum() + (df["state"] == "FAIL").sum() == len(df)
    front = res.front
    assert len(front) >= 1, df[["trial", "status", "size_bytes", "fail_reason"]]
    assert (front["size_bytes"] <= BUDGET).all()
    assert (front["status"] == "ok").all()
    # the recorded size is the artifact's bytes on disk
    view = load_study(spec.run_dir)
    for _, row in df[df["status"] == "ok"].iterrows():
        art = view.fetch(int(row.trial), tmp_path / f"t{int(row.trial)}.onnx")
        assert art.stat().st_size == row.size_bytes
    # over-budget candidates are rejected before training, in well under a second of work
    over = df[df["status"] == "over_budget"]
    assert (over["seconds"] < 5).all()
    for key in ("csv", "parquet", "html"):
        assert res.outputs[key].stat().st_size > 0
    html = res.outputs["html"].read_text()
    assert "plotly" in html and "Pareto" in html
    # the study opens again from disk with its trials
    assert len(open_existing(spec.run_dir).trials) == len(df)


def test_rejected_candidates_are_free_up_to_a_bound(tmp_path: Path):
    """Candidates the size estimate rejects (a fraction of a second each) do not use up the
    trials, so a sampler that proposes many over-budget ones still trains its share; up to
    FREE_REJECTS per trial, so that a budget hardly anything fits still ends. `status` tells
    them apart. (A budget nothing fits is refused before the study is made.)"""
    from autoslim.study.run import smallest_estimate
    from autoslim.study.status import study_status
    from autoslim.study.task import build_task
    from autoslim.study.workers import FREE_REJECTS
    from autoslim.workflow import search

    f = tiny_study_file(tmp_path, "tight", trials=3)
    smallest = smallest_estimate(build_task(load_study_spec(f), progress=False))
    spec = load_study_spec(f, budget=f"{smallest}B")  # the most compressed candidate alone
    res = search(spec, progress=False)
    df = res.frame
    rejected = df[df["status"] == "over_budget"]
    assert len(rejected) >= 2, df[["trial", "status", "fail_reason"]]
    assert (rejected["seconds"] < 5).all()
    st = study_status(spec.run_dir)
    assert st["counted"] == st["budget"] == 3
    assert 0 < st["free_rejects"] <= FREE_REJECTS * 3
    assert len(df) == st["counted"] + st["free_rejects"]
    r = run_cli("status", str(spec.run_dir))
    assert r.returncode == 0, r.stderr
    assert f"3 of 3 trials counted ({st['free_rejects']} rejected before training" in r.stdout


def test_with_a_budget_every_enqueued_baseline_fits_it(tiny_study):
    """Uniform baselines over the budget would only be rejected; the fitting ladder replaces
    them, so even a tight budget starts with trained in-budget points."""
    study = tiny_study.result.study
    enqueued = [t for t in study.trials if "fixed_params" in t.system_attrs]
    assert enqueued, "no baselines were enqueued"
    for t in enqueued:
        assert t.user_attrs["size_estimate"] <= BUDGET, (t.number, t.user_attrs["summary"])
        assert t.user_attrs.get("status") != "over_budget"


def _completed(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_interrupted_search_resumes_with_trials_kept(tmp_path: Path):
    f = tiny_study_file(tmp_path, "resume", trials=4)
    db = tmp_path / "resume" / "study.db"
    p = start_cli("search", str(f), "--quiet")
    deadline = time.time() + 300
    while _completed(db) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    from autoslim.study.status import study_status

    kept = study_status(db.parent)["counted"]
    assert 1 <= kept < 4
    before = {t.number: t.values for t in open_existing(db.parent).trials if t.values}
    r = run_cli("search", str(f), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"{kept} trials stored, {4 - kept} to run" in r.stderr  # only the rest is run
    assert study_status(db.parent)["counted"] == 4  # not one more, not the whole budget again
    after = {t.number: t.values for t in open_existing(db.parent).trials if t.values}
    assert all(after[n] == v for n, v in before.items())  # completed trials untouched


def _states(db: Path) -> dict[int, str]:
    try:
        with sqlite3.connect(db) as c:
            return dict(c.execute("select number, state from trials").fetchall())
    except sqlite3.Error:
        return {}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_killed_search_leaves_no_running_trial_after_the_next_run(tmp_path: Path, sig):
    """``kill -9`` (or SIGTERM) mid-trial: the next run of the same study fails the dead
    process's trial with a reason, removes its temp folders and finishes the study."""
    f = tiny_study_file(tmp_path, "killed", trials=3)
    run = tmp_path / "killed"
    db = run / "study.db"
    p = start_cli("search", str(f), "--quiet")
    deadline, export_seen = time.time() + 300, time.time() + 1e9
    while time.time() < deadline and p.poll() is None:
        running = [n for n, st in _states(db).items() if st == "RUNNING"]
        if running and any(run.glob("trials/*/.export-*")):
            break  # the best moment: inside the exporter, its temp folder on disk
        if running and 1 in running:  # no luck with the exporter: kill the second trial anyway
            export_seen = min(export_seen, time.time() + 20)
            if time.time() > export_seen:
                break
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    victim = max(n for n, st in _states(db).items() if st == "RUNNING")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:  # like Ctrl-C: the trial is failed cleanly, exit 143
        assert p.returncode == 143, err
        assert err.strip().splitlines()[-1].startswith("autoslim: terminated"), err
        assert _states(db)[victim] == "FAIL"
        stopped = open_existing(run)
        assert "stopped by SIGTERM" in stopped.trials[victim].user_attrs["fail_reason"]
        retry = [t for t in stopped.trials if t.user_attrs.get("retry_of") == victim]
        assert len(retry) == 1 and retry[0].state.name == "WAITING"  # run first on resume
        assert retry[0].params == stopped.trials[victim].params
    else:
        assert p.returncode == -signal.SIGKILL
        assert _states(db)[victim] == "RUNNING"  # what the next run must heal
    baseline = open_existing(run).user_attrs["baseline"]
    r = run_cli("search", str(f), "--quiet")
    assert r.returncode == 0, r.stderr
    states = _states(db)
    assert "RUNNING" not in states.values(), states
    assert states[victim] == "FAIL"
    assert not list(run.glob("trials/*/.export-*"))
    study = open_existing(run)
    reason = study.trials[victim].user_attrs.get("fail_reason", "")
    if sig == signal.SIGKILL:
        assert "died before the trial finished" in reason, reason
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == victim]
    assert [t.state.name for t in retried] == ["COMPLETE"], reason  # the same candidate, rerun
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 3  # the study reached its trial count (the stopped one does not count)
    assert study.user_attrs["baseline"] == baseline  # a resume re-times, never overwrites


def test_speedups_use_the_teacher_timed_beside_each_trial(tiny_study):
    """Each measured trial stores the teacher latency its process measured and the host; the
    table's speed-up is against that timing, not a baseline from another run or machine."""
    import platform

    df = load_study(tiny_study.run_dir).trials
    ok = df[df["status"] == "ok"]
    assert len(ok)
    assert (ok["teacher_latency_ms"] > 0).all() and (ok["host"] == platform.node()).all()
    assert ((ok["speedup"] - ok["teacher_latency_ms"] / ok["latency_ms"]).abs() < 1e-9).all()


def test_a_calibrated_predictor_rejects_candidates_over_the_latency_limit_untrained(
    tmp_path: Path, monkeypatch
):
    """Once the latency predictor is calibrated (its thresholds lowered here so that a short
    study reaches them: 3 measured trials, any rho), a candidate it puts over --max-latency
    even at its optimistic bound is not trained, like an over-budget one; the calibration is
    stored and printed in the report, and the front holds measured latencies only."""
    from autoslim.measure import predictor
    from autoslim.workflow import search

    monkeypatch.setattr(predictor, "MIN_POINTS", 3)
    monkeypatch.setattr(predictor, "MIN_RHO", -1.0)
    spec = load_study_spec(
        tiny_study_file(tmp_path, "pred", trials=8), budget="none", max_latency_ms=1e-4
    )
    res = search(spec, progress=False)
    df = res.frame.sort_values("trial")
    over = df[df["status"] == "over_latency"]
    assert len(over), df[["trial", "status", "latency_source", "fail_reason"]]
    first = int(over["trial"].min())
    assert (df[df["trial"] < first]["latency_source"] == "measured").sum() >= 3
    assert (over["latency_predicted_ms"] > 1e-4).all() and (over["seconds"] < 5).all()
    for t in over["trial"]:  # never trained: no artifact
        assert not load_study(spec.run_dir).has_artifact(int(t))
    cal = res.study.user_attrs["latency_predictor"]
    assert cal["usable"] and cal["n"] >= 3
    assert "latency predictor (additive" in res.outputs["html"].read_text()
    assert (res.front["latency_source"] == "measured").all()


def test_a_candidate_a_measured_trial_beats_is_not_timed(tiny_study, tmp_path: Path, monkeypatch):
    """A trained candidate that a measured trial beats on every objective even at the
    predictor's optimistic latency is not timed: its latency is the prediction, marked so;
    otherwise it is timed on the backend."""
    from autoslim.measure import predictor
    from autoslim.study.evaluation import evaluate
    from autoslim.study.trial import refresh_predictor

    monkeypatch.setattr(predictor, "MIN_POINTS", 3)
    monkeypatch.setattr(predictor, "MIN_RHO", -1.0)
    task = tiny_study.result.task
    timed = []
    real = task.latency.measure
    monkeypatch.setattr(task.latency, "measure", lambda *a, **k: timed.append(1) or real(*a, **k))
    try:
        refresh_predictor(tiny_study.result.study, task, seen={})
        assert task.predictor is not None
        config = task.space.to_config(
            task.space.uniform_params(prune=0.3, weight_bits=8, act_bits=8)
        )
        task.measured = [{"accuracy": 1.0, "size": 0.0, "latency": 0.0}]  # beats anything
        res = evaluate(task, config, tmp_path / "beaten")
        assert res["status"] == "ok" and res["latency_source"] == "predicted" and not timed
        assert res["latency_ms"] == res["latency_predicted_ms"] > 0
        task.measured = []
        res = evaluate(task, config, tmp_path / "timed")
        assert res["latency_source"] == "measured" and len(timed) == 1
    finally:
        task.predictor, task.measured = None, []


def test_fingerprint_mismatch_refuses_to_resume(tmp_path: Path):
    spec = load_study_spec(None, name="fp", out_dir=str(tmp_path / "fp"))
    fp = {"model": "resnet18", "teacher_hash": "aaa", "space": "s1"}
    _open_or_create(spec, fingerprint=fp, sampler=None, storage=None)
    _open_or_create(
        spec, fingerprint=dict(fp), sampler=None, storage=None
    )  # same fingerprint: resumes
    with pytest.raises(UsageError, match="teacher_hash") as e:
        _open_or_create(spec, fingerprint={**fp, "teacher_hash": "bbb"}, sampler=None, storage=None)
    assert "refusing to resume" in str(e.value)
    assert e.value.exit_code == 2


def test_a_trial_failing_inside_onnx_runtime_fails_alone(tmp_path: Path, monkeypatch):
    """ONNX Runtime raising inside a trial (its artifact truncated just before the latency
    session opens it: ORT's own protobuf error) fails that trial with the reason in one line;
    the other trials run and the study reaches its trial count."""
    from autoslim import measure
    from autoslim.workflow import search

    real = measure.OrtBackend.measure
    calls = {"n": 0}

    def truncating(self, artifact, **kw):
        calls["n"] += 1
        if calls["n"] % 2 == 0:  # the 1st call is the teacher's baseline
            data = Path(artifact).read_bytes()
            Path(artifact).write_bytes(data[: len(data) // 3])
        return real(self, artifact, **kw)

    monkeypatch.setattr(measure.OrtBackend, "measure", truncating)
    spec = load_study_spec(tiny_study_file(tmp_path, "flaky", trials=4), budget="none")
    res = search(spec, progress=False)
    df = res.frame
    assert len(df) == 4
    failed = df[df["state"] == "FAIL"]
    assert len(failed) >= 1 and (df["status"] == "ok").sum() >= 1
    for reason in failed["fail_reason"]:
        assert "\n" not in reason and ("ONNXRuntimeError" in reason or "Protobuf" in reason), reason


def _model_study(tmp: Path, name: str, model: str, trials: int, **extra: str) -> Path:
    """A study of ``model`` on a Fashion-MNIST subset, teacher of 20 SGD steps, 4 KD steps.

    Such a teacher has low-margin predictions, and on a 20-step teacher ONNX Runtime's optimized
    int8 kernels agreed on only 95% where the file's QDQ graph matched the PyTorch model (the
    gate's diagnosis), so the gate is 90% here: it still refuses broken exports. Trained
    teachers (80-85%) agree on 99.8-100% (``make bench-models``, BENCHMARKS.md)."""
    f = tmp / f"{name}.toml"
    lines = "".join(f"{k} = {v}\n" for k, v in extra.items())
    f.write_text(
        f'name = "{name}"\nmodel = "{model}"\ntrials = {trials}\nval_size = 200\n'
        f"limit_train = 1000\nlimit_test = 200\nlatency_runs = 5\ngate_images = 200\n"
        f'gate_agreement = 0.9\nmax_accuracy_drop = "none"\nout_dir = "{tmp / name}"\n{lines}'
        "[teacher]\nmax_steps = 20\nbatch_size = 32\nmax_lr = 0.05\n"
        "[recovery]\nsteps = 4\nbatch_size = 32\nsubset = 300\n"
    )
    return f


@pytest.fixture
def two_threads():
    """These tests train and export full-size CNNs: use both cores (nothing else runs)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1 if XDIST else 2)  # in parallel workers the other core is taken
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("model", list_models("classification"))
def test_every_registered_model_gives_a_measured_int8_trial(tmp_path: Path, model, two_threads):
    """A one-trial default search (per-stage int8 space; the first trial is uniform int8) on
    each registered model stores a measured trial that passed the gate: the artifact's top-1
    predictions agree with the trained PyTorch model's, and the file is int8-small."""
    from autoslim.workflow import search

    spec = load_study_spec(_model_study(tmp_path, "m", model, trials=1))
    res = search(spec, progress=False)
    df = res.frame
    ok = df[df["status"] == "ok"]
    assert len(ok) == 1, df[["trial", "status", "fail_reason"]].to_string()
    trial = res.study.trials[int(ok["trial"].iloc[0])]
    assert trial.user_attrs["agreement"] >= 0.9  # the gate held and its figure is recorded
    # int8: about a quarter of the fp32 teacher's file (0.30 measured on EfficientNet-B0)
    assert ok["size_bytes"].iloc[0] < 0.35 * res.study.user_attrs["baseline"]["size_bytes"]


def test_unprunable_model_is_still_searched_over_bits_and_ranks(tmp_path: Path, two_threads):
    """ShuffleNetV2's channel shuffle defeats Torch-Pruning: the study says so in one line and
    still measures an int8 candidate (no pruning dimension)."""
    from autoslim.workflow import search

    spec = load_study_spec(_model_study(tmp_path, "shuffle", SHUFFLENET, trials=1))
    res = search(spec, progress=False)
    assert res.task.space.note and "ZeroDivisionError" in res.task.space.note
    assert "\n" not in res.task.space.note
    assert not [d for d in res.task.space.dims if d.kind == "prune"]
    assert [d for d in res.task.space.dims if d.kind == "rank"]
    ok = res.frame[res.frame["status"] == "ok"]
    assert len(ok) == 1, res.frame[["trial", "status", "fail_reason"]].to_string()


def _photo_folder(root: Path, n: int = 24) -> Path:
    """Two classes of JPEG 'photos' of mixed sizes (200-320 px), told apart by colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = "ab"[i % 2]
        (root / c).mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(200, 320, 2))
        px = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        px[..., 0 if c == "a" else 2] += 150
        Image.fromarray(px).save(root / c / f"{i}.jpg", quality=90)
    return root


def test_a_streamed_224px_folder_is_searched_end_to_end(tmp_path: Path, two_threads):
    """A user's photos at 224 px (torchvision's own stem, no small-image adaptation), decoded
    per batch from the files: the teacher trains, a candidate is recovered, exported at 224 px,
    gated and measured."""
    from autoslim.workflow import search

    root = _photo_folder(tmp_path / "photos")
    f = tmp_path / "photos.toml"
    f.write_text(
        f'name = "photos"\nmodel = "mobilenet_v3_small"\ndataset = "imagefolder:{root}"\n'
        "image_size = 224\nstream = true\ntrials = 1\nval_size = 6\nlatency_runs = 3\n"
        f'gate_images = 6\ngate_agreement = 0.5\nmax_accuracy_drop = "none"\nout_dir = "{tmp_path / "run"}"\n'
        "[teacher]\nmax_steps = 2\nbatch_size = 8\nmax_lr = 0.02\n"
        "[recovery]\nsteps = 2\nbatch_size = 8\nsubset = 16\n"
    )
    spec = load_study_spec(f)
    res = search(spec, progress=False)
    assert type(res.task.data.train).__name__ == "FolderSplit"
    assert res.task.data.input_shape == (3, 224, 224)
    ok = res.frame[res.frame["status"] == "ok"]
    assert len(ok) == 1, res.frame[["trial", "status", "fail_reason"]].to_string()
    import onnx

    art = load_study(spec.run_dir).fetch(int(ok["trial"].iloc[0]), tmp_path / "t.onnx")
    dims = onnx.load(str(art)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]


def _copy_of_tiny(tiny_study, tmp: Path) -> Path:
    """A study file whose out_dir holds a copy of the finished tiny study (same fingerprint)."""
    import shutil

    f = tiny_study_file(tmp, "tiny", TINY_TRIALS)
    shutil.copytree(tiny_study.run_dir, tmp / "tiny")
    return f


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_refused_artifacts_leaves_no_trace_and_the_corrected_command_runs_at_once(
    tiny_study, tmp_path: Path
):
    """A wrong --artifacts on an existing study is refused before this process writes a
    thing (no phantom worker in status); the corrected command, with a larger --trials, runs
    at once, and status counts against the budget in force."""
    f = _copy_of_tiny(tiny_study, tmp_path)
    before = _tree(tmp_path / "tiny")
    (tmp_path / "elsewhere").mkdir()
    r = run_cli("search", str(f), "--quiet", "--artifacts", str(tmp_path / "elsewhere"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # one line
    assert "is not study 'tiny''s artifact store" in r.stderr
    assert _tree(tmp_path / "tiny") == before  # nothing stored changed: no worker attribute
    workers_before = {k for k in open_existing(tmp_path / "tiny").user_attrs if "worker:" in k}
    t0 = time.monotonic()
    r = run_cli("search", str(f), "--quiet", "--trials", str(TINY_TRIALS + 1), timeout=300)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 240  # not a joining worker waiting for a set-up
    assert "trials: " in r.stderr and "counted" in r.stderr  # the closing summary
    st = run_cli("status", str(tmp_path / "tiny"), "--json")
    status = json.loads(st.stdout)
    assert status["budget"] == TINY_TRIALS + 1  # the budget in force, not the first one
    assert status["counted"] == TINY_TRIALS + 1
    assert len(status["workers"]) == len(workers_before) + 1  # the corrected run alone


def test_a_refused_artifacts_on_a_new_study_makes_no_folder(tmp_path: Path):
    f = tiny_study_file(tmp_path, "fresh", trials=1)
    r = run_cli("search", str(f), "--quiet", "--artifacts", "/proc/autoslim-store")
    assert r.returncode == 2, r.stderr
    assert "cannot be written" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fresh").exists()


def test_a_study_whose_creator_died_in_its_set_up_is_taken_over_at_once(tmp_path: Path):
    """A half-made study (created, its creator killed before its baseline): the next search
    of this machine sees the creator is gone and does the set-up itself, without waiting."""
    import optuna

    f = tiny_study_file(tmp_path, "half", trials=1)
    run = tmp_path / "half"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(
        study_name="half",
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["maximize", "minimize"],
    )
    owner = {"host": platform.node(), "pid": dead.pid, "start": "0"}
    study.set_user_attr("setup_owner", owner)
    t0 = time.monotonic()
    r = run_cli("search", str(f), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "takes it over" in r.stderr
    assert time.monotonic() - t0 < 200  # neither the 60 s fingerprint wait nor 30 min
    done = open_existing(run)
    assert "baseline" in done.user_attrs
    assert [t.state.name for t in done.trials] == ["COMPLETE"]


def test_a_budget_no_candidate_can_meet_is_refused_before_the_study_is_made(tmp_path: Path):
    f = tiny_study_file(tmp_path, "tight", trials=2)
    r = run_cli("search", str(f), "--budget", "500B")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "cannot be met" in line and "smallest file" in line, r.stderr
    smallest = int(re.search(r"about .* \(([\d,]+) bytes", line).group(1).replace(",", ""))
    assert 500 < smallest < BUDGET
    assert not (tmp_path / "tight").exists()


def test_a_search_with_no_feasible_trial_names_the_binding_constraint(tiny_study):
    from autoslim.report.text import front_table

    view = load_study(tiny_study.run_dir)
    spec = {**view.spec, "max_accuracy_drop": 0.0}
    ok = view.trials[view.trials["status"] == "ok"]
    better = ok["val_accuracy"] > view.baseline["val_accuracy"]
    df = view.trials[~view.trials["trial"].isin(ok["trial"][better])].assign(front=False)
    text = front_table(df, view.baseline, spec)
    assert "outside the accuracy floor" in text, text
    assert "raise --recovery-steps or --max-accuracy-drop" in text
    best = (ok["val_accuracy"][~better].max() - view.baseline["val_accuracy"]) * 100
    assert f"best {best:+.1f} pt" in text
    small = front_table(df, view.baseline, {**view.spec, "budget": 10})
    assert "outside the size budget" in small and "raise --budget" in small


@pytest.mark.parametrize(
    "flag,value,part",
    [("--budget", "29000B", "budget"), ("--split-seed", "3", "data_split")],
    ids=["budget", "split"],
)  # fmt: skip
def test_a_study_rerun_with_another_setting_is_refused_naming_it(
    tiny_study, tmp_path: Path, flag: str, value: str, part: str, capsys
):
    """Re-running a finished study with a flag that changes what it measures: refused in
    one line naming the part of the fingerprint that differs; nothing stored changes."""
    from autoslim.cli import main

    f = _copy_of_tiny(tiny_study, tmp_path)
    before = _tree(tmp_path / "tiny")
    assert main(["search", str(f), "--quiet", flag, value]) == 2  # in this process
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "refusing to resume" in line and f"different {part}" in line, err
    assert _tree(tmp_path / "tiny") == before


def test_a_dead_workers_trial_is_queued_again_at_most_twice(tmp_path: Path):
    """heal_dead_trials: a trial a dead process of this host left RUNNING is failed with a
    reason and its parameters queued again, up to MAX_RETRIES times; then it stays failed."""
    import optuna

    from autoslim.study.workers import MAX_RETRIES, heal_dead_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="h")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"host": platform.node(), "pid": dead.pid, "start": "0"}
    for retries in range(MAX_RETRIES + 1):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        t.set_user_attr("owner", owner)
        t.set_user_attr("retries", retries)
    assert heal_dead_trials(study, tmp_path) == [0, 1, 2]
    trials = study.get_trials()
    assert [t.state.name for t in trials[:3]] == ["FAIL"] * 3
    assert all("died before the trial finished" in t.user_attrs["fail_reason"] for t in trials[:3])
    queued = [t for t in trials if t.state.name == "WAITING"]
    assert [(t.user_attrs["retry_of"], t.user_attrs["retries"]) for t in queued] == [(0, 1), (1, 2)]
    assert all(q.params == trials[q.user_attrs["retry_of"]].params for q in queued)
