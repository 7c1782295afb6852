"""Classifiers: a small CNN for the 8x8 digits, and the CIFAR ResNet-18 the paper uses (no torchvision,
which does not import beside the CPU torch here: docs/DEPENDENCIES.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConceptEraseError

from .config import MODEL_CHOICES


class SmallCNN(nn.Module):
    """Three 3x3 convolutions and a two-layer head (about 25k parameters at width 16): about 98% on digits in seconds.

    The adaptive pool lets the same network take 8x8 digits or 32x32 CIFAR images.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016): two 3x3 convolutions with a projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: a 3x3 stem without max-pool (32x32 inputs), four stages of two blocks (11.2M params)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def build_model(name: str, num_classes: int, in_channels: int, width: int | None = None) -> nn.Module:
    """`cnn` (SmallCNN) or `resnet18`; `width` overrides the base channel count (tests use small ones)."""
    if name == "cnn":
        return SmallCNN(num_classes, in_channels, width or 16)
    if name == "resnet18":
        return ResNet18(num_classes, in_channels, width or 64)
    raise ConceptEraseError(f"unknown model {name!r} (choose from {', '.join(MODEL_CHOICES)})")
