"""Every installed runtime through one contract: ONNX Runtime, OpenVINO (the same ONNX file) and
ExecuTorch with XNNPACK (a .pte program); artifacts of the wrong kind are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autoslim import UsageError
from autoslim.artifact import artifact_accuracy, runtime_agreement
from autoslim.config import CompressionConfig, LayerConfig
from autoslim.errors import ExportError
from autoslim.measure import Latency, get_backend, list_backends
from autoslim.measure.backends import artifact_kind, available_runtimes, time_files
from autoslim.passes.distill import Recovery
from autoslim.pipeline import compress, export, export_float
from autoslim.teacher import evaluate_accuracy, predictions

RUNTIMES = ["onnxruntime-cpu", "openvino-cpu", "executorch-xnnpack"]


def _kind(runtime: str) -> str:
    return "pte" if runtime == "executorch-xnnpack" else "onnx"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_teacher, fmnist) -> dict[str, Path]:
    """The trained TinyNet as fp32 and uniform-int8 artifacts of both kinds (int8 gated)."""
    base = tmp_path_factory.mktemp("runtimes")
    int8 = CompressionConfig.uniform(weight_bits=8, act_bits=8)
    c = compress(
        tiny_teacher.model,
        int8,
        data=fmnist,
        recovery=Recovery(steps=0, bn_batches=2),
        classifier="fc",
    )
    out = {}
    for kind in ("onnx", "pte"):
        example = torch.zeros(1, *fmnist.input_shape)
        out[f"fp32.{kind}"] = export_float(
            tiny_teacher.model, base / f"fp32.{kind}", example=example, kind=kind
        ).path
        out[f"int8.{kind}"] = export(
            c, base / f"int8.{kind}", check=fmnist.val.subset(300), min_agreement=0.95, kind=kind
        ).path
    out["compressed"] = c  # type: ignore[assignment]
    return out


@pytest.mark.parametrize("name", RUNTIMES)
def test_every_runtime_keeps_the_backend_contract(name: str, files, fmnist) -> None:
    if name not in available_runtimes():
        pytest.skip(f"{name} is not installed here")
    backend = get_backend(name)
    assert (
        backend.name == name
        and backend.kind == _kind(name)
        and name.split("-")[0] in backend.version()
    )
    fp32, int8 = files[f"fp32.{backend.kind}"], files[f"int8.{backend.kind}"]
    lat = backend.measure(int8, input_shape=fmnist.input_shape, runs=7, warmup=2, reference=fp32)
    assert isinstance(lat, Latency) and lat.backend == name
    assert 0 < lat.median_ms <= lat.p90_ms and lat.ci_low_ms <= lat.median_ms <= lat.ci_high_ms
    assert lat.reference_ms > 0 and lat.ratio > 0  # paired with the reference, block by block
    assert Latency.from_dict(lat.to_dict()) == lat


def test_the_registry_names_each_runtime_and_what_a_missing_one_needs(monkeypatch) -> None:
    assert set(RUNTIMES) <= set(list_backends())
    from autoslim.measure import openvino

    monkeypatch.setattr(openvino, "openvino_version", lambda: None)
    with pytest.raises(UsageError, match=r"openvino-cpu.*not available.*autoslim\[openvino\]") as e:
        get_backend("openvino-cpu")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_openvino_runs_the_onnx_file_as_onnx_runtime_does(files, fmnist) -> None:
    """The same file: fp32 outputs equal to float rounding; the int8 file's predictions agree
    (what the search's runtime gate checks before timing a candidate on OpenVINO)."""
    import numpy as np

    from autoslim.artifact import onnx_outputs
    from autoslim.measure.openvino import openvino_outputs
    from autoslim.measure.ort import ort_session

    if "openvino-cpu" not in available_runtimes():
        pytest.skip("openvino is not installed here")
    x = fmnist.val.subset(64).x.float()
    ov = next(openvino_outputs(files["fp32.onnx"], [x.numpy()]))
    ort = next(onnx_outputs(ort_session(files["fp32.onnx"]), x, 64)).numpy()
    assert np.abs(ov - ort).max() < 1e-3 * max(1.0, np.abs(ort).max())
    gate = fmnist.val.subset(300)
    assert runtime_agreement(files["int8.onnx"], gate, runtime="openvino-cpu") >= 0.95
    assert runtime_agreement(files["int8.onnx"], gate, runtime="onnxruntime-cpu") == 1.0


def test_the_pte_program_is_the_model_and_int8_shrinks_it(files, tiny_teacher, fmnist) -> None:
    """The fp32 program scores what the PyTorch model scores; the int8 one holds a byte per
    weight instead of four and agrees with the quantization-trained model (the export gate held)."""
    if "executorch-xnnpack" not in available_runtimes():
        pytest.skip("executorch is not installed here")
    split = fmnist.val.subset(300)
    assert artifact_kind(files["fp32.pte"]) == "pte" and artifact_kind(files["fp32.onnx"]) == "onnx"
    acc, pred = artifact_accuracy(files["fp32.pte"], split)
    assert pred.shape == (300,)
    assert acc == pytest.approx(evaluate_accuracy(tiny_teacher.model, split))
    params = sum(p.numel() for p in tiny_teacher.model.parameters())
    saved = files["fp32.pte"].stat().st_size - files["int8.pte"].stat().st_size
    assert saved > 2 * params  # of the 4 bytes of each fp32 weight, 1 is left (and scales)
    _, pred8 = artifact_accuracy(files["int8.pte"], split)
    ref = predictions(files["compressed"].model, split)
    assert float((pred8 == ref).float().mean()) >= 0.95


@pytest.mark.parametrize(
    "layer_bits, act_bits, says",
    [(4, 8, "int4 weights"), (8, 32, "with 32-bit activations"), (16, 32, "fp16 weights")],
)
def test_a_precision_xnnpack_does_not_run_is_refused_naming_the_layer(
    layer_bits, act_bits, says, tiny_teacher, fmnist, tmp_path
) -> None:
    from autoslim.pte import export_pte

    if "executorch-xnnpack" not in available_runtimes():
        pytest.skip("executorch is not installed here")
    cfg = CompressionConfig(layers={"fc": LayerConfig(layer_bits, act_bits)})
    with pytest.raises(ExportError, match=rf"layer fc asks .*{says}.*executorch-xnnpack") as e:
        export_pte(
            copy.deepcopy(tiny_teacher.model), tmp_path / "m.pte",
            example=torch.zeros(1, *fmnist.input_shape), config=cfg,
        )  # fmt: skip
    assert "\n" not in str(e.value) and not (tmp_path / "m.pte").exists()


def test_an_artifact_of_the_wrong_kind_is_one_line(files) -> None:
    if "executorch-xnnpack" not in available_runtimes():
        pytest.skip("executorch is not installed here")
    with pytest.raises(
        UsageError,
        match=r"fp32.onnx is an ONNX file, but backend executorch-xnnpack runs an ExecuTorch .pte program",
    ) as e:
        time_files([files["fp32.onnx"]], backend="executorch-xnnpack", rounds=1, runs=3)
    assert e.value.exit_code == 2
    with pytest.raises(
        UsageError,
        match=r"fp32.pte is an ExecuTorch .pte program, but backend onnxruntime-cpu runs an ONNX file",
    ):
        time_files([files["fp32.pte"]], backend="onnxruntime-cpu", rounds=1, runs=3)


def test_measure_times_pte_programs_side_by_side(files) -> None:
    if "executorch-xnnpack" not in available_runtimes():
        pytest.skip("executorch is not installed here")
    got = time_files(
        [files["fp32.pte"], files["int8.pte"]], backend="executorch-xnnpack", rounds=2, runs=20
    )
    assert got[0].ratio == 1.0 and got[1].ratio > 0
    assert got[1].size_bytes == files["int8.pte"].stat().st_size
