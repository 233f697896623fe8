"""Shared, session-scoped fixtures: a small Fashion-MNIST split, a tiny trained teacher, an
untrained ResNet-18 and its exported artifacts (built once, on demand, reused across files).

Everything autoslim caches goes to a temporary ``AUTOSLIM_CACHE``, never to ~/.cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from autoslim import (
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
from autoslim.artifact import ExportResult
from autoslim.pipeline import Compressed

# One intra-op thread: on a small shared machine more threads spin against each other and make
# every forward pass up to 100x slower. Latency is measured single-threaded anyway.
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
TINY = f"{TESTS_DIR / 'tiny_models.py'}:build"  # user factory spec of tests/tiny_models.py
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
