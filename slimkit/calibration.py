"""``slimkit.calibrate``: hand a few batches to every prepared method that learns from data.

    model = slimkit.prepare(model, recipe, example_inputs=x)
    slimkit.calibrate(model, loader, num_batches=16)   # prune (data-aware, one-shot), then quant (PTQ)
    small = slimkit.convert(model)

The batches are collected once (up to ``num_batches``) and given, in order, to the pruning
method (which scores, prunes and reconstructs a pending one-shot point with them) and then to
the quantization method (which observes activation ranges on the pruned model).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .batches import collect
from .controller import Method, controller_of, unwrap
from .errors import IncompatibleError, SlimkitError
from .methods import in_order


def calibrate(
    model: nn.Module, batches: Iterable, num_batches: int | None = None, *, allow_degenerate: bool = False
) -> nn.Module:
    """Feed up to ``num_batches`` batches (tensors, ``(inputs, targets)`` tuples or dicts of
    keyword tensors such as tokenizer outputs, with an optional ``labels`` entry) to every
    prepared method that uses calibration data; returns the model.

    * ``prune``: a pruning point due now that needs data (``importance: activation | fisher |
      taylor``, ``reconstruct``, or global scope by measured sensitivity) is performed here.
    * ``quant``: activation ranges are observed in eval mode (PTQ, or to start QAT from them).
      Data too degenerate to calibrate on (every input value the same, e.g. an all-zero set) is
      refused with a :class:`slimkit.errors.CalibrationError`; fewer than 16 samples warn.
      ``allow_degenerate=True`` keeps such ranges (and silences the warning).
    """
    inner = unwrap(model)
    controller = controller_of(inner)
    # Registry order (slimkit/methods.py): pruning first, quantization then observes the pruned model.
    methods = [method for method in in_order(controller.methods) if _uses_data(method)]
    if not methods:
        raise SlimkitError(
            f"calibrate: {type(inner).__name__} was prepared without a 'prune' or 'quant' recipe section; "
            "add quant: {mode: ptq} (or a data-aware prune section) to the recipe"
        )
    users = [method for method in methods if method.takes_calibration()]
    if not users:
        reasons = "; ".join(method.nothing_to_calibrate() for method in methods)
        raise IncompatibleError(f"calibrate: nothing to calibrate: {reasons}")
    collected = collect(batches, num_batches)
    for method in users:
        method.calibrate(inner, collected, allow_degenerate=allow_degenerate)
    return model


def needs_calibration(model: nn.Module) -> bool:
    """Whether a prepared method cannot go on without ``slimkit.calibrate``: a data-aware
    pruning point due now, depth pruning ranked by output cosine with no batches yet, or PTQ
    ranges not observed yet. (QAT observes its ranges in training: calibrating first is
    optional, so it does not count here.)"""
    controller = controller_of(unwrap(model), required=False)
    if controller is None:
        return False
    return any(method.waits_for_calibration() for method in in_order(controller.methods))


def _uses_data(method: Method) -> bool:
    """Whether a method learns from calibration data at all (it overrides ``Method.calibrate``)."""
    return type(method).calibrate is not Method.calibrate
