"""What quantization attaches to a module: one typed :class:`QuantState` per module.

Every module that slimkit's quantization changes carries one :class:`QuantState` in its
``__dict__`` (key :data:`STATE_KEY`; not a submodule, Parameter or buffer, so it never reaches
``state_dict`` and pruning never slices it). Its fields are one small record per role the
module plays, ``None`` for the others; a module can play several (a conv is a fake-quant layer
and the site of its own output quantizer):

* ``original_class``: the class slimkit swapped out (:func:`swap_class`), restored on detach;
* ``layer``: :class:`LayerState`, a fake-quant Conv2d / Linear / transposed Linear (QAT, PTQ);
* ``int8``: :class:`Int8LayerState`, a converted INT8 layer;
* ``embedding``: :class:`EmbeddingState`, a fake-quant or INT8 embedding;
* ``site``: :class:`SiteState`, an activation quantizer between layers (:mod:`.sites`);
* ``batchnorm``: :class:`BatchNormState`, a BatchNorm folded into the conv before it;
* ``folded_batchnorms``: on a converted model, BatchNorm name -> ``"identity"`` | ``"remainder"`` | ``"frozen"``.

What must be saved is not here: tensors are buffers and Parameters of the modules (their
``state_dict``), the training step lives in the model's ``slimkit`` child, and a saved
folder's structure is the ``quantization`` block (:mod:`.hub_block`) written from these records.
Read them with :func:`state_of` (documented introspection, also for tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

STATE_KEY = "_slimkit_quant"


class QuantMixin:
    """Base of the mixins slimkit puts in front of a module's class (fake-quant, INT8, folding):
    their ``forward`` is slimkit's own, never a user override that would bypass fake-quant."""


@dataclasses.dataclass
class WeightSpec:
    per_channel: bool
    observer: str
    percentile: float
    learn: bool
    qmax: int = 127  # symmetric levels [-qmax, qmax] (quant.weights.bits 8: 127, 7: 63)


@dataclasses.dataclass
class LayerState:
    """A fake-quant layer (:mod:`.qat`)."""

    kind: str  # conv2d | linear | conv1d (a transposed Linear)
    spec: WeightSpec
    bn: nn.Module | None = None  # the BatchNorm folded into this conv, not a submodule of it
    weight_fake_quant: bool = False
    # the quantizer of this layer's input (its own, or a site's); its scale sets the bias grid
    input_source: nn.Module | None = None
    weight_cache: tuple | None = None  # (key, scale) of an expensive weight observer
    # (weight, bias) as the forward computes them, held while nothing can change them (qat.held_weights)
    held: tuple | None = None


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor._version`` for cache keys, or None for an inference tensor (made or copied under
    ``torch.inference_mode()``, e.g. a converted model deep-copied or loaded there), which keeps
    no version counter: reading it raises. Caches then key on the storage alone; an inference
    tensor can only change in place inside inference mode, and slimkit never changes one."""
    return None if tensor.is_inference() else tensor._version


class KernelCache:
    """A converted layer's input qparams as numbers and its prepacked oneDNN weights, rebuilt
    when a tensor changes. Never copied (``copy.deepcopy`` / pickle give an empty one): the
    prepacked tensors cannot be copied and would point at the original's weights."""

    def __init__(self) -> None:
        self.qparams: tuple | None = None  # (key, (scale, zero_point))
        self.packed: tuple | None = None  # (key, prepacked weight)
        # int8_hardware: 8-bit weights on a CPU whose kernels saturate, run as two exact halves
        self.split: tuple | None = None  # (key, None or (packed high, packed low, high scale))
        self.subsample: bool | None = None  # Int8Layer._subsamples(), decided on the first call

    def __deepcopy__(self, memo: dict) -> KernelCache:
        return KernelCache()

    def __reduce__(self):
        return KernelCache, ()


@dataclasses.dataclass
class Int8LayerState:
    """A converted INT8 layer (:mod:`.int8`)."""

    kind: str
    dynamic: bool  # activations quantized per batch (no input_scale / input_zero_point)
    # the input arrives quantized (dequantized uint8 values of a site with the same qparams): a
    # traced graph must not quantize it again (QuantizeLinear after DequantizeLinear)
    input_from_site: bool = False
    trace_qparams: tuple[float, int] | None = None  # input qparams as constants for tracing
    # the bias as int32 at scale input_scale * weight_scale, for ONNX export (see Int8Layer)
    trace_bias: tuple[torch.Tensor, torch.Tensor] | None = None
    trace_subsample: bool = False  # Int8Layer._subsamples() as a constant for tracing
    cache: KernelCache = dataclasses.field(default_factory=KernelCache)


