"""``pip install .`` gives a working tool: the wheel ships the studies and search spaces, and a
search run from an empty folder, outside the source tree, writes under that folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the built wheel installed (its dependencies are this venv's:
    a .pth line, so nothing is downloaded). Returns the venv's bin folder."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(ROOT)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("autoslim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autoslim/resources/studies/default.toml" in names
    assert "autoslim/resources/search_spaces/default.toml" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # dependencies from the running venv; its editable autoslim is not on that path
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(bin_dir / "autoslim"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_installed_package_is_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(installed / "python"), "-c", "import autoslim; print(autoslim.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(installed.parent) in out and str(ROOT) not in out


def test_space_check_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, tmp_path, "space", "check", "default", "--model", "resnet18")
    assert r.returncode == 0, r.stderr
    assert "one parameter per stage" in r.stdout


def test_tiny_search_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(
        f'name = "tiny"\nmodel = "{TINY}"\ntrials = 1\nval_size = 500\nlimit_train = 1000\n'
        "limit_test = 500\nlatency_runs = 10\ngate_images = 200\ngate_agreement = 0.9\n"
        "max_accuracy_drop = 1.0\n[teacher]\nmax_steps = 30\n[recovery]\nsteps = 5\n"
        "batch_size = 64\nsubset = 500\n"
    )
    r = _run(installed, tmp_path, "search", "tiny.toml", "--quiet")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "studies" / "runs" / "tiny"
    assert (run / "study.db").is_file() and (run / "report.html").is_file()
    assert re.search(r"^1 trials \(\d measured\)", r.stdout, re.M), r.stdout
    # the shipped default space was found as package data (no fallback, no "one of []")
    assert "not found" not in r.stderr


def test_the_shipped_default_study_is_read(installed: Path, tmp_path: Path) -> None:
    """No study file: the shipped default (with its accuracy floor), not dataclass defaults."""
    code = (
        "from autoslim.study import load_study_spec as f; s = f(None); print(s.max_accuracy_drop)"
    )
    out = subprocess.run(
        [str(installed / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True
    )  # fmt: skip
    assert out.stdout.strip() == "0.05", out.stderr
