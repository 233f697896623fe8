"""Models by name: torchvision classifiers adapted to the dataset, or a user's own factory.

Adaptation for small images (<= 64 px), documented because it changes the architecture:
- ResNets: the 7x7 stride-2 stem becomes a 3x3 stride-2 conv and the max-pool is removed
  (28x28 -> 14x14 after the stem instead of 7x7); a stride-1 stem costs ~3x per step.
- MobileNetV2/V3, EfficientNet: the stem conv takes the dataset's channels, stride kept at 2.
- VGG-11-BN: the stem takes the dataset's channels, the last max-pool is dropped and the
  7x7 adaptive pool + 25088-wide classifier becomes a global pool + Linear(512, classes)
  (otherwise a 1x1 map becomes a 102M-parameter first linear).
For large images only the input channels and classes change.

User models: ``package.module:factory`` or ``path/to/file.py:factory``; the factory is called
with keyword arguments ``num_classes`` and ``in_channels`` when it accepts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from ._user import load_callable
from .errors import ModelError, one_line

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["build_model", "list_models", "model_task", "stem_and_classifier", "UNetTiny"]

_SMALL = 64  # images up to this size get the small-image stem


def _conv_like(
    old: nn.Conv2d, in_channels: int, *, kernel: int | None = None, stride: int | None = None
) -> nn.Conv2d:
    k = kernel if kernel is not None else old.kernel_size[0]
    s = stride if stride is not None else old.stride[0]
    return nn.Conv2d(
        in_channels, old.out_channels, k, stride=s, padding=k // 2, bias=old.bias is not None
    )


def _resnet(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        m = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if image_size <= _SMALL:
            m.conv1 = _conv_like(m.conv1, in_channels, kernel=3, stride=2)
            m.maxpool = nn.Identity()
        else:
            m.conv1 = _conv_like(m.conv1, in_channels)
        return m

    return build


def _features0(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        m = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        stem = m.features[0][0]
        m.features[0][0] = _conv_like(stem, in_channels)
        return m

    return build


def _vgg11_bn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    m = torchvision.models.get_model("vgg11_bn", weights=None, num_classes=num_classes)
    m.features[0] = _conv_like(m.features[0], in_channels)
    if image_size <= _SMALL:
        m.features = m.features[:-1]  # drop the last max-pool
        m.avgpool = nn.AdaptiveAvgPool2d(1)
        m.classifier = nn.Sequential(nn.Flatten(1), nn.Dropout(0.2), nn.Linear(512, num_classes))
    return m


class _OutTensor(nn.Module):
    """torchvision's segmentation models return ``{"out": logits}``; the exported file and the
    task read one tensor, the logits at the input's resolution."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _tv_segmentation(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        # both weights off: the backbone's default is ImageNet weights (a download)
        m = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes
        )
        m.backbone["0"][0] = _conv_like(m.backbone["0"][0], in_channels)
        return _OutTensor(m)

    return build


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetTiny(nn.Module):
    """A small encoder-decoder for segmentation (U-Net shape): three resolutions, skip
    connections concatenated, bilinear upsampling, a 1x1 classifier at full resolution."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(_cbr(in_channels, c1), _cbr(c1, c1))
        self.enc2 = nn.Sequential(_cbr(c1, c2, 2), _cbr(c2, c2))
        self.enc3 = nn.Sequential(_cbr(c2, c3, 2), _cbr(c3, c3))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _cbr(c3 + c2, c2)
        self.dec1 = _cbr(c2 + c1, c1)
        self.classifier = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.classifier(d1)


def _unet_tiny(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return UNetTiny(in_channels, num_classes)


_REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lraspp_mobilenet_v3_large": _tv_segmentation("lraspp_mobilenet_v3_large"),
    "deeplabv3_mobilenet_v3_large": _tv_segmentation("deeplabv3_mobilenet_v3_large"),
    "unet_tiny": _unet_tiny,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "mobilenet_v2": _features0("mobilenet_v2"),
    "mobilenet_v3_small": _features0("mobilenet_v3_small"),
    "efficientnet_b0": _features0("efficientnet_b0"),
    "vgg11_bn": _vgg11_bn,
}

# Stem and classifier module names, for models that pruning should not touch there.
_STEM_CLASSIFIER = {
    "resnet18": ("conv1", "fc"),
    "resnet34": ("conv1", "fc"),
    "mobilenet_v2": ("features.0.0", "classifier.1"),
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
    "efficientnet_b0": ("features.0.0", "classifier.1"),
    "vgg11_bn": ("features.0", "classifier.2"),
    # segmentation: every conv that writes class scores (LR-ASPP sums two of them)
    "lraspp_mobilenet_v3_large": (
        "model.backbone.0.0",
        "model.classifier.low_classifier,model.classifier.high_classifier",
    ),
    "deeplabv3_mobilenet_v3_large": ("model.backbone.0.0", "model.classifier.4"),
    "unet_tiny": ("enc1.0.0", "classifier"),
}

# what each built-in model is for (the others are classifiers)
_TASK_OF = {
    "lraspp_mobilenet_v3_large": "segmentation",
    "deeplabv3_mobilenet_v3_large": "segmentation",
    "unet_tiny": "segmentation",
}


def list_models(task: str | None = None) -> list[str]:
    """Names of the built-in models (those for ``task``, a task name, when given)."""
    return sorted(n for n in _REGISTRY if task is None or model_task(n) == task)


def model_task(name: str) -> str | None:
    """The task a built-in model is for (None for a user's model: any)."""
    if name not in _REGISTRY:
        return None
    return _TASK_OF.get(name, "classification")


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    return load_callable(spec, what="model", error=ModelError, names=", ".join(list_models()))


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    task: Task | None = None,
) -> nn.Module:
    """Build a fresh, untrained model for images of ``in_channels`` x ``image_size``^2 and
    ``task`` (default: classification); a user's model is checked on a batch of 2 images."""
    if name in _REGISTRY:
        want = task.name if task is not None else "classification"
        if model_task(name) != want:
            raise ModelError(
                f"model {name!r} is a {model_task(name)} model but the task is {want}; "
                f"expected one of {', '.join(list_models(want)) or '(none built in)'} or a "
                "user factory 'path/to/file.py:factory'"
            )
        return _REGISTRY[name](in_channels, num_classes, image_size)
    if ":" not in name:
        raise ModelError(
            f"unknown model {name!r}; expected one of {', '.join(list_models())} "
            "or a user factory 'package.module:factory' / 'path/to/file.py:factory'"
        )
    factory = _load_factory(name)
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "in_channels" in params:
        kwargs["in_channels"] = in_channels
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's code: their error to fix, named as such
        raise ModelError(
            f"model factory {name!r} raised {type(e).__name__}: {one_line(str(e))}; fix the "
            "factory (it is "
            f"called with {kwargs or 'no arguments'})"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"factory {name!r} returned {type(model).__name__}; expected torch.nn.Module"
        )
    _check_output(name, model, in_channels, num_classes, image_size, task)
    return model


