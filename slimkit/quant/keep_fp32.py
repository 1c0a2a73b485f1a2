"""``quant.keep_fp32``: keep the layers whose INT8 costs the most in floating point.

The choice is made at :func:`slimkit.calibrate`, once every range is known, by measurement in
fake-quant (which the INT8 kernels reproduce: see the parity tests) on the first
``keep_fp32_batches`` calibration batches, against the same model computing in float:

1. with every layer quantized, the mean cosine of the outputs (logits, or an encoder's last
   hidden state, per real token when the batch has an attention mask) to the float model's;
2. for each quantized layer alone, the cosine when that layer computes in float (its weight and
   its own input unrounded) and all others stay quantized: its *recovery*;
3. layers are kept in float in order of recovery: ``keep_fp32: N`` (or a fraction of the
   layers) takes the first N; ``auto`` adds them one at a time, measuring the cumulative cosine
   after each, until it reaches ``keep_fp32_floor`` or ``keep_fp32_max`` of the layers are float,
   and stops early when one more layer no longer helps.

This is the leave-one-out form of :func:`slimkit.sensitivity`'s INT8 column (which converts one
layer at a time to INT8): it measures what keeping a layer in float *gives back* in the model
that ships, interactions with the other quantized layers included. The quantizer then prepares
again with the chosen layers excluded and recalibrates, so activation sites and folded
BatchNorms follow the new boundary exactly as with ``quant.exclude``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..outputs import flat_outputs, mean_cosine
from ..recipe import QuantConfig
from . import qat


@dataclasses.dataclass
class Choice:
    """What ``keep_fp32`` chose and why (recorded in the model card)."""

    layers: list[str]  # kept in float, most helpful first
    recovery: dict[str, float]  # every candidate -> cosine gained when it alone computes in float
    cosine_all_int8: float  # fake-quant, every layer quantized
    cosine_kept: float  # fake-quant, the chosen layers in float (measured before re-preparing)
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        gains = ", ".join(f"{n} (+{self.recovery[n]:.4f})" for n in self.layers) or "none"
        return (
            f"{len(self.layers)} of {self.candidates} layers kept in float by measured INT8 cost: {gains}; "
            f"output cosine to float {self.cosine_all_int8:.4f} with every layer INT8, "
            f"{self.cosine_kept:.4f} with these in float"
        )


def budget(config: QuantConfig, candidates: int) -> int:
    """The most layers ``config.keep_fp32`` may keep in float out of ``candidates``."""
    value = config.keep_fp32
    if value == "auto":
        fraction = config.keep_fp32_max
    elif value >= 1:
        return min(int(value), candidates - 1)
    else:
        fraction = value
    return max(1, min(candidates - 1, math.floor(fraction * candidates + 1e-9)))


@contextlib.contextmanager
def computing_in_float(layers: list[nn.Module]) -> Iterator[None]:
    """The fake-quant ``layers`` compute with float weights and their own inputs unrounded."""
    saved = []
    for layer in layers:
        state = qat.layer_state(layer)
        own = layer._modules.get("input_quantizer")
        saved.append((state, state.weight_fake_quant, own, None if own is None else own.fake_quant))
        state.weight_fake_quant = False
        if own is not None:
            own.fake_quant = False
    try:
        yield
    finally:
        for state, weight_fq, own, own_fq in saved:
            state.weight_fake_quant = weight_fq
            if own is not None:
                own.fake_quant = own_fq


def choose(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list,
    config: QuantConfig,
    phases: Callable[[bool], contextlib.AbstractContextManager],
) -> Choice:
    """Measure and choose (see the module doc). ``phases(fake_quant)`` sets the whole model to
    fake-quant (True) or float (False) for the duration of a ``with`` block."""
    names = list(layers)
    with phases(False):
        reference = flat_outputs(model, batches, "quant.keep_fp32")
    with phases(True), qat.held_weights(list(layers.values())):

        def cosine(kept: list[str]) -> float:
            with computing_in_float([layers[n] for n in kept]):
                return mean_cosine(flat_outputs(model, batches, "quant.keep_fp32"), reference)

        all_int8 = cosine([])
        recovery = {n: cosine([n]) - all_int8 for n in names}
        ranked = sorted(names, key=lambda n: (-recovery[n], names.index(n)))
        most = budget(config, len(names))
        if config.keep_fp32 != "auto":
            chosen = [n for n in ranked[:most] if recovery[n] > 0]
            return Choice(chosen, recovery, all_int8, cosine(chosen) if chosen else all_int8, len(names))
        chosen, current = [], all_int8
        for name in ranked[:most]:
            if current >= config.keep_fp32_floor or recovery[name] <= 0:
                break
            value = cosine([*chosen, name])
            if value <= current:  # its gain alone does not survive next to the layers already float
                continue
            chosen.append(name)
            current = value
        return Choice(chosen, recovery, all_int8, current, len(names))


__all__ = ["Choice", "budget", "choose", "computing_in_float"]
