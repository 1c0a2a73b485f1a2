"""The quantization lifecycle: the schedule's phases and the protocol every target follows.

A *target* is one thing quantization changes in a model: a layer (Conv2d / Linear / transposed
Linear, :class:`~.targets.LayerTarget`), a weight-only embedding (:class:`~.targets.EmbeddingTarget`)
or an activation site between layers (:class:`~.targets.SiteTarget`). Each lives through the
same steps, which :class:`~.quantizer.Quantizer` runs as one loop over its targets:

    attach(model)     prepare: fake-quant modules, observers (shapes unchanged)
    set_phase(phase)  every step, and around calibration: fake-quant / observe on or off
    to_int8(model)    convert: int8 tensors and INT8 kernels in place
    detach(model)     remove without converting: the float model again

and, for saved folders, per kind (class methods, on a converted model / a freshly built one):

    describe(modules) -> the kind's entries of the ``quantization`` block
    rebuild(model, block)  the empty INT8 structure of those entries, before weights load
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

from torch import nn

from ..recipe import QuantConfig


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # float | observing | frozen | calibrating
    fake_quant: bool  # weights and activations fake-quantized
    observe: bool  # activation observers update in training mode
    bn_frozen: bool  # folded BatchNorms use their running statistics
    calibrating: bool = False  # slimkit.calibrate: observe in eval mode, compute in float


def phase_at(config: QuantConfig, step: int, calibrated: bool = False) -> Phase:
    """The schedule's state after ``step`` optimizer steps."""
    if config.mode == "ptq":  # float until calibrated, then fixed ranges
        return Phase("frozen", True, False, True) if calibrated else Phase("float", False, False, True)
    on = step >= config.start_step
    if config.mode == "dynamic":
        return Phase("observing" if on else "float", on, False, False)
    frozen_ranges = config.freeze_observers_step is not None and step >= config.freeze_observers_step
    bn_frozen = config.freeze_bn_step is not None and step >= config.freeze_bn_step
    name = "float" if not on else ("frozen" if frozen_ranges else "observing")
    return Phase(name, on, on and not frozen_ranges, bn_frozen)


def calibrating(current: Phase) -> Phase:
    """The phase :func:`slimkit.calibrate` runs in: observers on, everything computed in float
    (layer inputs are observed as the float model produces them)."""
    return Phase("calibrating", False, False, current.bn_frozen, calibrating=True)


class QuantTarget(Protocol):
    """One module that quantization changes (see the module doc)."""

    block_key: ClassVar[str]  # its entries' key in the ``quantization`` block
    name: str  # the module's qualified name

    def attach(self, model: nn.Module) -> None: ...

    def quantizers(self) -> dict[str, nn.Module]:
        """The activation quantizers it owns, by state-dict prefix (for range checks and logs)."""
        ...

    def set_phase(self, phase: Phase) -> None: ...

    def to_int8(self, model: nn.Module) -> None: ...

    def detach(self, model: nn.Module) -> None: ...

    @classmethod
    def describe(cls, modules: list[tuple[str, nn.Module]]) -> dict[str, Any]: ...

    @classmethod
    def rebuild(cls, model: nn.Module, block: dict[str, Any]) -> None: ...


__all__ = ["Phase", "QuantTarget", "calibrating", "phase_at"]