@dataclasses.dataclass
class EmbeddingState:
    """A fake-quant (QAT) or, once converted, INT8 weight-only embedding (:mod:`.embeddings`)."""

    weight_fake_quant: bool = False
    int8: bool = False


@dataclasses.dataclass
class SiteState:
    """An activation quantizer between layers (:mod:`.sites`)."""

    where: str  # "output" (a forward hook) | "input" (a pre-hook) | "gate" (sites.GatedSiLU)
    # converted, and only INT8 layers read the tensor: in eager mode they quantize it themselves,
    # so rounding it here first would be a wasted elementwise pass
    read_by_layers_only: bool = False
    trace_qparams: tuple[float, int] | None = None  # converted qparams as constants for tracing


@dataclasses.dataclass
class BatchNormState:
    """A BatchNorm folded into the conv before it (:mod:`.fold`)."""

    frozen: bool = False  # after freeze_bn_step: running statistics, also in training mode
    folded_into: LayerState | None = None  # the fake-quant conv it is folded into (QAT)
    neutral: bool = False  # converted, kept for what it does besides normalizing (identity stats)


@dataclasses.dataclass
class QuantState:
    """Everything quantization attached to one module (see the module doc)."""

    original_class: type | None = None
    layer: LayerState | None = None
    int8: Int8LayerState | None = None
    embedding: EmbeddingState | None = None
    site: SiteState | None = None
    batchnorm: BatchNormState | None = None
    folded_batchnorms: dict[str, str] | None = None

    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


def state_of(module: nn.Module) -> QuantState | None:
    """The :class:`QuantState` of ``module``, or None when quantization never touched it."""
    return module.__dict__.get(STATE_KEY)


def attach_state(module: nn.Module) -> QuantState:
    """The :class:`QuantState` of ``module``, created empty if it has none."""
    state = module.__dict__.get(STATE_KEY)
    if state is None:
        state = module.__dict__[STATE_KEY] = QuantState()
    return state


def clear(module: nn.Module, role: str) -> Any:
    """Drop one role (``"layer"``, ``"site"``, ...) from a module's state and return what it held;
    the state goes with its last role."""
    state = state_of(module)
    if state is None:
        return None
    value = getattr(state, role)
    setattr(state, role, None)
    if state.empty():
        del module.__dict__[STATE_KEY]
    return value


# -- swapping a module's class in place ------------------------------------------------------------
# ``module.__class__ = ...``: the module object, its Parameters and every reference to it stay the
# same, so pruning (which holds those references), the optimizer and hooks keep working.

_CLASSES: dict[tuple[type, type], type] = {}


def subclass(mixin: type, base: type, prefix: str) -> type:
    """``prefix + base.__name__``, deriving from ``mixin`` and ``base`` (cached, and published
    in this module so that pickling a prepared model finds the class by name)."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        name = f"{prefix}{base.__name__}"
        if name in globals():  # two bases with one name (timm's Linear and nn.Linear)
            name = f"{prefix}{base.__module__.split('.')[0].capitalize()}{base.__name__}"
        if name in globals():
            name = f"{name}_{len(_CLASSES)}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _CLASSES[(mixin, base)] = cls
        globals()[name] = cls
    return cls


def original_class(module: nn.Module) -> type:
    """The module's class before slimkit swapped it (its class if never swapped)."""
    state = state_of(module)
    return state.original_class if state is not None and state.original_class is not None else type(module)


def swap_class(module: nn.Module, mixin: type, prefix: str) -> None:
    """Put ``mixin`` in front of the module's original class."""
    base = original_class(module)
    attach_state(module).original_class = base
    module.__class__ = subclass(mixin, base, prefix)


def restore_class(module: nn.Module) -> None:
    """Give the module its original class back (no-op when never swapped)."""
    original = clear(module, "original_class")
    if original is not None:
        module.__class__ = original


__all__ = [
    "STATE_KEY",
    "BatchNormState",
    "EmbeddingState",
    "Int8LayerState",
    "KernelCache",
    "LayerState",
    "QuantMixin",
    "QuantState",
    "SiteState",
    "WeightSpec",
    "attach_state",
    "clear",
    "original_class",
    "restore_class",
    "state_of",
    "subclass",
    "swap_class",
]
