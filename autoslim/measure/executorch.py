"""ExecuTorch with the XNNPACK delegate: ``.pte`` programs (``autoslim[executorch]``).

ExecuTorch's Python runtime takes and returns torch tensors (its bindings link against torch),
so this backend is the one part of the measuring side that loads torch: an agent that times
``.pte`` programs needs torch beside it. The import-linter contract names this exception."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .latency import LocalBackend

EXTRA = "executorch"  # pip install 'autoslim[executorch]'
MAGIC = b"ET"  # a .pte flatbuffer's file identifier (bytes 4-5: "ET12", ...)


def executorch_version() -> str | None:
    """The installed ExecuTorch's version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        return None


def is_pte(head: bytes) -> bool:
    """Whether a file's first bytes are those of an ExecuTorch program."""
    return len(head) >= 8 and head[4:6] == MAGIC


def _quiet() -> None:
    """ExecuTorch's runtime logs CPU probing to stderr at load; keep the one-line contract."""
    import logging

    # torchao (which ExecuTorch imports) warns through torch's pytree logger at import time
    for name in ("executorch", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _no_native_stderr():
    """The runtime's C++ side prints CPU probing lines to file descriptor 2 when it starts;
    keep them off the terminal (Python exceptions still carry any failure)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_method(path: str | Path, *, threads: int = 1):
    """The ``forward`` method of the program at ``path``, ready to execute."""
    _quiet()
    try:
        with _no_native_stderr():
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(str(path))
            return program.load_method("forward")
    except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError and others
        raise UsageError(
            f"{path} is not an ExecuTorch program this runtime loads ({' '.join(str(e).split())[:160]}); "
            "give the .pte file that `autoslim export` wrote for executorch-xnnpack"
        ) from e


def pte_input_shape(path: str | Path) -> tuple[int, ...]:
    """The input shape (batch included) a ``.pte`` program was exported for."""
    meta = load_method(path).metadata.input_tensor_meta(0)
    return tuple(int(d) for d in meta.sizes())


def pte_outputs(path: str | Path, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The program's first output on each batch of images, one image per execution (the
    program's batch is the deployed one, 1)."""
    import torch

    method = load_method(path)
    for xb in batches:
        outs = [
            method.execute([torch.from_numpy(np.ascontiguousarray(xb[i : i + 1], np.float32))])[0]
            for i in range(len(xb))
        ]
        yield torch.cat(outs).numpy()


class ExecutorchBackend(LocalBackend):
    """ExecuTorch's runtime on a ``.pte`` program (XNNPACK delegate inside), batch 1."""

    kind = "pte"  # the artifact it runs
    name = "executorch-xnnpack"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def available(self) -> bool:
        """Installed (found without importing it: its runtime loads torch)."""
        import importlib.util

        return executorch_version() is not None and (
            importlib.util.find_spec("executorch.runtime") is not None
        )

    def version(self) -> str:
        return f"executorch {executorch_version()}"

    def _runner(self, artifact: Path, input_shape: tuple[int, ...]) -> Callable[[], None]:
        import torch

        torch.set_num_threads(self.threads)
        method = load_method(artifact)
        x = [
            torch.from_numpy(
                np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
            )
        ]

        def run() -> None:
            method.execute(x)

        return run
