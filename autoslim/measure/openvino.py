"""OpenVINO: the same ONNX file, compiled and run by OpenVINO's CPU plugin (the ``openvino``
package, ``autoslim[openvino]``). Its low-precision transformations read the file's
QuantizeLinear/DequantizeLinear pairs and run int8 kernels, so the artifact is the ONNX file
autoslim already writes; only the runtime that runs it changes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .latency import LocalBackend

EXTRA = "openvino"  # pip install 'autoslim[openvino]'


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__).split("-")[0]


def compile_onnx(path: str | Path, *, device: str = "CPU", threads: int = 1):
    """``path`` compiled by OpenVINO for ``device``: one stream, ``threads`` inference threads,
    the latency hint (one request at a time: what a deployed batch-1 model does), and float
    layers computed in fp32: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run them
    in bf16 (logits 1% off), a precision the search did not choose and the gate did not see."""
    import openvino as ov

    config = {
        "INFERENCE_NUM_THREADS": int(threads),
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    return ov.Core().compile_model(str(path), device, config)


def openvino_outputs(
    path: str | Path, batches: Iterable[np.ndarray], *, threads: int = 2
) -> Iterator[np.ndarray]:
    """The file's first output on each batch of images, run by OpenVINO on the CPU (a file with
    a fixed batch size is fed one image at a time)."""
    compiled = compile_onnx(path, threads=threads)
    request = compiled.create_infer_request()
    fixed = compiled.inputs[0].get_partial_shape()[0]
    one = fixed.is_static and fixed.get_length() == 1
    for xb in batches:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if one and len(xb) != 1:
            yield np.concatenate(
                [request.infer({0: xb[i : i + 1]})[0].copy() for i in range(len(xb))]
            )
        else:
            yield request.infer({0: xb})[0].copy()


class OpenVinoBackend(LocalBackend):
    """OpenVINO on the ONNX artifact, batch 1, ``threads`` inference threads."""

    kind = "onnx"  # the artifact it runs

    def __init__(self, device: str = "CPU", threads: int = 1) -> None:
        self.device, self.threads = device, threads
        self.name = f"openvino-{device.lower()}"

    def available(self) -> bool:
        if openvino_version() is None:
            return False
        import openvino as ov

        return self.device in ov.Core().available_devices

    def version(self) -> str:
        return f"openvino {openvino_version()}"

    def _runner(self, artifact: Path, input_shape: tuple[int, ...]) -> Callable[[], None]:
        import openvino as ov

        request = compile_onnx(artifact, device=self.device, threads=self.threads)
        request = request.create_infer_request()
        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        request.set_input_tensor(0, ov.Tensor(x))

        def run() -> None:
            request.infer()

        return run
