"""The ``autoslim`` command: exit codes, one-line errors on stderr, results on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image

from autoslim import list_models
from autoslim.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ``imagefolder:`` dataset of 8 tiny images (the model is checked after the data loads)."""
    root = tmp_path_factory.mktemp("folder")
    for c, value in (("a", 0), ("b", 255)):
        (root / c).mkdir()
        for i in range(4):
            Image.new("L", (8, 8), value).save(root / c / f"{i}.png")
    return f"imagefolder:{root}"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoslim: error: ")
    return lines[0]


def test_models_lists_the_builtins(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    assert "unet_tiny  (segmentation)" in lines and "resnet18  (classification)" in lines


def test_missing_data_dir_exits_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc = main(["train", "--data-dir", str(tmp_path / "empty"), "--model", TINY])
    cap = capsys.readouterr()
    assert rc == 2
    line = _one_error_line(cap.err)
    assert "dataset-fashion-mnist" in line and "--data-dir" in line
    assert cap.out == ""


@pytest.mark.parametrize(
    "model,fragment",
    [
        ("resnet9000", "unknown model 'resnet9000'"),
        ("a:b:c", "cannot import module 'a:b'"),
        ("foo.py:", "malformed model 'foo.py:'"),
    ],
)
def test_bad_model_exits_2(
    capsys: pytest.CaptureFixture, tiny_folder: str, model: str, fragment: str
) -> None:
    rc = main(["train", "--model", model, "--dataset", tiny_folder, "--val-size", "2"])
    cap = capsys.readouterr()
    assert rc == 2
    assert fragment in _one_error_line(cap.err)
    assert cap.out == ""


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "many"])
    assert e.value.code == 2
    assert "--max-steps" in capsys.readouterr().err


def test_train_tiny_model_then_reuse_the_cache(
    capsys: pytest.CaptureFixture, autoslim_cache: Path
) -> None:
    args = ["train", "--model", TINY, "--max-steps", "20", "--val-size", "1000", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    path = Path(first["path"])
    assert path.is_file() and path.parent == autoslim_cache / "teachers"
    assert first["steps"] == 20
    assert first["val_accuracy"] > 0.2  # chance is 0.1
    assert first["model"] == TINY and first["dataset"] == "fashion-mnist"
    mtime = path.stat().st_mtime_ns

    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["path"] == first["path"]
    assert second["content_hash"] == first["content_hash"]
    assert path.stat().st_mtime_ns == mtime  # the cached teacher was reused, not retrained

    args_text = [a for a in args if a != "--json"]
    assert main(args_text) == 0
    text = capsys.readouterr().out
    assert f"teacher {TINY} on fashion-mnist: val {first['val_accuracy']:.4f}" in text
    assert f"checkpoint: {path}" in text


def test_installed_command_exit_code(tmp_path: Path, autoslim_cache: Path) -> None:
    exe = Path(sys.executable).with_name("autoslim")
    assert exe.is_file(), "the console script is installed next to the interpreter"
    env = {**os.environ, "AUTOSLIM_CACHE": str(autoslim_cache)}
    proc = subprocess.run(
        [str(exe), "train", "--data-dir", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "dataset-fashion-mnist" in _one_error_line(proc.stderr)
    assert proc.stdout == ""


def test_train_and_search_name_the_split_seed_alike() -> None:
    """``train --split-seed 1`` then ``search --split-seed 1`` use one split, so the search finds
    that teacher (``--seed`` of search is the sampler's seed only)."""
    from autoslim.cli import _parser
    from autoslim.study.spec import load_study_spec

    t = _parser().parse_args(["train", "--split-seed", "1"])
    s = _parser().parse_args(["search", "--split-seed", "1", "--seed", "7"])
    spec = load_study_spec(None, split_seed=s.split_seed, seed=s.seed)
    assert (t.split_seed, spec.split_seed, spec.seed) == (1, 1, 7)
