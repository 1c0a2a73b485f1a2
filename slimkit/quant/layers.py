"""Which layers slimkit quantizes, and which it knows it cannot.

Quantized: ``nn.Conv2d`` (zero padding), ``nn.Linear`` and "transposed linears": Linear layers
that store their weight ``[in, out]`` (kind ``conv1d``, after the first one, GPT-2's ``Conv1D``),
which a model family's adapter declares with :func:`register_transposed_linear` (this module
names no model library). Subclasses count only when they keep the base class's ``forward``: a
subclass with its own forward (weight standardisation, dynamic 'same' padding, ...) would
bypass the fake-quant, so it is reported, unless its adapter (or the user) declares with
:func:`register_plain_forward` that its forward computes the same.

Layers with weights that no INT8 kernel slimkit drives can run (other convolutions,
``nn.MultiheadAttention`` whose projections run inside one fused function, recurrent layers)
are reported too, with the ``quant.exclude`` entry that keeps them in floating point.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from .state import QuantMixin

LayerKind = Literal["conv2d", "linear", "conv1d"]

# What each kind needs to know: which weight axis holds the output channels.
OUT_AXIS: dict[str, int] = {"conv2d": 0, "linear": 0, "conv1d": 1}

# By class path ("package.module.Qualname"), so that no model library is imported here; filled by
# the adapters (slimkit/plugins/) when they are imported, and by users.
_TRANSPOSED_LINEAR: set[str] = set()
_PLAIN_FORWARD: set[str] = set()


def class_path(cls: type | str) -> str:
    """``"package.module.Qualname"`` of a class (a string is returned as it is)."""
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_transposed_linear(cls: type | str) -> type | str:
    """Declare ``cls`` (a class or its path) a Linear layer whose weight is ``[in, out]`` and
    whose forward is ``x @ weight + bias`` (GPT-2's ``Conv1D``): slimkit quantizes it like a
    Linear (kind ``conv1d``). Usable as a decorator."""
    _TRANSPOSED_LINEAR.add(class_path(cls))
    return cls


def is_transposed_linear_class(cls: type) -> bool:
    return class_path(cls) in _TRANSPOSED_LINEAR


def _base_of(module: nn.Module) -> tuple[LayerKind, type] | None:
    for cls in type(module).__mro__:
        if cls is nn.Conv2d:
            return "conv2d", cls
        if cls is nn.Linear:
            return "linear", cls
        if is_transposed_linear_class(cls):
            return "conv1d", cls
    return None


def register_plain_forward(cls: type | str) -> type | str:
    """Declare that ``cls`` (a Conv2d / Linear / Embedding subclass, or its class path)
    overrides ``forward`` without changing what it computes, so slimkit may quantize it like its
    base class. Usable as a decorator."""
    _PLAIN_FORWARD.add(class_path(cls))
    return cls


def _own_forward(module: nn.Module, base: type) -> bool:
    """True when a subclass between ``type(module)`` and ``base`` defines its own forward."""
    for cls in type(module).__mro__:
        if cls is base:
            return False
        ours_or_plain = issubclass(cls, QuantMixin) or class_path(cls) in _PLAIN_FORWARD
        if "forward" in vars(cls) and not ours_or_plain:
            return True
    return False


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a quantizable layer, or None (unsupported or not a weight layer)."""
    found = _base_of(module)
    if found is None:
        return None
    kind, base = found
    if _own_forward(module, base):
        return None
    if kind == "conv2d" and module.padding_mode != "zeros":
        return None
    return kind


_UNSUPPORTED: tuple[tuple[type, str], ...] = (
    (nn.MultiheadAttention, "its projections run inside F.multi_head_attention_forward, not as layers"),
    (
        nn.RNNBase,
        "PyTorch exposes no oneDNN int8 kernel for recurrent layers, and torch.ao's dynamic LSTM / GRU "
        "weights cannot be saved as safetensors (docs/quantization.md, 'Recurrent layers', has measured "
        "alternatives)",
    ),
    (nn.Conv1d, "no INT8 kernel is wired for Conv1d"),
    (nn.Conv3d, "no INT8 kernel is wired for Conv3d"),
    (nn.modules.conv._ConvTransposeNd, "no INT8 kernel is wired for transposed convolutions"),
    (nn.Bilinear, "no INT8 kernel is wired for Bilinear"),
)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer with weights cannot be quantized, or None when it can (or has no weights)."""
    for cls, reason in _UNSUPPORTED:
        if isinstance(module, cls):
            return reason
    found = _base_of(module)
    if found is not None and layer_kind(module) is None:
        kind, base = found
        if kind == "conv2d" and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: the INT8 kernels pad with zeros only"
        return (
            f"{type(module).__name__} overrides {base.__name__}.forward, so fake-quant of its weight "
            "and input would be bypassed"
        )
    return None
