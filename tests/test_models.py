"""Models: every built-in model trains on both image formats; user factories by file or module."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TESTS_DIR, TINY
from torch import nn

from autoslim import ModelError, build_model, list_models
from autoslim.models import stem_and_classifier


def test_list_models_names_the_builtins() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"resnet18", "mobilenet_v2", "vgg11_bn"} <= set(names)


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)], ids=["1x28", "3x32"])
@pytest.mark.parametrize("name", list_models("classification"))
def test_builtin_model_forward_and_backward(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=10, image_size=size)
    model.train()
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    stem, classifier = stem_and_classifier(name, model)
    mods = dict(model.named_modules())
    assert isinstance(mods[stem], nn.Conv2d) and mods[stem].in_channels == in_channels
    assert mods[stem].weight.grad.abs().sum() > 0  # the gradient reaches the input layer
    assert isinstance(mods[classifier], nn.Linear) and mods[classifier].out_features == 10


@pytest.mark.parametrize("name", list_models("classification"))
def test_stem_and_classifier_name_real_layers_for_large_images(name: str) -> None:
    """Above 64 px the torchvision heads are kept; the classifier named for pruning to leave
    alone must still be the final Linear (otherwise the class outputs become prunable)."""
    model = build_model(name, in_channels=3, num_classes=10, image_size=96)
    stem, classifier = stem_and_classifier(name, model)
    mods = dict(model.named_modules())
    assert isinstance(mods[stem], nn.Conv2d) and mods[stem].in_channels == 3
    assert isinstance(mods[classifier], nn.Linear), f"{classifier} is {mods[classifier]}"
    assert mods[classifier].out_features == 10


def test_small_image_resnet_stem_keeps_14x14() -> None:
    """Documented adaptation: 3x3 stride-2 stem, no max-pool, for <= 64 px images."""
    small = build_model("resnet18", in_channels=1, image_size=28)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (2, 2)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", in_channels=3, image_size=224)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_user_factory_from_file(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(num_classes, in_channels):
                return nn.Sequential(
                    nn.Conv2d(in_channels, 4, 3), nn.Flatten(1), nn.LazyLinear(num_classes)
                )

            def plain():
                return nn.Sequential(nn.Flatten(1), nn.Linear(28 * 28, 10))

            def not_a_model():
                return "hello"

            CONSTANT = 3
            """
        )
    )
    m = build_model(f"{tmp_path / 'mynet.py'}:make", in_channels=3, num_classes=7)
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, 7)
    plain = build_model(f"{tmp_path / 'mynet.py'}:plain")  # no keyword arguments accepted
    assert plain(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ModelError, match="returned str"):
        build_model(f"{tmp_path / 'mynet.py'}:not_a_model")
    with pytest.raises(ModelError, match="no callable 'CONSTANT'"):
        build_model(f"{tmp_path / 'mynet.py'}:CONSTANT")
    with pytest.raises(ModelError, match="does not exist"):
        build_model(f"{tmp_path / 'absent.py'}:make")


def test_user_factory_from_package_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "userpkg_for_autoslim"
    (pkg / "nets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets" / "__init__.py").write_text("")
    (pkg / "nets" / "small.py").write_text(
        "from torch import nn\n\n"
        "def factory(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * 32 * 32, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model(
        "userpkg_for_autoslim.nets.small:factory", in_channels=3, num_classes=4, image_size=32
    )
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_tiny_test_model_is_a_valid_user_factory() -> None:
    m = build_model(TINY)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert (TESTS_DIR / "tiny_models.py").is_file()


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("resnet9000", "unknown model 'resnet9000'"),
        ("a:b:c", "cannot import module 'a:b'"),
        ("foo.py:", "malformed model 'foo.py:'"),
        (":factory", "malformed model"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("os:not-an-identifier", "malformed model"),
    ],
)
def test_bad_model_specs_raise_model_error(spec: str, fragment: str) -> None:
    with pytest.raises(ModelError) as e:
        build_model(spec)
    assert e.value.exit_code == 2
    assert fragment in str(e.value)
