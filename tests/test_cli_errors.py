"""Every bad input gets one ``autoslim: error: ...`` line, the right exit code, no traceback, and
leaves every stored study byte-identical (a table of the inputs users give)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRIALS, run_cli, tiny_study_file
from PIL import Image

from autoslim.cli import main

# (id, arguments, exit code, a fragment the one line must hold). In the arguments, {study} is a
# finished tiny study folder, {tmp} a scratch folder holding the files made by `inputs`,
# {corrupt} a study folder whose study.db is not a database.
CASES = [
    # flags argparse checks
    ("unknown-command", "bogus", 2, "invalid choice: 'bogus'"),
    ("unknown-flag", "search --no-such-flag", 2, "unrecognized arguments: --no-such-flag"),
    ("trials-not-int", "search --trials many", 2, "--trials: expected an integer in [1, 100000]"),
    (
        "trials-zero",
        "search --trials 0",
        2,
        "--trials: expected an integer in [1, 100000]; got '0'",
    ),
    ("recovery-steps-negative", "search --recovery-steps -1", 2, "--recovery-steps"),
    ("limit-train-zero", "search --limit-train 0", 2, "--limit-train"),
    ("seed-negative", "search --seed -1", 2, "--seed"),
    ("split-seed-text", "search --split-seed x", 2, "--split-seed"),
    ("sampler-unknown", "search --sampler cmaes", 2, "--sampler: invalid choice"),
    ("drop-above-one", "search --max-accuracy-drop 2", 2, "fraction in [0, 1]"),
    ("drop-text", "search --max-accuracy-drop lots", 2, "fraction in [0, 1]"),
    ("train-epochs-zero", "train --epochs 0", 2, "--epochs: expected an integer in [1, 1000]"),
    ("train-lr-zero", "train --lr 0", 2, "--lr: expected a number > 0"),
    ("train-lr-nan", "train --lr nan", 2, "--lr: expected a number > 0"),
    ("train-batch-negative", "train --batch-size -3", 2, "--batch-size"),
    ("train-max-steps-text", "train --max-steps many", 2, "--max-steps"),
    ("train-val-size-zero", "train --val-size 0", 2, "--val-size"),
    ("train-old-seed-flag", "train --seed 1", 2, "unrecognized arguments: --seed"),
    ("refine-qat-fraction", "refine {study} --trial 0 --qat-fraction 1.5", 2, "--qat-fraction"),
    ("refine-epochs-zero", "refine {study} --trial 0 --epochs 0", 2, "--epochs"),
    ("refine-seed-negative", "refine {study} --trial 0 --seed -1", 2, "--seed"),
    ("refine-neither", "refine {study}", 2, "exactly one of --trial N or --front"),
    ("pick-min-accuracy", "pick {study} --min-accuracy 3", 2, "--min-accuracy"),
    ("export-negative-trial", "export {study} --trial -1 -o {tmp}/m.onnx", 2, "--trial"),
    ("export-no-output", "export {study} --trial 0", 2, "-o/--output"),
    ("report-format", "report {study} --format pdf", 2, "--format: invalid choice"),
    # values the library checks
    ("budget-text", "search --budget lots", 2, "budget"),
    ("budget-negative", "search --budget -2MB", 2, "budget"),
    ("latency-unit", "search --max-latency 5parsecs", 2, "latency"),
    ("objective-unknown", "search --objectives accuracy,speed", 2, "objectives"),
    ("objective-no-accuracy", "search --objectives latency", 2, "must include 'accuracy'"),
    ("backend-unknown", "search --backend tpu", 2, "unknown latency backend 'tpu'"),
    ("backend-torch-cpu", "search --backend torch-cpu", 2, "unknown latency backend"),
    ("storage-scheme", "search --storage bogus://x --name s", 2, "storage"),
    (
        "storage-postgres-unreachable",
        "search --storage postgresql+psycopg://u:secret@127.0.0.1:9/db --name s",
        2,
        "cannot reach the storage database postgresql+psycopg://u:***@127.0.0.1:9/db",
    ),
    ("storage-not-a-url", "search --storage nothing-like-a-url", 2, "not a database URL"),
    ("study-missing", "search {tmp}/missing.toml", 2, "not found"),
    ("study-not-toml", "search {tmp}/bad.toml", 2, "not valid TOML"),
    ("study-unknown-key", "search {tmp}/unknown-key.toml", 2, "unknown keys ['epochz']"),
    ("study-trials-text", "search {tmp}/trials-text.toml", 2, "trials must be an integer"),
    ("study-steps-negative", "search {tmp}/steps-negative.toml", 2, "recovery_steps must be >= 0"),
    ("study-gate", "search {tmp}/gate.toml", 2, "gate_agreement"),
    ("space-missing", "search --space nowhere", 2, "search space 'nowhere' not found"),
    ("space-not-toml", "space check {tmp}/bad.toml", 2, "not valid TOML"),
    ("space-empty-range", "space check {tmp}/range.toml", 2, "empty range"),
    ("space-model-unknown", "space check default --model resnet9000", 2, "unknown model"),
    ("model-unknown", "train --model resnet9000 --max-steps 1", 2, "unknown model 'resnet9000'"),
    ("model-syntax-error", "train --model {tmp}/broken.py:build --max-steps 1", 2, "broken.py"),
    ("model-no-factory", "train --model {tmp}/nofactory.py:build --max-steps 1", 2, "build"),
    ("model-not-a-module", "train --model {tmp}/returns.py:build --max-steps 1", 2, "nn.Module"),
    ("teacher-missing", "search --model resnet18 --teacher {tmp}/none.pt", 2, "none.pt"),
    ("teacher-garbage", "search --model resnet18 --teacher {tmp}/garbage.pt", 2, "garbage.pt"),
    ("data-folder-missing", "train --dataset imagefolder:{tmp}/nowhere", 2, "nowhere"),
    ("data-corrupt-image", "train --dataset imagefolder:{tmp}/corrupt", 2, "bad.png"),
    ("data-unknown", "train --dataset imagenet-1k", 2, "imagenet-1k"),
    ("data-dir-empty", "train --data-dir {tmp}/empty", 2, "dataset-fashion-mnist"),
    ("study-unknown", "report no-such-study", 2, "no study found"),
    ("study-db-corrupt", "report {corrupt}", 2, "cannot read study storage"),
    ("report-output-folder", "report {study} -o {tmp}/nowhere/r.html", 2, "--output"),
    ("pick-size-text", "pick {study} --max-size lots", 2, "size"),
    ("pick-nothing-qualifies", "pick {study} --min-accuracy 0.999", 3, "no trial"),
    ("export-unknown-trial", "export {study} --trial 999 -o {tmp}/m.onnx", 2, "999"),
    ("export-output-is-folder", "export {study} --trial 0 -o {tmp}/folder.onnx", 2, "folder"),
    ("export-output-parent", "export {study} --trial 0 -o {tmp}/no/such/m.onnx", 2, "folder"),
    ("export-refined-missing", "export {study} --trial 0 --refined -o {tmp}/m.onnx", 2, "refine"),
    ("refine-unknown-trial", "refine {study} --trial 999", 2, "999"),
    ("measure-missing-file", "measure {tmp}/none.onnx", 2, "no such file"),
    ("measure-not-onnx", "measure {tmp}/garbage.pt", 2, "not an ONNX model"),
    ("measure-shape-text", "measure {tmp}/garbage.pt --input-shape 1,x", 2, "--input-shape"),
    ("measure-not-onnx-shaped", "measure {tmp}/garbage.pt --input-shape 1,8,8", 2, "not an ONNX"),
    ("measure-rounds-zero", "measure {tmp}/garbage.pt --rounds 0", 2, "--rounds"),
    # a study name is a label: one path component, never a way out of ./studies/runs/
    ("name-escapes", "search --name ../../escape", 2, "name must be a study name"),
    ("name-dot-dot", "search --name ..", 2, "name must be a study name"),
    ("name-nested", "search --name a/b", 2, "name must be a study name"),
    ("name-absolute", "search --name /tmp/x", 2, "name must be a study name"),
    ("name-in-study-file", "search {tmp}/bad-name.toml", 2, "name must be a study name"),
    # upper bounds of sanity
    ("trials-huge", "search --trials 1000000000000", 2, "--trials: expected an integer in"),
    ("study-trials-huge", "search {tmp}/trials-huge.toml", 2, "trials must be <= 100,000"),
    ("workers-huge", "search --workers 100000", 2, "--workers"),
    ("recovery-steps-huge", "search --recovery-steps 1000000000", 2, "--recovery-steps"),
    ("refine-epochs-huge", "refine {study} --trial 0 --epochs 1000000000", 2, "--epochs"),
    ("train-epochs-huge", "train --epochs 100000", 2, "--epochs"),
    ("measure-rounds-huge", "measure {tmp}/garbage.pt --rounds 99999999", 2, "--rounds"),
    # storage, folders and stores that cannot work: refused before anything is written
    ("storage-sqlite-no-folder", "search --storage sqlite:////missing/x.db", 2, "does not exist"),
    ("storage-sqlite-folder", "search --storage sqlite:///{tmp}/empty", 2, "is a folder"),
    ("out-dir-under-a-file", "search --out-dir {tmp}/garbage.pt/run", 2, "is a file"),
    ("out-dir-not-writable", "search --out-dir /proc/autoslim-run", 2, "cannot be written"),
    ("artifacts-under-a-file", "search --artifacts {tmp}/garbage.pt/store", 2, "is a file"),
    ("artifacts-is-a-file", "search --artifacts {tmp}/garbage.pt", 2, "is a file"),
    ("artifacts-not-writable", "search --artifacts /proc/autoslim-store", 2, "cannot be written"),
    ("artifacts-s3-prefix", "search --artifacts s3://bucket/key", 2, "s3://BUCKET"),
    ("budget-unreachable", "search {tmp}/tiny.toml --budget 100B", 2, "cannot be met"),
    # a refused search prints its error alone (no budget echo first)
    ("budget-then-bad-backend", "search --budget 2MB --backend tpu", 2, "tpu"),
    ("budget-then-bad-space", "search --budget 2MB --space nowhere", 2, "nowhere"),
    # the read verbs name the storage kinds, as search does
    ("status-storage-scheme", "status s --storage bogus://x", 2, "unknown database kind"),
    ("status-storage-no-file", "status s --storage sqlite:///{tmp}/none.db", 2, "no such database"),
    ("report-storage-scheme", "report s --storage bogus://x", 2, "unknown database kind"),
    ("pick-storage-no-url", "pick s --storage nothing-like-a-url", 2, "not a database URL"),
    # the user's model: their error, named as such
    ("model-factory-raises", "train --model {tmp}/raises.py:build --max-steps 1", 2, "raised"),
    ("model-wrong-classes", "train --model {tmp}/three.py:build --max-steps 1", 2, "per class"),
    ("model-wrong-input", "train --model {tmp}/rgb.py:build --max-steps 1", 2, "fails on a batch"),
    ("task-unknown", "search --task nope --trials 1", 2, "unknown task 'nope'"),
    ("task-file-missing", "search --task {tmp}/none.py:task --trials 1", 2, "does not exist"),
    ("task-not-the-datasets", "search --task segmentation --trials 1", 2, "does not fit dataset"),
    ("model-of-another-task", "train --model unet_tiny --max-steps 1", 2, "segmentation model"),
    ("space-model-raises", "space check default --model {tmp}/raises.py:build", 2, "raised"),
    # user data
    (
        "data-empty-class",
        "train --dataset imagefolder:{tmp}/emptyclass",
        2,
        "holds no readable images",
    ),
    ("data-1px-images", "train --dataset imagefolder:{tmp}/onepixel", 2, "at least 8x8"),
    # paths named for output or measurement
    ("measure-a-folder", "measure {tmp}/empty", 2, "is a folder"),
    ("measure-shape-mismatch", "measure {study}/teacher_fp32.onnx --input-shape 3,64,64", 2, "fit"),
    ("export-under-a-file", "export {study} --trial 0 -o {tmp}/garbage.pt/m.onnx", 2, "is a file"),
    ("refine-under-a-file", "refine {study} --trial 0 -o {tmp}/garbage.pt/m.onnx", 2, "is a file"),
    ("refine-front-under-a-file", "refine {study} --front -o {tmp}/garbage.pt/out", 2, "is a file"),
    ("report-images-under-a-file", "report {study} --images {tmp}/garbage.pt/img", 2, "is a file"),
    ("report-output-under-a-file", "report {study} -o {tmp}/garbage.pt/r.html", 2, "--output"),
    ("export-not-writable", "export {study} --trial 0 -o /proc/m.onnx", 2, "cannot write in"),
    ("report-not-writable", "report {study} -o /proc/r.html", 2, "cannot write in"),
    ("refine-not-writable", "refine {study} --trial 0 -o /proc/m.onnx", 2, "cannot write in"),
    ("measure-not-a-file", "measure /dev/null", 2, "not a regular file"),
    ("teacher-a-folder", "search --teacher {tmp}/empty", 2, "is a folder"),
    ("space-a-folder", "space check {tmp}/empty", 2, "is a folder"),
    # the device agent's entry points
    ("agent-unknown-flag", "agent --secret-file x", 2, "unrecognized arguments"),
    ("agent-remote-host", "agent --secret {tmp}/agent.secret --host 0.0.0.0", 2, "--allow-remote"),
    (
        "agent-store-under-a-file",
        "agent --secret {tmp}/agent.secret --store {tmp}/garbage.pt/s",
        2,
        "Not a directory",
    ),
    ("agent-secret-under-a-file", "agent --init-secret {tmp}/garbage.pt/s", 2, "cannot use"),
    ("agent-secret-missing", "agent --secret {tmp}/none.secret", 2, "does not exist"),
]


def _make_inputs(tmp: Path, study: Path) -> dict[str, str]:
    (tmp / "bad.toml").write_text("this is = = not toml")
    (tmp / "unknown-key.toml").write_text("epochz = 3\n")
    (tmp / "trials-text.toml").write_text('trials = "many"\n')
    (tmp / "steps-negative.toml").write_text("[recovery]\nsteps = -1\n")
    (tmp / "gate.toml").write_text("gate_agreement = 1.5\n")
    (tmp / "range.toml").write_text('[[rules]]\nmatch = "*"\nprune = {min = 0.5, max = 0.2}\n')
    (tmp / "broken.py").write_text("def build(:\n")
    (tmp / "nofactory.py").write_text("x = 1\n")
    (tmp / "returns.py").write_text("def build(**kw):\n    return 42\n")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp / "empty").mkdir()
    (tmp / "folder.onnx").mkdir()
    for c in ("a", "b"):
        (tmp / "corrupt" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp / "corrupt" / c / f"{i}.png")
    (tmp / "corrupt" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    from autoslim.measure.auth import create_secret

    create_secret(tmp / "agent.secret")
    (tmp / "bad-name.toml").write_text('name = "../outside"\n')
    (tmp / "trials-huge.toml").write_text("trials = 1000000000000\n")
    (tmp / "raises.py").write_text("def build(**kw):\n    raise RuntimeError('no weights here')\n")
    (tmp / "three.py").write_text(
        "import torch.nn as nn\n\ndef build():\n"
        "    return nn.Sequential(nn.Flatten(1), nn.Linear(784, 3))\n"
    )
    (tmp / "rgb.py").write_text(
        "import torch.nn as nn\n\ndef build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1), nn.LazyLinear(num_classes))\n"
    )
    for c in ("a", "b", "c"):
        (tmp / "emptyclass" / c).mkdir(parents=True)
    for c in ("a", "b"):
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp / "emptyclass" / c / f"{i}.png")
        (tmp / "onepixel" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (1, 1), (40 * i, 0, 0)).save(tmp / "onepixel" / c / f"{i}.png")
    tiny_study_file(tmp, "tiny", TINY_TRIALS)  # {tmp}/tiny.toml: its teacher is cached
    corrupt = tmp / "corrupt-study"
    corrupt.mkdir()
    (corrupt / "study.db").write_bytes(b"SQLite format 3\x00" + b"\x13" * 4000)
    return {"study": str(study), "tmp": str(tmp), "corrupt": str(corrupt)}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_study) -> dict[str, str]:
    # a copy of the shared study: a case that wrongly wrote to it must not disturb other tests
    study = tmp_path_factory.mktemp("bad-inputs") / "study"
    shutil.copytree(tiny_study.run_dir, study)
    return _make_inputs(tmp_path_factory.mktemp("bad-input-files"), study)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args,code,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(
    inputs: dict[str, str],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: str,
    code: int,
    fragment: str,
) -> None:
    study = Path(inputs["study"])
    before = _hashes(study)
    monkeypatch.chdir(tmp_path)  # where a new study would be made: ./studies/runs/NAME
    try:
        rc = main(args.format(**inputs).split())
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == code, cap.err
    assert len(lines) == 1 and re.match(r"autoslim( agent)?: error: ", lines[0]), cap.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    assert cap.out == ""
    assert _hashes(study) == before  # nothing stored changed or was added
    assert not any(tmp_path.iterdir())  # no half-made study folder
    outside = Path(inputs["tmp"])
    assert not (outside / "tiny").exists()  # the tiny study file's out_dir was never made
    assert not Path("/missing").exists()


@pytest.mark.parametrize(
    "args",
    ["search --trials 0", "train --model {tmp}/broken.py:build", "report {corrupt}"],
    ids=["argparse", "user-file", "corrupt-db"],
)
def test_a_real_process_prints_one_line_and_no_warnings(inputs: dict[str, str], args: str) -> None:
    """As a terminal sees it: third-party warnings and log lines stay off stderr."""
    r = run_cli(*args.format(**inputs).split(), timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoslim: error: "), r.stderr


def test_json_stdout_is_the_document_alone(tmp_path: Path) -> None:
    """A user's model file that prints at import: under --json its words go to stderr and
    stdout parses as the one JSON document."""
    noisy = tmp_path / "noisy.py"
    noisy.write_text(
        "print('hello from the model file')\nfrom tiny_models import build  # noqa: F401\n"
    )
    env_path = str(Path(__file__).parent)
    r = subprocess.run(
        [sys.executable, "-m", "autoslim.cli", "train", "--model", f"{noisy}:build"]
        + ["--max-steps", "2", "--val-size", "200", "--json"],
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout
    assert doc["steps"] == 2 and "val_accuracy" in doc
    assert "hello from the model file" in r.stderr


def _half_made(tmp: Path) -> Path:
    """A study stopped during its set-up: created, its spec recorded, no baseline, no trial."""
    import optuna

    from autoslim.study.spec import StudySpec

    run = tmp / "half"
    run.mkdir()
    study = optuna.create_study(
        study_name="half", storage=f"sqlite:///{run / 'study.db'}", directions=["maximize"] * 2
    )
    study.set_user_attr("spec", StudySpec(name="half", out_dir=str(run)).to_dict())
    return run


@pytest.mark.parametrize(
    "args,code,says",
    [
        ("status {run}", 0, "0 of 25 trials counted"),
        ("status {run} --json", 0, '"counted": 0'),
        ("report {run} --format table", 0, "no trial yet"),
        ("report {run} --format json", 0, "[]"),
        ("report {run} --format csv", 0, "trial,state,status"),
        ("report {run}", 0, "report: "),
        ("pick {run}", 3, "no trial"),
        ("export {run} --trial 0 -o {run}/m.onnx", 2, "trial 0"),
    ],
    ids=["status", "status-json", "table", "json", "csv", "html", "pick", "export"],
)
def test_every_read_verb_works_on_a_study_without_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: str, code: int, says: str
) -> None:
    run = _half_made(tmp_path)
    rc = main(args.format(run=run).split())
    cap = capsys.readouterr()
    assert rc == code, cap.err
    assert "unexpected" not in cap.err and "Traceback" not in cap.err
    assert says in cap.out + cap.err, cap.out + cap.err
