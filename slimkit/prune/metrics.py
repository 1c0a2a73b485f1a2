"""Counting what pruning saves: parameters and multiply-accumulates (MACs)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..report import count_macs as report_count_macs
from ..report import count_parameters


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (torch's FLOP counter / 2).

    Counts matrix products and convolutions, attention included; element-wise work is free.
    """
    was_training = model.training
    model.eval()
    try:
        return report_count_macs(model, inputs)
    finally:
        model.train(was_training)


__all__ = ["count_macs", "count_parameters"]
