"""Small, stateless pieces of a training loop shared by ``scripts/distill.py`` and the demo.

Stateless on purpose: the learning rate and the augmentation are functions of the step, so a
run resumed from a checkpoint needs no scheduler or generator state to continue exactly.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: ``"constant"`` (1), or
    ``"cosine"`` (5% linear warm-up, then cosine decay to 0 at the last step)."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def random_shift(images: torch.Tensor, pixels: int, seed: int, step: int) -> torch.Tensor:
    """Translate the batch (N, C, H, W) by up to ``pixels`` (wrapping around). The shift is a
    function of ``seed`` and ``step``: the same on every process for a step, and the same again
    on resume; teacher and student see the same images."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    dy, dx = torch.randint(-pixels, pixels + 1, (2,), generator=g).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))
