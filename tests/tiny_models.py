"""Small user-factory models for the tests (loaded as ``path/to/tiny_models.py:build``)."""

from __future__ import annotations

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
