"""Small user-factory models for the tests (loaded as ``path/to/tiny_models.py:build``)."""

from __future__ import annotations

import torchvision
from torch import nn


class TinyNet(nn.Module):
    """conv(8, stride 2) -> conv(32, stride 2) -> 2x2 average pool -> linear; ~4k parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TinyNet(in_channels, num_classes)


def linear(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A batch-norm-free model: its copy computes exactly what the original computes."""
    return nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * 28 * 28, num_classes))


def shufflenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's ShuffleNetV2 x0.5 for 28x28 images: its channel shuffle defeats
    Torch-Pruning's dependency graph (ZeroDivisionError), so it cannot be pruned."""
    m = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    m.conv1[0] = nn.Conv2d(in_channels, 24, 3, stride=2, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def convnext(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small ConvNeXt (torchvision's blocks, 2 stages): torch.export fails on its dynamic
    batch dimension, so the exporter falls back to a static batch."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    m = ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=num_classes)
    m.features[0][0] = nn.Conv2d(in_channels, 32, 2, stride=2)
    return m


class WideNet(nn.Module):
    """conv(16, stride 2) -> conv(64, stride 2) -> conv(64) -> 2x2 average pool -> linear: 3x3
    convs wide enough that factorising one (low rank) saves bytes in the int8 file."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(64 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def wide(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return WideNet(in_channels, num_classes)
