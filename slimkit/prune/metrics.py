"""Counting what pruning saves: parameters and multiply-accumulates (MACs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import call_model
from ..report import count_parameters


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (torch's FLOP counter / 2).

    Counts matrix products and convolutions, attention included; element-wise work is free.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            call_model(model, inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


__all__ = ["count_macs", "count_parameters"]
