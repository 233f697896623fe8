"""Latency of the artifact file: one measurement protocol for every backend, local or remote.

Imports numpy and onnxruntime only (never torch or optuna), so a device agent installs it alone.

Protocol (what ONNX Runtime's perf test, TFLite's ``benchmark_model`` and MLPerf LoadGen
report): the first, cold run is timed apart; warm-up of ``warmup`` runs and at least
``WARMUP_S``; then timed blocks of ``BLOCK`` runs with the garbage collector off, for at least
``MIN_S`` seconds and then until the 95% confidence interval of the median (distribution-free,
from order statistics) is within ``+-CI_TARGET`` of it, or ``runs`` timed runs, or ``MAX_S``
seconds. ``MIN_S`` (default 2 s; ``$AUTOSLIM_LATENCY_MIN_S``) is there because a shared machine
runs in regimes of seconds: on the 2-vCPU machine of BENCHMARKS.md one 0.4 ms file timed
for 0.2 s windows, paired with the teacher, gave ratios 1.45x apart (max/min of 6), for 3 s
windows 1.14x; a short measurement lands wholly in one regime. Reported: n, median, p90,
IQR, the CI, the cold run, the block medians, and ``noisy`` with its reasons (block medians
spread > 5%, first-vs-last block drift > 5%, a loaded machine).

Paired with a reference (``reference=`` the teacher's file): each timed block of the candidate
is followed by a block of the reference of about the same wall time, and ``ratio`` is the
median of the block-pair ratios. A shared machine has spells of seconds in which everything
runs slower (up to 40% on the 2-vCPU machine of BENCHMARKS.md, on either core); both files of a
pair run in the same spell, so the ratio is steady where either time alone is not.
"""

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

__all__ = [
    "Latency",
    "LatencyBackend",
    "OrtBackend",
    "get_backend",
    "list_backends",
    "host_identity",
    "time_runs",
    "ort_session",
    "FileTiming",
    "time_files",
]

WARMUP_S = 0.5  # warm-up lasts at least this long (caches, frequency ramp, ORT's arenas)
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
    warmup_s: float = WARMUP_S,
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
    if not 0 <= min_s <= max_s:
        raise UsageError(f"min_s must be within 0 and max_s ({max_s:g} s); got {min_s:g}")
    t0 = time.perf_counter()
    fn()
    cold = (time.perf_counter() - t0) * 1e3
    per_run = _warm(fn, warmup, warmup_s)
    ref_block = 0
    if reference is not None:
        ref_ms = _warm(reference, min(warmup, 5), warmup_s / 2)
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


OPTIMIZATIONS = ("all", "extended", "basic", "disabled")  # ONNX Runtime graph optimisation levels


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


def ort_session(
    path: str | Path,
    *,
    threads: int = 1,
    providers: list[str] | None = None,
    optimization: str = "all",
):
    """An ONNX Runtime session on the artifact (1 thread by default: deployable latency).

    ``optimization``: the graph optimisation level; below ``extended`` ONNX Runtime does not
    fuse QuantizeLinear/DequantizeLinear pairs into its int8 kernels, so an int8 file runs as
    fp32 compute plus conversions: what a runtime or chip without int8 kernels does."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATIONS:
        raise UsageError(f"optimization must be one of {OPTIMIZATIONS}; got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


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
        reference: Path | None = None,
    ) -> Latency: ...


class OrtBackend:
    """ONNX Runtime on the artifact file, batch 1, ``threads`` intra-op threads.

    On CUDA the input and output live on the device through IO binding, so the timed run is
    the model, not host/device copies."""

    def __init__(
        self, provider: str = "CPUExecutionProvider", threads: int = 1, optimization: str = "all"
    ) -> None:
        self.provider, self.threads, self.optimization = provider, threads, optimization
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
        reference: Path | None = None,
    ) -> Latency:
        """Time ``artifact`` by the protocol; with ``reference``, paired with that file. One
        measurement at a time per host (:func:`host_lock`), whichever process asks."""
        run = self._runner(artifact, input_shape)
        ref = self._runner(reference, input_shape) if reference is not None else None
        with host_lock():
            return time_runs(run, backend=self.name, runs=runs, warmup=warmup, reference=ref)

    def _runner(self, artifact: Path, input_shape: tuple[int, ...]) -> Callable[[], None]:
        """One batch-1 inference of ``artifact`` (a session made once, the input bound)."""
        sess = ort_session(
            artifact,
            threads=self.threads,
            providers=[self.provider],
            optimization=self.optimization,
        )
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        if self.provider.startswith("CUDA"):
            import onnxruntime as ort

            binding = sess.io_binding()
            binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            for out in sess.get_outputs():
                binding.bind_output(out.name, "cuda", 0)

            def run() -> None:
                sess.run_with_iobinding(binding)
                binding.synchronize_outputs()

            return run

        def run() -> None:
            sess.run(None, {inp.name: x})

        return run


_BACKENDS = {
    "onnxruntime-cpu": lambda: OrtBackend("CPUExecutionProvider"),
    "onnxruntime-cuda": lambda: OrtBackend("CUDAExecutionProvider"),
}


def list_backends() -> list[str]:
    """Local backend names (a device agent is ``remote:HOST:PORT``)."""
    return sorted(_BACKENDS)


def get_backend(
    name: str = "onnxruntime-cpu", *, secret_file: str | Path | None = None
) -> LatencyBackend:
    """The latency backend ``name``: a local one, or ``remote:HOST:PORT`` (a device agent,
    signed with the secret in ``secret_file``, else ``$AUTOSLIM_AGENT_SECRET``'s file)."""
    if name.startswith("remote:"):
        from .remote import RemoteBackend

        return RemoteBackend.from_name(name, secret_file=secret_file)
    if name not in _BACKENDS:
        raise UsageError(
            f"unknown latency backend {name!r}; expected one of {list_backends()} or "
            "remote:HOST:PORT (a device agent)"
        )
    backend = _BACKENDS[name]()
    if not backend.available():
        raise UsageError(
            f"latency backend {name!r} is not available on this machine "
            "(onnxruntime-cuda needs onnxruntime-gpu and a GPU); use onnxruntime-cpu"
        )
    return backend


@dataclass(frozen=True)
class FileTiming:
    """One file timed side by side with others by :func:`time_files`."""

    path: Path
    size_bytes: int
    sha256: str
    median_ms: float  # median of the rounds' medians
    ratio: float  # median_ms / the first file's median_ms
    rounds: list[Latency]  # each round's measurement, in order

    @property
    def noisy(self) -> bool:
        return any(r.noisy for r in self.rounds)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "median_ms": self.median_ms,
            "ratio": self.ratio,
            "noisy": self.noisy,
            "rounds": [r.to_dict() for r in self.rounds],
        }


