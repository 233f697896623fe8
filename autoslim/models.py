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

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ModelError

__all__ = ["build_model", "list_models", "stem_and_classifier"]

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


_REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {
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
}


def list_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(_REGISTRY)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ModelError(
            f"malformed model {spec!r}: expected a built-in name ({', '.join(list_models())}) "
            "or 'package.module:factory' or 'path/to/file.py:factory'"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist; give 'path/to/file.py:factory'")
        mod_name = "autoslim_user_" + path.stem
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise ModelError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec_obj)
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # the user's file: a syntax error, a failing import, ...
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            raise ModelError(
                f"cannot import model file {path}{where}: {type(e).__name__}: {e}; fix the file"
            ) from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(
                f"cannot import module {target!r} for model {spec!r}: {e}; check PYTHONPATH "
                "or pass a file path 'path/to/file.py:factory'"
            ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(
            f"{target} has no callable {attr!r}; expected a function returning an nn.Module"
        )
    return factory


def build_model(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28
) -> nn.Module:
    """Build a fresh, untrained model for images of ``in_channels`` x ``image_size``^2."""
    if name in _REGISTRY:
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
            f"model factory {name!r} raised {type(e).__name__}: {e}; fix the factory (it is "
            f"called with {kwargs or 'no arguments'})"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"factory {name!r} returned {type(model).__name__}; expected torch.nn.Module"
        )
    _check_output(name, model, in_channels, num_classes, image_size)
    return model


def _check_output(
    name: str, model: nn.Module, in_channels: int, num_classes: int, image_size: int
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
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ModelError(
            f"model {name!r} maps a batch of 2 images to {got}; expected one score per class, "
            f"(2, {num_classes}), for this dataset's {num_classes} classes: give the factory a "
            "num_classes argument or build its classifier with that many outputs"
        )


def stem_and_classifier(name: str, model: nn.Module) -> tuple[str | None, str | None]:
    """Module names of the stem conv and the final classifier (guessed for user models)."""
    mods = dict(model.named_modules())
    if name in _STEM_CLASSIFIER and all(n in mods for n in _STEM_CLASSIFIER[name]):
        stem, cls = _STEM_CLASSIFIER[name]
        if isinstance(mods[cls], nn.Linear):
            return stem, cls
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (convs[0] if convs else None), (
        linears[-1] if linears else (convs[-1] if convs else None)
    )
