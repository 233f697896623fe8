"""The backend registry and side-by-side timing of files."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .latency import RUNTIMES, Latency, LatencyBackend
from .ort import OrtBackend, ort_session


def _openvino() -> LatencyBackend:
    from .openvino import OpenVinoBackend

    return OpenVinoBackend("CPU")


def _executorch() -> LatencyBackend:
    from .executorch import ExecutorchBackend

    return ExecutorchBackend()


_BACKENDS: dict[str, Callable[[], LatencyBackend]] = {
    "onnxruntime-cpu": lambda: OrtBackend("CPUExecutionProvider"),
    "onnxruntime-cuda": lambda: OrtBackend("CUDAExecutionProvider"),
    "openvino-cpu": _openvino,
    "executorch-xnnpack": _executorch,
}
# what each runtime needs where it is missing
_NEEDS = {
    "onnxruntime-cuda": "onnxruntime-gpu and an NVIDIA GPU",
    "openvino-cpu": "the openvino package: pip install 'autoslim[openvino]'",
    "executorch-xnnpack": "the executorch package: pip install 'autoslim[executorch]'",
}
# the artifact kind of each kind's file suffix
KINDS = {"onnx": ".onnx", "pte": ".pte"}


assert tuple(sorted(_BACKENDS)) == RUNTIMES  # one list of names (latency.RUNTIMES)


def list_backends() -> list[str]:
    """Local backend names (a device agent is ``remote:HOST:PORT[/RUNTIME]``)."""
    return sorted(_BACKENDS)


def available_runtimes() -> dict[str, str]:
    """The local runtimes this machine can time on, each with its version."""
    out = {}
    for name in list_backends():
        backend = _BACKENDS[name]()
        if backend.available():
            out[name] = backend.version()
    return out


def runtime_of(name: str) -> str:
    """The runtime a backend name times on: itself, or a remote one's ``/RUNTIME`` (default
    onnxruntime-cpu)."""
    if name.startswith("remote:"):
        _, _, runtime = name.partition("/")
        return runtime or "onnxruntime-cpu"
    return name


def backend_kind(name: str) -> str:
    """The artifact kind (``onnx`` or ``pte``) the backend ``name`` runs."""
    return "pte" if runtime_of(name) == "executorch-xnnpack" else "onnx"


def artifact_kind(path: str | Path) -> str:
    """``pte`` for an ExecuTorch program, else ``onnx`` (by the file's first bytes; a missing
    or unreadable file by its suffix)."""
    from .executorch import is_pte

    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return "pte" if Path(path).suffix == ".pte" else "onnx"
    return "pte" if is_pte(head) else "onnx"


def check_kind(path: str | Path, backend: str) -> None:
    """Refuse, in one line, a file of another kind than the backend runs."""
    want, got = backend_kind(backend), artifact_kind(path)
    if want != got:
        label = {"onnx": "an ONNX file", "pte": "an ExecuTorch .pte program"}
        fits = "executorch-xnnpack" if got == "pte" else "onnxruntime-cpu or openvino-cpu"
        raise UsageError(
            f"{Path(path).name} is {label[got]}, but backend {backend} runs {label[want]}; "
            f"time it on {fits}, or export the trial for {runtime_of(backend)} "
            f"(`autoslim export ... --backend {runtime_of(backend)}`)"
        )


def get_backend(
    name: str = "onnxruntime-cpu", *, secret_file: str | Path | None = None
) -> LatencyBackend:
    """The latency backend ``name``: a local one, or ``remote:HOST:PORT[/RUNTIME]`` (a device
    agent timing on RUNTIME, default onnxruntime-cpu, signed with the secret in
    ``secret_file``, else ``$AUTOSLIM_AGENT_SECRET``'s file)."""
    if name.startswith("remote:"):
        from .remote import RemoteBackend

        return RemoteBackend.from_name(name, secret_file=secret_file)
    if name not in _BACKENDS:
        raise UsageError(
            f"unknown latency backend {name!r}; expected one of {list_backends()} or "
            "remote:HOST:PORT[/RUNTIME] (a device agent)"
        )
    backend = _BACKENDS[name]()
    if not backend.available():
        raise UsageError(
            f"latency backend {name!r} is not available on this machine (it needs "
            f"{_NEEDS.get(name, 'its runtime')}); or use onnxruntime-cpu"
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
    or ``given`` in its place; either way the file must be one ONNX Runtime loads (or an
    ExecuTorch program, whose method declares its input)."""
    if artifact_kind(path) == "pte":
        from .executorch import pte_input_shape

        shape: list = list(pte_input_shape(path))
    else:
        try:
            shape = ort_session(path).get_inputs()[0].shape
        except Exception as e:  # noqa: BLE001 - ORT's load errors have no common type
            raise UsageError(
                f"{path} is not an ONNX model ONNX Runtime can load "
                f"({' '.join(str(e).split())[:200]}); give the .onnx file that `autoslim export` "
                "wrote"
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
    """Time artifact files (ONNX, or .pte on executorch-xnnpack) side by side on one backend: ``rounds`` rounds, each timing every
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
    for f in unique.values():
        check_kind(f, backend)
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