def file_input_shape(path: Path, given: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The per-image input shape (``C, H, W``) an ONNX file declares, batch dimension left out,
    or ``given`` in its place; either way the file must be one ONNX Runtime loads."""
    try:
        shape = ort_session(path).get_inputs()[0].shape
    except Exception as e:  # noqa: BLE001 - ORT's load errors have no common type
        raise UsageError(
            f"{path} is not an ONNX model ONNX Runtime can load ({' '.join(str(e).split())[:200]})"
            "; give the .onnx file that `autoslim export` wrote"
        ) from e
    if given:
        fixed = shape[1:]
        if len(given) != len(fixed) or any(
            isinstance(d, int) and d > 0 and d != g for d, g in zip(fixed, given, strict=False)
        ):
            declared = ",".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in fixed)
            raise UsageError(
                f"--input-shape {','.join(map(str, given))} does not fit {path}, whose input "
                f"takes C,H,W = {declared} ('?': any); give a shape that fits it, or leave "
                "--input-shape out to use the one the file declares"
            )
        return tuple(given)
    dims = shape[1:]
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise UsageError(
            f"{path}'s input has no fixed per-image shape (got {shape}); give it with "
            "--input-shape C,H,W"
        )
    return tuple(dims)


def time_files(
    paths: list[str | Path],
    *,
    backend: str = "onnxruntime-cpu",
    secret_file: str | Path | None = None,
    rounds: int = 5,
    runs: int = 200,
    input_shape: tuple[int, ...] | None = None,
) -> list[FileTiming]:
    """Time ONNX files side by side on one backend: ``rounds`` rounds, each timing every
    distinct file once by the protocol, in the given order; each file's number is the median of
    its rounds' medians, its ratio that over the first file's (say, the fp32 teacher's).
    Interleaving puts every file through the same spells of a shared machine; byte-identical
    files are timed once per round and share their numbers. ``input_shape`` (``C, H, W``):
    default, the one each file declares."""
    import hashlib

    if not paths:
        raise UsageError("time_files needs at least one ONNX file; got none")
    if rounds < 1:
        raise UsageError(f"rounds must be >= 1; got {rounds}")
    files = [Path(p) for p in paths]
    for f in files:
        if f.is_dir():
            raise UsageError(f"{f} is a folder; expected the path of an ONNX file in it")
        if f.exists() and not f.is_file():
            raise UsageError(f"{f} is not a regular file; expected the path of an ONNX file")
        if not f.is_file():
            raise UsageError(f"no such file {f}; give the path of an ONNX file")
    digest = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    unique = {d: files[digest.index(d)] for d in dict.fromkeys(digest)}  # one file per content
    shape = {d: file_input_shape(f, input_shape) for d, f in unique.items()}
    meter = get_backend(backend, secret_file=secret_file)
    got: dict[str, list[Latency]] = {d: [] for d in unique}
    for _ in range(rounds):
        for d, f in unique.items():
            got[d].append(meter.measure(f, input_shape=shape[d], runs=runs))
    med = {d: statistics.median(r.median_ms for r in got[d]) for d in unique}
    first = med[digest[0]]
    return [
        FileTiming(
            path=f,
            size_bytes=f.stat().st_size,
            sha256=d,
            median_ms=med[d],
            ratio=med[d] / first,
            rounds=got[d],
        )
        for f, d in zip(files, digest, strict=True)
    ]
