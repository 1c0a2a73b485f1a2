"""Calibration checks (PTQ): refusing degenerate data.

``slimkit.calibrate(model, loader, num_batches=32)`` (slimkit/calibration.py) gives the batches to
:meth:`slimkit.quant.Quantizer.calibrate`, which runs them in eval mode with the activation
observers on and then calls :func:`check_calibration`: data whose ranges come out empty (an
all-zero or constant set) is refused; fewer than 16 samples warn.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError

logger = logging.getLogger("slimkit")


def batch_size(inputs: Any) -> int:
    tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    first = next((t for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return 1 if first is None else int(first.shape[0])


MIN_CALIBRATION_SAMPLES = 16


class InputSpread:
    """The overall min / max of the floating tensors a calibration fed the model."""

    def __init__(self) -> None:
        self.low = float("inf")
        self.high = -float("inf")

    def add(self, inputs: Any) -> None:
        tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                lo, hi = torch.aminmax(tensor.detach())
                self.low, self.high = min(self.low, float(lo)), max(self.high, float(hi))

    @property
    def constant(self) -> bool:
        return self.low == self.high  # every floating input value the same (all-zero sets, ...)


def check_calibration(
    quantizers: dict[str, nn.Module], samples: int, spread: InputSpread, allow_degenerate: bool
) -> None:
    """Refuse calibration inputs that are constant (an all-zero set: every range would be empty,
    so every later input is clipped to that one value); warn when fewer than
    ``MIN_CALIBRATION_SAMPLES`` samples were seen (one sample's ranges miss much of the real ones)
    or when most ranges came out empty. Single empty ranges are normal (timm zero-initialises the
    last BatchNorm of residual blocks, whose output is then constant)."""
    observed = {n: q for n, q in quantizers.items() if hasattr(q, "observer") and q.observer.has_data}
    flat = [n for n, q in observed.items() if float(q.observer.max_val) - float(q.observer.min_val) <= 0.0]
    if spread.constant and not allow_degenerate:
        raise CalibrationError(
            f"calibrate: every calibration input value is {spread.low:g} (a constant or all-zero set), so "
            f"{len(flat)} of {len(observed)} activation ranges are empty and any other input would be clipped. "
            "Calibrate on real samples, or pass allow_degenerate=True to keep these ranges."
        )
    problems = []
    if samples < MIN_CALIBRATION_SAMPLES:
        problems.append(
            f"only {samples} sample(s) seen; activation ranges from so few samples usually miss much of the real "
            f"range. Calibrate on at least {MIN_CALIBRATION_SAMPLES} (a few hundred is typical)"
        )
    if len(flat) * 2 > len(observed):
        problems.append(f"{len(flat)} of {len(observed)} activation ranges are empty (constant activations)")
    for problem in problems:
        message = f"calibrate: {problem}."
        if not allow_degenerate:
            warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)
