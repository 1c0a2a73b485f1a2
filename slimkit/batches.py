"""Calibration batches: what to feed the model, and the labels a loss may need.

A batch is a tensor (inputs only), a tuple / list ``(inputs, targets, ...)`` or a dict of
keyword tensors (tokenizer outputs, a ``datasets`` row collated by a DataLoader), where a
``labels`` entry holds the targets. The same forms are accepted everywhere slimkit takes
batches (``slimkit.calibrate`` for pruning and quantization).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import SlimkitError


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def split_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """(model inputs, labels or None) on ``device``.

    Dicts keep every key but ``labels`` as inputs; tuples / lists give their first item as
    the input and their second (if any) as the labels; a tensor is the input.
    """
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "items")):
        inputs = {k: _to(v, device) for k, v in batch.items() if k != "labels"}
        return inputs, _to(batch.get("labels"), device)
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 else None
        return _check(batch[0], device), _to(labels, device)
    return _check(batch, device), None


def _check(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    raise SlimkitError(
        f"calibrate: cannot feed a batch of type {type(inputs).__name__} to the model; the dataloader must "
        "yield tensors, (inputs, targets) tuples or dicts of keyword tensors"
    )


def model_inputs(batch: Any, device: torch.device) -> Any:
    """What to call the model with for one batch (labels left out)."""
    return split_batch(batch, device)[0]


def collect(batches: Iterable, num_batches: int | None) -> list[Any]:
    """Up to ``num_batches`` batches of an iterable, as a list (methods may pass over them more than once)."""
    if num_batches is not None and num_batches < 1:
        raise SlimkitError(f"calibrate: num_batches must be >= 1, got {num_batches}")
    out = []
    for batch in batches:
        if num_batches is not None and len(out) >= num_batches:
            break
        out.append(batch)
    if not out:
        raise SlimkitError("calibrate: the dataloader yielded no batches")
    return out
