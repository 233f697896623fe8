"""Shared, session-scoped fixtures: a small Fashion-MNIST split, a tiny trained teacher, an
untrained ResNet-18 and its exported artifacts (built once, on demand, reused across files).

Everything autoslim caches goes to a temporary ``AUTOSLIM_CACHE``, never to ~/.cache.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The latency protocol times every file for at least 2 s (a shared machine's regimes); the
# suite's timings check behaviour, not figures: no least duration here (nor in the CLI
# processes and agents the tests start, which inherit it). tests/measure/test_measure.py checks it.
os.environ["AUTOSLIM_LATENCY_MIN_S"] = "0"
os.environ["AUTOSLIM_LATENCY_WARMUP_S"] = "0.05"  # warm-up: 20 runs and 0.05 s (not 0.5 s)

from autoslim import (  # noqa: E402
    CompressionConfig,
    DataSplits,
    Recovery,
    Teacher,
    TeacherRecipe,
    compress,
    export,
    get_teacher,
    list_groups,
    load_dataset,
)
from autoslim.artifact import ExportResult  # noqa: E402
from autoslim.pipeline import Compressed  # noqa: E402
from autoslim.study.spec import StudySpec, load_study_spec
from autoslim.workflow import SearchResult, search

# One intra-op thread: on a small shared machine more threads spin against each other and make
# every forward pass up to 100x slower. Latency is measured single-threaded anyway.
torch.set_num_threads(1)
# `make test` runs the suite in pytest-xdist workers, one per core: the CLI processes the tests
# start get one thread each too (torch and ONNX Runtime read OMP_NUM_THREADS at start-up).
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"

TESTS_DIR = Path(__file__).resolve().parent
TINY = f"{TESTS_DIR / 'tiny_models.py'}:build"  # user factory spec of tests/tiny_models.py
SHUFFLENET = f"{TESTS_DIR / 'tiny_models.py'}:shufflenet"  # Torch-Pruning cannot trace it
CONVNEXT = f"{TESTS_DIR / 'tiny_models.py'}:convnext"  # torch.export fails on a dynamic batch
TINY_RECIPE = TeacherRecipe(max_steps=150, batch_size=64)
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EXAMPLE_28 = (1, 1, 28, 28)


@pytest.fixture(scope="session", autouse=True)
def autoslim_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private cache directory for the whole session (teachers, teacher logits)."""
    path = tmp_path_factory.mktemp("autoslim-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOSLIM_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def fmnist() -> DataSplits:
    """Fashion-MNIST: 2000 training and 500 validation images (the test split is full)."""
    return load_dataset("fashion-mnist", val_size=500, limit_train=2000, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(autoslim_cache: Path, fmnist: DataSplits) -> Teacher:
    """The tiny CNN of tests/tiny_models.py trained for 150 steps (cached in the session cache)."""
    return get_teacher(TINY, fmnist, recipe=TINY_RECIPE, progress=False)


@pytest.fixture(scope="session")
def resnet18() -> torch.nn.Module:
    """An untrained ResNet-18 for 28x28x1 images, eval mode. Do not mutate: deepcopy it."""
    from autoslim import build_model

    torch.manual_seed(0)
    return build_model("resnet18", in_channels=1, num_classes=10, image_size=28).eval()


@pytest.fixture
def fresh_resnet18(resnet18: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(resnet18)


@pytest.fixture(scope="session")
def resnet_groups(resnet18: torch.nn.Module) -> list[str]:
    return [g.name for g in list_groups(resnet18, torch.zeros(EXAMPLE_28), classifier="fc")]


@dataclass
class Built:
    compressed: Compressed
    result: ExportResult


@pytest.fixture(scope="session")
def resnet_artifact(tmp_path_factory, resnet18, resnet_groups, fmnist):
    """``build(prune, weight_bits, act_bits)``: ResNet-18 compressed (no recovery training) and
    exported with the correctness gate on 200 validation images; built once per setting."""
    base = tmp_path_factory.mktemp("artifacts")
    built: dict[tuple, Built] = {}

    def build(prune: float, weight_bits: int = 32, act_bits: int = 32) -> Built:
        key = (prune, weight_bits, act_bits)
        if key not in built:
            cfg = CompressionConfig.uniform(
                prune=prune, weight_bits=weight_bits, act_bits=act_bits, groups=resnet_groups
            )
            c = compress(
                resnet18,
                cfg,
                data=fmnist,
                recovery=Recovery(steps=0, bn_batches=2, batch_size=64),
                classifier="fc",
            )
            out = base / f"p{prune}-w{weight_bits}a{act_bits}" / "model.onnx"
            # An untrained network has near-tied logits, so uint8 activations flip some top-1
            # predictions; the float and weight-only artifacts must pass the default gate.
            gate = 0.5 if act_bits == 8 else 0.99
            built[key] = Built(c, export(c, out, check=fmnist.val.subset(200), min_agreement=gate))
        return built[key]

    return build


# --- a tiny study, searched once per session and shared by the runner/report/results tests ---

BUDGET = 30_000  # bytes: the fp32 TinyNet artifact is ~35 kB; int8 or pruning fits
TINY_TRIALS = 6
TINY_SPACE = """
[distill]
temperature = 4.0
alpha = [0.5, 0.9]

[[rules]]
match = "fc"
weight_bits = [8, 32]
act_bits = 8

[[rules]]
match = "*"
prune = {min = 0.0, max = 0.5, step = 0.25}
weight_bits = [8, 32]
act_bits = 8
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args: str) -> subprocess.Popen:
    """``python -m autoslim.cli ARGS`` as a user's terminal starts it: SIGINT at its default.

    A shell without job control starts background jobs with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler; the child resets it so that the interrupt tests hold
    however the test run itself was started.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "autoslim.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def run_cli(
    *args: str, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m autoslim.cli ARGS`` to completion (in ``cwd``), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "autoslim.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def continuous_prune_space(weight_bits: str = "8") -> str:
    """A TinyNet space with continuous pruning ratios (two workers proposing the same
    parameters can only be lockstep) and int8 activations; ``weight_bits`` of the layers."""
    return (
        "[distill]\ntemperature = 4.0\nalpha = 0.9\n\n"
        '[[rules]]\nmatch = "fc"\nweight_bits = 8\nact_bits = 8\n\n'
        '[[rules]]\nmatch = "*"\nprune = {min = 0.0, max = 0.6}\n'
        f"weight_bits = {weight_bits}\nact_bits = 8\n"
    )


def tiny_study_file(tmp: Path, name: str, trials: int) -> Path:
    """A study TOML for TinyNet on a Fashion-MNIST subset, outputs under ``tmp / name``."""
    (tmp / "space.toml").write_text(TINY_SPACE)
    f = tmp / f"{name}.toml"
    f.write_text(
        f'name = "{name}"\nmodel = "{TINY}"\nspace = "{tmp / "space.toml"}"\n'
        f'budget = "{BUDGET}B"\ntrials = {trials}\nsampler = "tpe"\nval_size = 500\n'
        f"limit_train = 1500\nlatency_runs = 20\ngate_images = 300\n"
        # a 150-step TinyNet has near-tied logits on many images: int8 rounding flips more of
        # them than on a trained ResNet (99.7% there); the default gate stays 0.99
        "gate_agreement = 0.95\n"
        f'out_dir = "{tmp / name}"\n'
        "[teacher]\nmax_steps = 150\n"
        "[recovery]\nsteps = 10\nbatch_size = 64\nsubset = 1000\n"
    )
    return f


@dataclass
class TinyStudy:
    spec: StudySpec
    result: SearchResult

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory, autoslim_cache: Path) -> TinyStudy:
    """A finished 6-trial TinyNet study (budget 30 kB). Read it; do not add trials to it."""
    spec = load_study_spec(tiny_study_file(tmp_path_factory.mktemp("study"), "tiny", TINY_TRIALS))
    return TinyStudy(spec, search(spec, progress=False))


# -- a real PostgreSQL server for the multi-worker tests ------------------------------------


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (see ``pgserver``), started once per
    session; ``postgres_url()`` makes a fresh empty database and returns its URL.
    ``make test`` installs Debian's ``postgresql`` package when missing and sets
    AUTOSLIM_REQUIRE_POSTGRES=1, so a missing server fails there instead of skipping."""
    from pgserver import pg_bin, throwaway_postgres

    if pg_bin() is None:
        if os.environ.get("AUTOSLIM_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries not found: sudo apt-get install postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with throwaway_postgres() as new_database:
        yield new_database
