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
    assert "autoslim/report/report.css" in names and "autoslim/report/report.js" in names
    assert not [n for n in names if "/runs/" in n]  # studies/runs/ (outputs) never shipped
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
    assert re.search(r"^1 trials \(1 measured\)", r.stdout, re.M), r.stdout  # trained, timed
    assert "trials: 1 of 1 counted; 1 trained and measured" in r.stderr, r.stderr
    # the shipped default space was found as package data (no fallback, no "one of []")
    assert "not found" not in r.stderr


def test_the_shipped_default_study_is_read(installed: Path, tmp_path: Path) -> None:
    """No study file: the shipped default (with its accuracy floor), not dataclass defaults."""
    code = "from autoslim.study.spec import load_study_spec as f; s = f(None); print(s.max_accuracy_drop)"
    out = subprocess.run(
        [str(installed / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True
    )  # fmt: skip
    assert out.stdout.strip() == "0.05", out.stderr


def _wheel_requires(wheel: Path, extra: str) -> list[str]:
    """The distributions the wheel itself says ``autoslim[extra]`` needs (its Requires-Dist:
    the core ones and those of ``extra``), read from its METADATA."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            out.append(req.name)
    return out


def _agent_site(dest: Path, wheel: Path) -> Path:
    """Links to the distributions ``autoslim[agent]`` needs by the wheel's own Requires-Dist,
    and theirs, from this venv: a site folder with no torch, optuna or onnx."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    purelib = Path(sysconfig.get_paths()["purelib"])
    todo, seen = _wheel_requires(wheel, "agent"), set()
    assert {"numpy", "onnxruntime", "starlette", "uvicorn"} <= set(todo), todo
    dest.mkdir(parents=True)
    while todo:
        name = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (purelib / top).exists() and not (dest / top).exists() and top != "__pycache__":
                (dest / top).symlink_to(purelib / top)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert not {"torch", "optuna", "onnx"} & seen, seen
    return dest


@pytest.fixture(scope="module")
def agent_only(tmp_path_factory: pytest.TempPathFactory, installed: Path) -> Path:
    """A venv with the wheel and only the agent's dependencies (no torch): its bin folder."""
    tmp = tmp_path_factory.mktemp("agent-install")
    (wheel,) = (installed.parent.parent / "wheels").glob("autoslim-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "agent-deps.pth").write_text(str(_agent_site(tmp / "deps", wheel)) + "\n")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    return venv / "bin"


def test_the_agent_runs_where_torch_is_not_installed(agent_only: Path, tmp_path: Path) -> None:
    """`autoslim agent` on a device with only 'autoslim[agent]': it starts, a search host
    measures a file on it; torch really is absent there, and the search verbs say what to
    install in one line."""
    import socket
    import time

    import onnx
    from onnx import TensorProto, helper

    from autoslim.measure.remote import RemoteBackend

    py = str(agent_only / "python")
    gone = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert gone.returncode != 0 and "No module named 'torch'" in gone.stderr
    secret = tmp_path / "agent.secret"
    r = _run(agent_only, tmp_path, "agent", "--init-secret", str(secret))
    assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    agent = subprocess.Popen(
        [str(agent_only / "autoslim"), "agent", "--port", str(port), "--secret", str(secret),
         "--store", str(tmp_path / "store")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        model = helper.make_model(
            helper.make_graph(
                [helper.make_node("Relu", ["x"], ["y"])],
                "relu",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        model.ir_version = 8
        onnx.save(model, tmp_path / "relu.onnx")
        from autoslim.measure.auth import load_secret

        backend = RemoteBackend("127.0.0.1", port, secret=load_secret(secret))
        deadline = time.monotonic() + 60
        while not backend.available():
            assert agent.poll() is None, agent.communicate()[1]
            assert time.monotonic() < deadline, "the agent did not come up in 60 s"
            time.sleep(0.3)
        lat = backend.measure(tmp_path / "relu.onnx", input_shape=(3, 8, 8), runs=30, warmup=2)
        assert lat.runs > 0 and lat.ci_low_ms <= lat.median_ms <= lat.ci_high_ms
        assert backend.info()["onnxruntime"]
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    r = _run(agent_only, tmp_path, "measure", "relu.onnx", "relu.onnx", "--rounds", "1")
    assert r.returncode == 0, r.stderr  # a device times files itself, torch or not
    assert "relu.onnx" in r.stdout and "1.000" in r.stdout
    r = _run(agent_only, tmp_path, "search", "--trials", "1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "autoslim[search]" in r.stderr
