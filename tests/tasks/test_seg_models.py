"""The built-in segmentation models: shapes, task checks, heads never pruned, and unet_tiny
compressed to int8, exported through the pixel-agreement gate and scored by mIoU."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from autoslim import CompressionConfig, DataSplits, Recovery, compress, export, load_dataset
from autoslim.artifact import (
    artifact_accuracy,
    artifact_predictions,
    artifact_scores,
    export_onnx,
)
from autoslim.errors import ModelError
from autoslim.models import build_model, list_models, model_task, stem_and_classifier
from autoslim.passes.distill import teacher_logits
from autoslim.passes.prune import list_groups, prune_model
from autoslim.tasks import Classification, Segmentation
from autoslim.teacher import predictions

SEG_MODELS = ["unet_tiny", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]
CLASSES, SIDE = 11, 64
TASK = Segmentation(num_classes=CLASSES)
EXAMPLE = (1, 1, SIDE, SIDE)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=CLASSES, image_size=SIDE, task=TASK)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One untrained instance of each, eval mode. Do not mutate: deepcopy it."""
    return {name: _build(name) for name in SEG_MODELS}


def _heads(name: str, model: nn.Module) -> list[str]:
    _, cls = stem_and_classifier(name, model)
    assert cls is not None
    return cls.split(",")


def test_segmentation_models_are_listed_by_task() -> None:
    assert list_models("segmentation") == sorted(SEG_MODELS)
    assert not set(SEG_MODELS) & set(list_models("classification"))
    assert {model_task(n) for n in SEG_MODELS} == {"segmentation"}
    assert model_task("resnet18") == "classification"


@pytest.mark.parametrize("name", SEG_MODELS)
def test_output_is_one_score_per_class_and_pixel(models, name: str) -> None:
    model = models[name]
    with torch.no_grad():
        out = model(torch.randn(2, 1, SIDE, SIDE))
    assert isinstance(out, torch.Tensor)  # not torchvision's {"out": ...}
    assert out.shape == (2, CLASSES, SIDE, SIDE)
    assert TASK.check_output(out, batch=2, num_classes=CLASSES, image_shape=(1, SIDE, SIDE)) is None


@pytest.mark.parametrize("name", SEG_MODELS)
def test_a_segmentation_model_is_refused_for_classification(name: str) -> None:
    for task in (None, Classification()):
        with pytest.raises(ModelError) as e:
            build_model(name, in_channels=1, num_classes=10, image_size=SIDE, task=task)
        msg = str(e.value)
        assert "\n" not in msg
        assert name in msg and "segmentation" in msg and "classification" in msg


def test_a_classifier_is_refused_for_segmentation() -> None:
    with pytest.raises(ModelError) as e:
        build_model("resnet18", in_channels=1, num_classes=CLASSES, image_size=SIDE, task=TASK)
    msg = str(e.value)
    assert "resnet18" in msg and "segmentation" in msg
    assert "unet_tiny" in msg  # the models that fit are named


USER_MODELS = """
import torch
from torch import nn


class Flat(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class Dense(Flat):
    def forward(self, x):
        return self.conv(x)


def flat(num_classes):
    return Flat(num_classes)


def dense(num_classes):
    return Dense(num_classes)
"""


def test_a_user_model_is_checked_against_the_task(tmp_path: Path) -> None:
    f = tmp_path / "seg_user.py"
    f.write_text(USER_MODELS)
    kw = {"in_channels": 1, "num_classes": CLASSES, "image_size": 16}
    model = build_model(f"{f}:dense", task=TASK, **kw)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, CLASSES, 16, 16)
    with pytest.raises(ModelError) as e:
        build_model(f"{f}:flat", task=TASK, **kw)
    assert "one score per class and pixel" in str(e.value)
    with pytest.raises(ModelError) as e:
        build_model(f"{f}:dense", task=Classification(), **kw)
    assert "one score per class" in str(e.value)
    assert build_model(f"{f}:flat", **kw)(torch.zeros(2, 1, 16, 16)).shape == (2, CLASSES)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_stem_and_classifier_exist(models, name: str) -> None:
    model = models[name]
    mods = dict(model.named_modules())
    stem, _ = stem_and_classifier(name, model)
    assert isinstance(mods[stem], nn.Conv2d) and mods[stem].in_channels == 1
    heads = _heads(name, model)
    if name == "lraspp_mobilenet_v3_large":
        assert len(heads) == 2  # LR-ASPP sums a low- and a high-level classifier
    for head in heads:
        assert isinstance(mods[head], nn.Conv2d), head
        assert mods[head].out_channels == CLASSES


