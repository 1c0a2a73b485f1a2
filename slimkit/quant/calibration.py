"""Calibration (PTQ): feeding batches to a prepared model, and refusing degenerate data.

``slimkit.calibrate(model, loader, num_batches=32)`` runs the batches through the model in eval
mode with the activation observers on (:meth:`slimkit.quant.Quantizer.calibrate`). Data whose
ranges come out empty (an all-zero or constant set) is refused; fewer than 16 samples warn.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..controller import controller_of, unwrap
from ..errors import CalibrationError, SlimkitError

logger = logging.getLogger("slimkit")


def model_inputs(batch: Any, device: torch.device) -> Any:
    """What to call the model with for one batch: a dict (HF, without labels), the first item of
    a tuple / list ``(inputs, targets)``, or a tensor."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    raise SlimkitError(
        f"calibrate: cannot feed a batch of type {type(batch).__name__} to the model; the dataloader must "
        "yield tensors, (inputs, targets) tuples or dicts of keyword tensors"
    )


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


def calibrate(
    model: nn.Module, dataloader: Iterable, num_batches: int | None = None, *, allow_degenerate: bool = False
) -> nn.Module:
    """Static calibration (PTQ): observe activation ranges on ``num_batches`` batches.

    The model must be prepared with a ``quant`` recipe section (``mode: ptq``, or ``qat`` to
    start QAT from the calibrated ranges). Runs in eval mode under ``torch.no_grad``; returns
    the model. Batches may be tensors, ``(inputs, targets)`` tuples or dicts of keyword tensors
    (``labels`` is dropped).

    Data too degenerate to calibrate on is refused with a :class:`slimkit.errors.CalibrationError`
    (a layer whose input was the same value throughout, e.g. an all-zero set); fewer than 16
    samples get a warning. ``allow_degenerate=True`` keeps such ranges (and silences the warning).
    """
    inner = unwrap(model)
    quantizer = controller_of(inner).methods.get("quant")
    if quantizer is None:
        raise SlimkitError(
            f"calibrate: {type(inner).__name__} was prepared without a 'quant' recipe section; "
            "add quant: {mode: ptq} to the recipe"
        )
    quantizer.calibrate(inner, dataloader, num_batches, allow_degenerate)
    return model
