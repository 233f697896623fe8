"""ONNX Runtime: sessions and the local backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .latency import LocalBackend

OPTIMIZATIONS = ("all", "extended", "basic", "disabled")  # ONNX Runtime graph optimisation levels


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


class OrtBackend(LocalBackend):
    """ONNX Runtime on the artifact file, batch 1, ``threads`` intra-op threads.

    On CUDA the input and output live on the device through IO binding, so the timed run is
    the model, not host/device copies."""

    kind = "onnx"  # the artifact it runs

    def __init__(
        self, provider: str = "CPUExecutionProvider", threads: int = 1, optimization: str = "all"
    ) -> None:
        self.provider, self.threads, self.optimization = provider, threads, optimization
        self.name = "onnxruntime-cuda" if provider.startswith("CUDA") else "onnxruntime-cpu"

    def available(self) -> bool:
        import onnxruntime as ort

        return self.provider in ort.get_available_providers()

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

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
