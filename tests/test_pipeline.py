"""The public verbs: ``compress`` (passes + recovery) and ``export`` (artifact + correctness gate)."""

from __future__ import annotations

import pytest
import torch
from conftest import TESTS_DIR

from autoslim import (
    CompressionConfig,
    DistillConfig,
    ExportError,
    LayerConfig,
    Recovery,
    build_model,
    compress,
    export,
)
from autoslim.artifact import agreement, onnx_predict, ort_session
from autoslim.passes.distill import kd_loss
from autoslim.passes.quantize import FakeQuantLayer
from autoslim.teacher import evaluate_accuracy, predict


def test_compress_and_export_record_agreement(resnet_artifact, resnet18, fmnist) -> None:
    b = resnet_artifact(0.3, 8, 8)  # 30% pruning, int8 weights and activations, no training
    c, result = b.compressed, b.result
    reports = c.report_dict()
    assert len(reports["prune"]["touched"]) == 12  # every channel group of ResNet-18
    assert len(reports["quantize"]["touched"]) == 21
    # every tensor the file quantises has a trained range: each layer's input, each conv's
    # output (after its ReLU), each of the 8 residual adds' output
    layers = {t["layer"] for t in reports["quantize"]["touched"]}
    keys = set(c.act_ranges)
    assert {k.rpartition(":")[0] for k in keys if k.endswith(":in")} == layers
    convs = layers - {"fc"}
    assert {k.rpartition(":")[0] for k in keys if k.endswith((":out", ":act"))} >= convs
    assert len([k for k in keys if k.startswith("add(")]) == 8
    assert all(lo <= hi for lo, hi in c.act_ranges.values())
    assert set(result.tensors) == keys  # each found in the ONNX graph
    assert result.path.is_file()
    # The recorded agreement is the share of equal top-1 predictions, file vs PyTorch model.
    check = fmnist.val.subset(200)
    ours = onnx_predict(ort_session(result.path), check.x).argmax(1)
    ref = predict(c.model, check.x).argmax(1)
    assert result.agreement == pytest.approx(agreement(ours, ref))
    assert 0.5 <= result.agreement <= 1.0
    # The caller's model is left alone: compress works on a copy.
    assert resnet18.conv1.out_channels == 64 and isinstance(resnet18.fc, torch.nn.Linear)
    assert not any(isinstance(m, FakeQuantLayer) for m in resnet18.modules())


def test_identity_config_returns_the_same_function(tiny_teacher, fmnist) -> None:
    c = compress(tiny_teacher.model, CompressionConfig(), data=fmnist, recovery=Recovery(steps=5))
    x = fmnist.val.x[:64]
    assert torch.allclose(predict(c.model, x), predict(tiny_teacher.model, x), atol=1e-6)
    assert c.recovery_loss != c.recovery_loss  # NaN: nothing to recover, no training ran
    assert c.model is not tiny_teacher.model


def test_correctness_gate_refuses_and_leaves_no_file(tiny_teacher, fmnist, tmp_path) -> None:
    c = compress(
        tiny_teacher.model,
        CompressionConfig.uniform(weight_bits=8),
        data=fmnist,
        recovery=Recovery(steps=0),
    )
    out = tmp_path / "deploy" / "model.onnx"
    with pytest.raises(ExportError, match="correctness gate") as e:
        export(c, out, check=fmnist.val.subset(100), min_agreement=1.01)
    assert "of 100 images" in str(e.value)
    assert e.value.exit_code == 1
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary export directory either


def test_the_default_gate_refuses_a_file_that_diverges_and_names_the_tensor(
    tiny_teacher, fmnist, tmp_path
) -> None:
    """A file whose int8 scale of one activation is not the one training simulated (here 50x
    too small: it clips): the default gate (99%) refuses it, names that tensor as the first
    that diverges, and leaves no file. The same compression exported faithfully passes."""
    import dataclasses

    c = compress(
        tiny_teacher.model,
        CompressionConfig.uniform(weight_bits=8, act_bits=8),
        data=fmnist,
        recovery=Recovery(steps=0),
    )
    check = fmnist.val.subset(200)
    good = export(c, tmp_path / "good.onnx", check=check)  # the default gate
    assert good.agreement >= 0.99
    key = "conv2:act"  # the second conv's (ReLU'd) output
    lo, hi = c.act_ranges[key]
    broken = dataclasses.replace(c, act_ranges={**c.act_ranges, key: [lo / 50, hi / 50]})
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="correctness gate") as e:
        export(broken, out, check=check)
    assert "need >= 99.0%" in str(e.value)
    assert "first diverging tensor: conv2:act" in str(e.value), str(e.value)
    assert not out.exists()