@pytest.mark.parametrize("name", SEG_MODELS)
def test_heads_are_never_pruned(models, name: str) -> None:
    model = models[name]
    heads = _heads(name, model)
    cls = ",".join(heads)
    groups = list_groups(model, torch.zeros(EXAMPLE), classifier=cls)
    assert len(groups) > 0
    for g in groups:
        assert not set(g.modules) & set(heads), g
    # pruning every group by half keeps the class scores and the resolution
    pruned = copy.deepcopy(model)
    cfg = CompressionConfig.uniform(prune=0.5, groups=[g.name for g in groups])
    report = prune_model(pruned, cfg, example=torch.zeros(EXAMPLE), classifier=cls)
    assert report.touched
    mods = dict(pruned.named_modules())
    assert all(mods[h].out_channels == CLASSES for h in heads)
    with torch.no_grad():
        assert pruned.eval()(torch.zeros(2, 1, SIDE, SIDE)).shape == (2, CLASSES, SIDE, SIDE)
    params = sum(p.numel() for p in pruned.parameters())
    assert params < 0.6 * sum(p.numel() for p in model.parameters())


# -- unet_tiny end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_data() -> DataSplits:
    return load_dataset("fashion-mnist-seg", val_size=200, limit_train=300, limit_test=100)


def test_dense_teacher_outputs_are_cached_in_fp16(models, seg_data, monkeypatch) -> None:
    model = models["unet_tiny"]
    split = seg_data.train.subset(8)
    out = teacher_logits(model, split, key="test-seg-models-fp16")
    assert out is not None
    assert out.dtype == torch.float16 and out.shape == (8, CLASSES, SIDE, SIDE)
    with torch.no_grad():
        ref = model(split.x)
    assert torch.allclose(out.float(), ref, atol=1e-2, rtol=1e-2)
    # too large for the cache: None, the teacher then runs on each recovery batch
    monkeypatch.setattr("autoslim.tasks.base.CACHE_BYTES", 1000)
    assert teacher_logits(model, split, key="test-seg-models-none") is None


def test_unet_int8_exports_float_logits_and_scores_miou(models, seg_data, tmp_path) -> None:
    model = models["unet_tiny"]
    cfg = CompressionConfig.uniform(weight_bits=8)
    assert (cfg.default.weight_bits, cfg.default.act_bits) == (8, 8)
    c = compress(
        model,
        cfg,
        data=seg_data,
        recovery=Recovery(steps=5, batch_size=16, subset=64),
        classifier="classifier",
    )
    assert c.recovery_loss == c.recovery_loss  # trained: a finite loss, not nan
    path = tmp_path / "unet-int8.onnx"
    check = seg_data.val.subset(64)
    result = export(c, path, check=check, min_agreement=0.9)
    assert path.is_file() and result.agreement is not None and result.agreement >= 0.9
    # the gate's agreement is the share of equal pixels of the argmax maps
    ours, theirs = predictions(c.model, check), artifact_predictions(path, check)
    assert ours.shape == theirs.shape == (64, SIDE, SIDE)
    assert result.agreement == pytest.approx(float((ours == theirs).float().mean()))
    assert any("QDQ" in v for v in result.layers.values())

    om = onnx.load(str(path))
    (output,) = om.graph.output
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert om.graph.node[-1].op_type != "DequantizeLinear"
    producer = next(n for n in om.graph.node if output.name in n.output)
    assert producer.op_type not in ("DequantizeLinear", "QuantizeLinear")  # float logits
    assert any(n.op_type == "QuantizeLinear" for n in om.graph.node)  # the rest is int8

    fp32 = export_onnx(model, tmp_path / "unet-fp32.onnx", example=torch.zeros(EXAMPLE))
    assert path.stat().st_size < fp32.size_bytes

    scores, pred = artifact_scores(path, seg_data.val)
    assert set(scores) >= {"miou", "pixel_accuracy"}
    assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["pixel_accuracy"] <= 1.0
    assert pred.dtype == torch.uint8 and pred.shape == (len(seg_data.val), SIDE, SIDE)
    metric, _ = artifact_accuracy(path, seg_data.val.subset(16))
    assert 0.0 <= metric <= 1.0
