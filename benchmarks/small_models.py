"""The small CNNs of the INT8 benchmarks: the source tutorial's SmallCNN and the demo's student.

``TutorialCNN`` is the tutorial's SmallCNN as the issues describe it (three 3x3 conv-BN-ReLU
stages of 32, 64 and 128 channels with max-pooling, at 32x32, then a two-layer classifier); the
tutorial itself is not in this repository, so this is a reconstruction of that shape.
``demo_cnn`` is ``make demo``'s INT8 student: timm's ResNet-18 layout with a 64-channel stem and
stages of 4, 8, 16 and 32 channels (the 8/16/32/64 student after 50% channel pruning), 1 input
channel, 32x32 digits.
"""

from __future__ import annotations

import torch
from torch import nn


class TutorialCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_chans, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def demo_cnn(channels: tuple[int, ...] = (4, 8, 16, 32)) -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=channels)


def digits_images(x: torch.Tensor, channels: int, size: int = 32) -> torch.Tensor:
    """8x8 digits [N, 1, 8, 8] resized to ``size`` (bilinear), repeated to ``channels``."""
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.repeat(1, channels, 1, 1)