def test_recovery_lowers_the_distillation_loss(tiny_teacher, fmnist) -> None:
    """A few KD steps after pruning bring the student back towards the teacher."""
    cfg = CompressionConfig(prune={"conv2": 0.5})  # 32 -> 16 channels
    students = {
        steps: compress(
            tiny_teacher.model,
            cfg,
            data=fmnist,
            recovery=Recovery(steps=steps, batch_size=32, subset=512),
        )
        for steps in (0, 30)
    }
    assert students[30].model.conv2.out_channels == 16
    sub = fmnist.train.subset(512)
    target = predict(tiny_teacher.model, sub.x)

    def loss(c) -> float:
        return float(kd_loss(predict(c.model, sub.x), target, sub.y, cfg.distill))

    assert loss(students[30]) < 0.6 * loss(students[0])
    assert evaluate_accuracy(students[30].model, fmnist.val) > evaluate_accuracy(
        students[0].model, fmnist.val
    )
    assert students[30].recovery_loss == pytest.approx(loss(students[30]), rel=0.5)


def test_recovery_distills_from_the_teacher_as_it_is_now(fmnist) -> None:
    """Compressing the same model object again after changing its weights must distil towards
    the new weights, not towards logits remembered from the earlier call.

    The model has no batch norm, so an uncompressed-structure student is an exact copy of the
    teacher and its pure-KD loss (alpha=1) on the first batch is 0."""
    torch.manual_seed(0)
    model = build_model(f"{TESTS_DIR / 'tiny_models.py'}:linear")
    cfg = CompressionConfig(default=LayerConfig(weight_bits=16), distill=DistillConfig(alpha=1.0))
    rec = Recovery(steps=1, batch_size=32, subset=64)
    assert compress(model, cfg, data=fmnist, recovery=rec).recovery_loss == pytest.approx(
        0.0, abs=1e-5
    )
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # e.g. the user fine-tuned the model further
    again = compress(model, cfg, data=fmnist, recovery=rec)
    assert again.recovery_loss == pytest.approx(0.0, abs=1e-5)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augment", [False, True], ids=["cached-logits", "augmented"])
def test_recovery_runs_on_the_training_device(
    tiny_teacher, fmnist, device, augment, monkeypatch
) -> None:
    """KD recovery (float and quantisation-aware) runs on $AUTOSLIM_DEVICE and hands back a
    CPU model that exports with the gate passed; the teacher stays on the CPU too."""
    monkeypatch.setenv("AUTOSLIM_DEVICE", device)
    cfg = CompressionConfig(prune={"conv2": 0.25}, default=LayerConfig(weight_bits=8, act_bits=8))
    rec = Recovery(steps=6, batch_size=32, subset=256, augment=augment)
    c = compress(tiny_teacher.model, cfg, data=fmnist, recovery=rec)
    assert {p.device.type for p in c.model.parameters()} == {"cpu"}
    assert {p.device.type for p in tiny_teacher.model.parameters()} == {"cpu"}
    assert torch.isfinite(torch.tensor(c.recovery_loss))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("tpu", "expected auto, cpu or cuda[:N]")]
    + ([] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA GPU")]),
)
def test_a_bad_training_device_is_one_line(value, expected, monkeypatch) -> None:
    from autoslim import UsageError
    from autoslim.data import train_device

    monkeypatch.setenv("AUTOSLIM_DEVICE", value)
    with pytest.raises(UsageError, match=expected.replace("[", r"\[").replace("]", r"\]")) as e:
        train_device()
    assert "\n" not in str(e.value)
