"""A study made by an earlier release (tests/fixtures/old_study: autoslim at 929f90c, three
TinyNet trials and a refined point) opens, reports, picks, exports by replay and resumes with
this one: moves inside the package never change what a user has stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autoslim.cli import main

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "old_study"


@pytest.fixture
def old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the old study (and of the cache holding its teacher), this test's own."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    cache = tmp_path / "cache"
    shutil.move(run / "cache", cache)
    monkeypatch.setenv("AUTOSLIM_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return run


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_an_old_study_reports_picks_and_exports(old: Path, capsys: pytest.CaptureFixture):
    rc, out, err = _run(capsys, "report", str(old), "--format", "json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["trial"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "ok" for r in rows)
    rc, out, err = _run(capsys, "report", str(old), "--format", "table")
    assert rc == 0 and "teacher (fp32 ONNX)" in out, err
    rc, out, err = _run(capsys, "report", str(old))
    assert rc == 0 and (old / "report.html").stat().st_size > 100_000, err
    rc, out, err = _run(capsys, "pick", str(old), "--prefer", "size", "--json")
    assert rc == 0, err
    assert json.loads(out)["trial"] in (0, 1, 2)
    rc, out, err = _run(capsys, "export", str(old), "--trial", "0", "--refined", "-o", "r.onnx")
    assert rc == 0, err  # the refined point, from the old store, its SHA-256 checked
    rc, out, err = _run(capsys, "export", str(old), "--trial", "2", "--replay", "-o", "m.onnx")
    assert rc == 0, err  # rebuilt from the recorded recipe, verified against the record
    assert Path("m.onnx").stat().st_size == rows[2]["size_bytes"]


def test_an_old_study_resumes_with_its_trials_kept(old: Path, capsys: pytest.CaptureFixture):
    import optuna

    url = f"sqlite:///{old / 'study.db'}"
    before = {t.number: t.values for t in optuna.load_study(study_name="old", storage=url).trials}
    rc, out, err = _run(
        capsys, "search", str(old / "old.toml"), "--out-dir", str(old), "--trials", "4", "--quiet"
    )
    assert rc == 0, err
    assert "3 trials stored, 1 to run" in err
    study = optuna.load_study(study_name="old", storage=url)
    assert len(study.trials) == 4 and study.trials[3].state.name == "COMPLETE"
    assert {t.number: t.values for t in study.trials[:3]} == before
