"""Many workers on one study, on a real PostgreSQL server (``postgres_url`` in conftest):
a global trial budget, baselines made once, own sampler seeds, dead workers' trials retried."""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict
from pathlib import Path

import optuna
import pytest
from conftest import TINY, continuous_prune_space, run_cli, start_cli

from autoslim.study.spec import load_study_spec
from autoslim.study.storage import storage_of
from autoslim.workflow import search

# continuous pruning ratios: two workers proposing the same parameters can only be lockstep
SPACE = continuous_prune_space("8")


def study_file(tmp: Path, name: str, trials: int, *, heartbeat_s: int = 30) -> Path:
    (tmp / "space.toml").write_text(SPACE)
    f = tmp / f"{name}.toml"
    f.write_text(
        f'name = "{name}"\nmodel = "{TINY}"\nspace = "{tmp / "space.toml"}"\n'
        f'trials = {trials}\nsampler = "tpe"\nval_size = 200\nlimit_train = 600\n'
        f"latency_runs = 20\ngate_images = 200\ngate_agreement = 0.5\nthreads = 1\n"
        f'heartbeat_s = {heartbeat_s}\nout_dir = "{tmp / name}"\n'
        "[teacher]\nmax_steps = 60\n"
        "[recovery]\nsteps = 4\nbatch_size = 64\nsubset = 300\n"
    )
    return f


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use up the budget: completed, or failed as a candidate (not killed). These
    studies have no size budget, so no candidate is rejected before training (those are
    free, see test_runner)."""
    out = []
    for t in study.get_trials():
        if t.state == optuna.trial.TrialState.COMPLETE:
            out.append(t)
        elif t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("fail_reason"):
            if not t.user_attrs.get("killed"):
                out.append(t)
    return out


def finish(procs) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def test_three_workers_run_exactly_the_global_budget_once(postgres_url, tmp_path: Path) -> None:
    """Three `autoslim search` processes started at once on one PostgreSQL study, each in its
    own folder as on three machines, one shared artifact store: one creates the study and
    enqueues the baselines, all three run trials with their own seeds, and together they
    stop at exactly ``trials``; nothing is left RUNNING. The storage's password is never
    printed or stored."""
    url = postgres_url().replace("://autoslim@", "://autoslim:s3cr3t@")  # trust auth: unused
    f = study_file(tmp_path, "three", trials=7)
    shared = tmp_path / "shared-store"
    procs = [
        start_cli(
            "search",
            str(f),
            "--storage",
            url,
            "--quiet",
            "--artifacts",
            str(shared),
            "--out-dir",
            str(tmp_path / f"machine{i}"),
        )  # fmt: skip
        for i in range(3)
    ]
    errs = finish(procs)
    study = optuna.load_study(study_name="three", storage=url)
    done = counted(study)
    assert len(done) == 7, [
        (t.number, t.state.name, t.user_attrs.get("status")) for t in study.trials
    ]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    enqueued = [t for t in study.trials if "fixed_params" in t.system_attrs]
    keys = [json.dumps(t.params, sort_keys=True) for t in enqueued]
    assert len(keys) == 3 and len(set(keys)) == 3  # the three baselines, enqueued once
    by_params: dict[str, set[int]] = defaultdict(set)
    seeds: dict[int, set[int]] = defaultdict(set)
    for t in done:
        by_params[json.dumps(t.params, sort_keys=True)].add(t.user_attrs["owner"]["pid"])
        seeds[t.user_attrs["owner"]["pid"]].add(t.user_attrs["owner"]["seed"])
    assert all(len(pids) == 1 for pids in by_params.values()), by_params
    assert len(seeds) >= 2, seeds  # more than one worker ran trials
    assert all(len(s) == 1 for s in seeds.values())
    assert len({next(iter(s)) for s in seeds.values()}) == len(seeds)  # each its own seed
    workers = [k for k in study.user_attrs if k.startswith("worker:")]
    assert len(workers) == 3 and sum(study.user_attrs[k]["creator"] for k in workers) == 1
    # `autoslim status` from anywhere that reaches the storage (password hidden)
    r = run_cli("status", "three", "--storage", url, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["counted"] == st["budget"] == 7 and st["eta_minutes"] == 0.0
    assert len(st["workers"]) == 3 and sum(w["trials"] for w in st["workers"].values()) >= 7
    text = run_cli("status", "three", "--storage", url).stdout
    assert "7 of 7 trials counted" in text and text.count("  worker ") == 3
    # the password is in no message, study record or written file
    stored = json.dumps(study.user_attrs) + "".join(json.dumps(t.user_attrs) for t in study.trials)
    written = "".join(
        p.read_text(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".html", ".csv", ".json", ".txt")
    )
    assert "s3cr3t" not in "".join(errs) + r.stderr + text + stored + written
    # every trial's file was written by some worker into the shared store; another process
    # in another folder exports one (verified), and refuses it once it was changed
    ok = [t for t in done if t.user_attrs.get("status") == "ok"]
    assert ok and all((shared / t.user_attrs["artifact_id"]).is_file() for t in ok)
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    t = ok[-1]
    r = run_cli("export", "three", "--storage", url, "--trial", str(t.number), "-o", "m.onnx",
                cwd=elsewhere)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "stored artifact" in r.stdout and "s3cr3t" not in r.stdout + r.stderr
    assert (elsewhere / "m.onnx").stat().st_size == t.user_attrs["size_bytes"]
    art = shared / t.user_attrs["artifact_id"]
    art.write_bytes(art.read_bytes()[:-1] + b"\1")
    r = run_cli("export", "three", "--storage", url, "--trial", str(t.number), "-o", "x.onnx",
                cwd=elsewhere)  # fmt: skip
    assert r.returncode != 0 and "changed since the study recorded it" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (elsewhere / "x.onnx").exists()
    # a fourth machine where the shared store is not mounted stops before any trial
    r = run_cli("search", str(f), "--storage", url, "--quiet", "--trials", "9",
                "--out-dir", str(tmp_path / "machine3"), "--artifacts", str(tmp_path / "nfs"))  # fmt: skip
    assert r.returncode == 2 and "not reachable from this machine" in r.stderr, r.stderr
    assert len(counted(optuna.load_study(study_name="three", storage=url))) == 7


def test_a_worker_killed_mid_trial_has_its_trial_retried(postgres_url, tmp_path: Path) -> None:
    """SIGKILL one of two workers while it trains a trial: the other fails that trial (its
    process is gone), queues the same parameters again and completes the study; no
    completed trial is lost and none is left RUNNING."""
    url = postgres_url()
    f = study_file(tmp_path, "killed", trials=8)
    a = start_cli("search", str(f), "--storage", url, "--quiet")
    storage = optuna.storages.RDBStorage(url)
    victim = None
    deadline = time.monotonic() + 600
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="killed", storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("owner", {}).get("pid") == a.pid and "config" in t.user_attrs:
                victim = t.number
    assert victim is not None, a.communicate(timeout=60)
    b = start_cli("search", str(f), "--storage", url, "--quiet")
    time.sleep(1.0)  # well inside the victim's training
    a.send_signal(signal.SIGKILL)
    a.wait(30)
    finish([b])
    study = optuna.load_study(study_name="killed", storage=url)
    killed = study.trials[victim]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["killed"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim]
    assert retries and retries[0].params == killed.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert len(counted(study)) == 8
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_stale_trial_of_another_machine_is_failed_and_retried(
    postgres_url, tmp_path: Path
) -> None:
    """A trial of a worker on another machine that stopped beating (no process here to
    check) is failed by the RDB heartbeat after its grace period and run again here."""
    url = postgres_url()
    f = study_file(tmp_path, "stale", trials=2, heartbeat_s=1)
    search(load_study_spec(f, storage=url), progress=False)  # the study, its first trials
    spec = load_study_spec(f, storage=url, trials=4)
    storage = storage_of(spec)
    study = optuna.load_study(study_name="stale", storage=storage)
    trial = study.ask()
    trial.set_user_attr("owner", {"host": "another-machine", "pid": 1, "start": "0"})
    storage.record_heartbeat(trial._trial_id)  # it beat once, then its machine went away
    time.sleep(2.5)  # past the grace period (2 x heartbeat_s)
    res = search(spec, progress=False)
    stale = res.study.trials[trial.number]
    assert stale.state == optuna.trial.TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == trial.number for t in res.study.trials), (
        "the stale trial was not queued again"
    )
    assert not res.study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(counted(res.study)) == 4


def test_workers_flag_runs_worker_processes_on_one_study(postgres_url, tmp_path: Path) -> None:
    """``--workers 2``: this process and one more on this machine share the study, one thread
    each (2 cores / 2 workers), and the outputs are written once at the end."""
    url = postgres_url()
    f = study_file(tmp_path, "flag", trials=8)
    f.write_text(f.read_text().replace("threads = 1\n", ""))
    r = run_cli("search", str(f), "--storage", url, "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 workers of" in r.stderr
    study = optuna.load_study(study_name="flag", storage=url)
    assert len(counted(study)) == 8
    pids = {t.user_attrs["owner"]["pid"] for t in counted(study)}
    assert len(pids) == 2, pids
    assert (tmp_path / "flag" / "report.html").is_file()
