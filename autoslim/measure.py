"""Measurements on the artifact: accuracy (ONNX Runtime on a split), size on disk, latency.

Latency backends share one small interface (:class:`LatencyBackend`): ``measure(artifact)``
returns a :class:`Latency` (median, p90, runs) at batch 1 after warm-up. ``onnxruntime-cpu`` is
the default (1 thread, the deployable setting); ``onnxruntime-cuda`` runs the same file with
ORT's CUDA provider where onnxruntime-gpu and a GPU exist. Every backend times the artifact file, never the
PyTorch module (what ships is what is measured). A remote device agent would be one more backend.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .artifact import onnx_predict, ort_session
from .data import Split
from .errors import UsageError

__all__ = [
    "Latency",
    "LatencyBackend",
    "OrtBackend",
    "get_backend",
    "list_backends",
    "artifact_accuracy",
    "agreement",
    "host_identity",
]


def host_identity() -> dict[str, str | int]:
    """Which machine a timing comes from: host name, CPU model and the cores this process has."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": platform.node(), "cpu": cpu, "cores": int(cores or 1)}


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
    ) -> Latency:
        sess = ort_session(artifact, threads=self.threads, providers=[self.provider])
        name = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        return _summary(_time(lambda: sess.run(None, {name: x}), runs, warmup), self.name)


_BACKENDS = {
    "onnxruntime-cpu": lambda: OrtBackend("CPUExecutionProvider"),
    "onnxruntime-cuda": lambda: OrtBackend("CUDAExecutionProvider"),
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
    pred = onnx_predict(ort_session(artifact, threads=threads), split).argmax(1)
    return float((pred == split.y).float().mean()), pred


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal top-1 predictions."""
    return float((a == b).float().mean())