def _check_output(
    name: str,
    model: nn.Module,
    in_channels: int,
    num_classes: int,
    image_size: int,
    task: Task | None = None,
) -> None:
    """A user's model maps a batch of the data's images to one score per class, or is refused
    before any training (not an IndexError at the first loss)."""
    shape = (2, in_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as e:
        raise ModelError(
            f"model {name!r} fails on a batch of the data's images {tuple(shape)}: "
            f"{type(e).__name__}: {e}; expected a model for {in_channels}-channel "
            f"{image_size}x{image_size} images (the factory may take in_channels)"
        ) from e
    finally:
        model.train(was_training)
    if task is None:
        from .tasks import Classification

        task = Classification()
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    want = task.check_output(
        out, batch=2, num_classes=num_classes, image_shape=(in_channels, image_size, image_size)
    )
    if want is not None:
        raise ModelError(
            f"model {name!r} maps a batch of 2 images to {got}; expected {want}: give the "
            "factory a num_classes argument or build its classifier with that many outputs"
        )


def stem_and_classifier(name: str, model: nn.Module) -> tuple[str | None, str | None]:
    """Module names of the stem conv and the final classifier (guessed for user models: the
    last linear layer, else the last conv). A model whose class scores come from several
    layers names them all, comma-separated."""
    mods = dict(model.named_modules())
    if name in _STEM_CLASSIFIER:
        stem, cls = _STEM_CLASSIFIER[name]
        heads = cls.split(",")
        if stem in mods and all(isinstance(mods.get(h), (nn.Linear, nn.Conv2d)) for h in heads):
            return stem, cls
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (convs[0] if convs else None), (
        linears[-1] if linears else (convs[-1] if convs else None)
    )
