"""scikit-learn's 8x8 digits as tensors, shuffled once with a fixed seed, split train / held-out.

Shared by the digits parts of ``prune_accuracy.py`` and ``int8_accuracy.py``."""

from __future__ import annotations

import torch


def shuffled_digits(
    held_out: int, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_test, y_test)): images [N, 1, 8, 8] in [0, 1], shuffled with
    ``seed``, the last ``held_out`` held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:-held_out], y[:-held_out]), (x[-held_out:], y[-held_out:])
