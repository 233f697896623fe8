"""Measurements on the artifact: accuracy (ONNX Runtime on a split), size on disk, latency.

Latency backends share one small interface (:class:`LatencyBackend`): ``measure(artifact)``
returns a :class:`Latency` (median, p90, runs) at batch 1 after warm-up. ``onnxruntime-cpu`` is
the default (1 thread, the deployable setting); ``onnxruntime-cuda`` runs the same file with
ORT's CUDA provider where onnxruntime-gpu and a GPU exist; ``torch-cpu`` times the PyTorch
module for comparison. A remote device agent would be one more backend.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .artifact import onnx_predict, ort_session
from .data import Split
from .errors import UsageError

__all__ = [
    "Latency",
    "LatencyBackend",
    "OrtBackend",
    "TorchCpuBackend",
    "get_backend",
    "list_backends",
    "artifact_accuracy",
    "agreement",
]


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


def _time(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _summary(ts: list[float], backend: str) -> Latency:
    return Latency(statistics.median(ts), float(np.percentile(ts, 90)), len(ts), backend)


class LatencyBackend(Protocol):
    name: str

    def available(self) -> bool: ...

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        model: nn.Module | None = None,
    ) -> Latency: ...


class OrtBackend:
    """ONNX Runtime on the artifact file, batch 1, ``threads`` intra-op threads."""

    def __init__(self, provider: str = "CPUExecutionProvider", threads: int = 1) -> None:
        self.provider, self.threads = provider, threads
        self.name = "onnxruntime-cuda" if provider.startswith("CUDA") else "onnxruntime-cpu"

    def available(self) -> bool:
        import onnxruntime as ort

        return self.provider in ort.get_available_providers()

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        model: nn.Module | None = None,
    ) -> Latency:
        sess = ort_session(artifact, threads=self.threads, providers=[self.provider])
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        return _summary(_time(lambda: sess.run(None, {name: x}), runs, warmup), self.name)


class TorchCpuBackend:
    """The PyTorch module in eager mode on CPU (for comparison with the artifact)."""

    name = "torch-cpu"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def available(self) -> bool:
        return True

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        model: nn.Module | None = None,
    ) -> Latency:
        if model is None:
            raise UsageError("torch-cpu latency needs the PyTorch model; pass model=...")
        x = torch.randn(1, *input_shape)
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        model.eval()
        try:
            with torch.no_grad():
                ts = _time(lambda: model(x), runs, warmup)
        finally:
            torch.set_num_threads(old)
        return _summary(ts, self.name)


_BACKENDS = {
    "onnxruntime-cpu": lambda: OrtBackend("CPUExecutionProvider"),
    "onnxruntime-cuda": lambda: OrtBackend("CUDAExecutionProvider"),
    "torch-cpu": TorchCpuBackend,
}


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str = "onnxruntime-cpu") -> LatencyBackend:
    if name not in _BACKENDS:
        raise UsageError(f"unknown latency backend {name!r}; expected one of {list_backends()}")
    backend = _BACKENDS[name]()
    if not backend.available():
        raise UsageError(
            f"latency backend {name!r} is not available on this machine "
            "(onnxruntime-cuda needs onnxruntime-gpu and a GPU); use onnxruntime-cpu"
        )
    return backend


def artifact_accuracy(
    artifact: Path, split: Split, *, threads: int = 2
) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of the ONNX file (run by ONNX Runtime) on ``split``, and its predictions."""
    pred = onnx_predict(ort_session(artifact, threads=threads), split.x).argmax(1)
    return float((pred == split.y).float().mean()), pred


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal top-1 predictions."""
    return float((a == b).float().mean())
