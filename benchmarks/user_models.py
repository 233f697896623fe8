"""A torchvision classifier outside autoslim's registry, passed as a user factory
(``benchmarks/user_models.py:regnet``): RegNetX-400MF with a 3x3 stride-2 stem for 28x28x1."""

from __future__ import annotations

import torchvision
from torch import nn


def regnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    m = torchvision.models.regnet_x_400mf(weights=None, num_classes=num_classes)
    m.stem[0] = nn.Conv2d(in_channels, m.stem[0].out_channels, 3, stride=2, padding=1, bias=False)
    return m
