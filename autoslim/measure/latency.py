"""The latency protocol."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UsageError

# the runtimes a backend can time on (local names; a device agent's are given after "/")
RUNTIMES = ("executorch-xnnpack", "onnxruntime-cpu", "onnxruntime-cuda", "openvino-cpu")

# warm-up lasts at least this long (caches, frequency ramp, ORT's arenas); like MIN_S below, an
# environment variable may lower it where no figure is kept (the test suite sets 0.05)
WARMUP_S = float(os.environ.get("AUTOSLIM_LATENCY_WARMUP_S", "0.5"))


BLOCK = 20  # timed runs per block


MIN_BLOCKS = 3


CI_TARGET = 0.02  # stop once the median's 95% CI is within +-2% of it


MAX_S = 20.0  # time cap of the timed blocks


# least seconds of timed blocks (0: stop on the CI or ``runs`` at once, as the test suite does)
MIN_S = float(os.environ.get("AUTOSLIM_LATENCY_MIN_S", "2.0"))


NOISY_SPREAD = 0.05  # block medians' coefficient of variation above this: noisy


NOISY_DRIFT = 0.05  # last vs first block median


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
    """One latency measurement of an artifact (milliseconds), by :func:`time_runs`."""

    median_ms: float
    p90_ms: float
    runs: int
    backend: str
    iqr_ms: float = 0.0
    ci_low_ms: float = 0.0
    ci_high_ms: float = 0.0
    cold_ms: float = 0.0
    blocks: list[float] = field(default_factory=list)  # median of each timed block
    noisy: bool = False
    noise: list[str] = field(default_factory=list)  # why it is noisy, one reason each
    device: dict = field(default_factory=dict)  # where it was measured (host_identity / agent)
    reference_ms: float = 0.0  # paired: the reference's median over its blocks (0: unpaired)
    ratio: float = 0.0  # paired: median of (candidate block / reference block) medians

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Latency:
        """The inverse of :meth:`to_dict` (unknown keys of a newer agent are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def median_ci(samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of the median from order statistics (no distribution assumed)."""
    s, n = sorted(samples), len(samples)
    if n < 3:
        return s[0], s[-1]
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    return s[lo], s[hi]


def _load_reason(cores: int) -> str | None:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load > cores + 0.5:  # this process accounts for one
        return f"load average {load:.1f} on {cores} cores"
    return None


def time_runs(
    fn: Callable[[], object],
    *,
    backend: str,
    runs: int = 200,
    warmup: int = 20,
    warmup_s: float | None = None,
    max_s: float = MAX_S,
    min_s: float | None = None,
    block: int = BLOCK,
    reference: Callable[[], object] | None = None,
) -> Latency:
    """Time ``fn`` by the protocol of this module; ``runs`` caps the timed runs once ``min_s``
    (default ``MIN_S``) seconds of timed blocks are done, ``max_s`` caps the seconds; ``warmup``
    and ``warmup_s`` are the least warm-up runs and seconds. With ``reference``, every block
    of ``fn`` is paired with a block of ``reference`` (see the module's docstring)."""
    if runs < 1:
        raise UsageError(f"runs must be >= 1 timed runs; got {runs}")
    min_s = MIN_S if min_s is None else min_s
    warmup_s = WARMUP_S if warmup_s is None else warmup_s
    if not 0 <= min_s <= max_s:
        raise UsageError(f"min_s must be within 0 and max_s ({max_s:g} s); got {min_s:g}")
    t0 = time.perf_counter()
    fn()
    cold = (time.perf_counter() - t0) * 1e3
    per_run = _warm(fn, warmup, warmup_s)
    ref_block = 0
    if reference is not None:
        ref_ms = _warm(reference, warmup, warmup_s)  # warmed as long as the candidate
        ref_block = max(3, min(BLOCK, round(block * per_run / max(ref_ms, 1e-6))))
    samples: list[float] = []
    medians: list[float] = []
    ref_samples: list[float] = []
    ratios: list[float] = []
    began = time.perf_counter()
    enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            left = runs - len(samples) if min_s == 0 else block  # past runs only while < min_s
            chunk = _block(fn, max(1, min(block, left)))
            samples += chunk
            medians.append(statistics.median(chunk))
            if reference is not None:
                ref_chunk = _block(reference, ref_block)
                ref_samples += ref_chunk
                ratios.append(medians[-1] / statistics.median(ref_chunk))
            elapsed = time.perf_counter() - began
            if elapsed > max_s:
                break
            if elapsed < min_s:
                continue
            if len(samples) >= runs:
                break
            med = statistics.median(samples)
            lo, hi = median_ci(samples)
            if len(medians) >= MIN_BLOCKS and (hi - lo) / 2 <= CI_TARGET * med:
                break
    finally:
        if enabled:
            gc.enable()
    med = statistics.median(samples)
    lo, hi = median_ci(samples)
    q1, q3 = (float(v) for v in np.percentile(samples, [25, 75]))
    noise = []
    if len(medians) >= 2:
        spread = statistics.pstdev(medians) / statistics.mean(medians)
        if spread > NOISY_SPREAD:
            noise.append(f"block medians spread {spread:.1%} (> {NOISY_SPREAD:.0%})")
        drift = (medians[-1] - medians[0]) / medians[0]
        if abs(drift) > NOISY_DRIFT:
            noise.append(f"drift {drift:+.1%} from the first to the last block")
    device = host_identity()
    load = _load_reason(int(device["cores"]))
    if load:
        noise.append(load)
    return Latency(
        median_ms=med,
        p90_ms=float(np.percentile(samples, 90)),
        runs=len(samples),
        backend=backend,
        iqr_ms=q3 - q1,
        ci_low_ms=lo,
        ci_high_ms=hi,
        cold_ms=cold,
        blocks=medians,
        noisy=bool(noise),
        noise=noise,
        device=device,
        reference_ms=statistics.median(ref_samples) if ref_samples else 0.0,
        ratio=statistics.median(ratios) if ratios else 0.0,
    )


def _block(fn: Callable[[], object], n: int) -> list[float]:
    """``n`` timed runs of ``fn`` (milliseconds each)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _warm(fn: Callable[[], object], runs: int, seconds: float) -> float:
    """Run ``fn`` at least ``runs`` times and ``seconds``; return its mean time per run (ms)."""
    start, done = time.perf_counter(), 0
    while done < runs or time.perf_counter() - start < seconds:
        fn()
        done += 1
    return (time.perf_counter() - start) * 1e3 / max(done, 1)


@contextlib.contextmanager
def host_lock():
    """Hold this host's measurement lock (``flock`` on a file in the temp folder): workers,
    agents and tests on one machine never time two files at once. A no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    import tempfile

    path = Path(tempfile.gettempdir()) / f"autoslim-latency-{os.getuid()}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LatencyBackend(Protocol):
    """Times artifacts of one kind (``kind``: ``onnx`` or ``pte``) on one runtime."""

    name: str
    kind: str

    def available(self) -> bool: ...

    def version(self) -> str: ...

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        reference: Path | None = None,
    ) -> Latency: ...


class LocalBackend:
    """A backend that times on this host: subclasses give ``_runner`` (one batch-1 inference
    of a file, its session made once) and share the protocol and the host lock here."""

    name: str
    kind: str

    def _runner(self, artifact: Path, input_shape: tuple[int, ...]) -> Callable[[], object]:
        raise NotImplementedError

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        reference: Path | None = None,
    ) -> Latency:
        """Time ``artifact`` by the protocol; with ``reference``, paired with that file. One
        measurement at a time per host (:func:`host_lock`), whichever process asks."""
        run = self._runner(artifact, input_shape)
        ref = self._runner(reference, input_shape) if reference is not None else None
        with host_lock():
            return time_runs(run, backend=self.name, runs=runs, warmup=warmup, reference=ref)
