"""The quantization tests' own CNN and helpers; HF / timm models, token batches and
``train_steps`` come from tests/families.py."""

from __future__ import annotations

import torch
from torch import nn

import slimkit


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 with a residual, a conv with bias feeding a BN, a pooled Linear head."""

    def __init__(self, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def logits_of(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of equal argmaxes over the last axis, largest absolute logit difference)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return same, (a - b).abs().max().item()


def near_tie_flips(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of samples whose argmax differs while the reference's top-two gap is below twice
    the largest logit difference on the samples that did not flip: a swap the rounding noise seen
    in this very comparison could cause (any swap moves its own sample by at least half its gap,
    so that sample's own change proves nothing)."""
    reference, candidate = torch.as_tensor(reference), torch.as_tensor(candidate)
    top2 = reference.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    flipped = reference.argmax(-1) != candidate.argmax(-1)
    if flipped.all():
        return 0.0
    noise = (reference - candidate).abs().amax(-1)[~flipped].max()
    return (flipped & (gap < 2 * noise)).float().mean().item()


def cnn_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def convert_copy(model: nn.Module) -> nn.Module:
    return slimkit.convert(model, inplace=False)


def int8_small_cnn(seed: int, compile_mode: str = "auto", model: nn.Module | None = None) -> nn.Module:
    """A PTQ-converted SmallCNN (or ``model``, taking 1x12x12 images) with ``quant.compile: compile_mode``."""
    torch.manual_seed(seed)
    model = (model or SmallCNN()).eval()
    g = torch.Generator().manual_seed(seed)
    calibration = [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)]
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": compile_mode}}, example_inputs=calibration[0])
    slimkit.calibrate(model, calibration)
    return slimkit.convert(model).eval()


def runtime_paths(model: nn.Module) -> list[str]:
    """The path each input signature of a converted model took (slimkit.quant.runtime_report)."""
    return [s["path"] for s in slimkit.quant.runtime_report(model)["signatures"]]
