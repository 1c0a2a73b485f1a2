"""Which layers slimkit quantizes, and which it knows it cannot.

Quantized: ``nn.Conv2d`` (zero padding), ``nn.Linear`` and GPT-2's
``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed ``[in, out]`` weight),
recognised by class name and module so that transformers is never imported here. Subclasses
count only when they keep the base class's ``forward``: a subclass with its own forward (weight
standardisation, dynamic 'same' padding, ...) would bypass the fake-quant, so it is reported.

Layers with weights that no INT8 kernel slimkit drives can run (other convolutions,
``nn.MultiheadAttention`` whose projections run inside one fused function, recurrent layers)
are reported too, with the ``quant.exclude`` entry that keeps them in floating point.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

LayerKind = Literal["conv2d", "linear", "conv1d"]

# What each kind needs to know: which weight axis holds the output channels.
OUT_AXIS: dict[str, int] = {"conv2d": 0, "linear": 0, "conv1d": 1}


def is_hf_conv1d_class(cls: type) -> bool:
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _base_of(module: nn.Module) -> tuple[LayerKind, type] | None:
    for cls in type(module).__mro__:
        if cls is nn.Conv2d:
            return "conv2d", cls
        if cls is nn.Linear:
            return "linear", cls
        if is_hf_conv1d_class(cls):
            return "conv1d", cls
    return None


# Subclasses whose forward computes exactly the base layer (timm's Linear only adds dtype casts
# under TorchScript); more can be added with register_plain_forward.
_PLAIN_FORWARD: set[str] = {"timm.layers.linear.Linear"}


def register_plain_forward(cls: type) -> type:
    """Declare that ``cls`` (a Conv2d / Linear subclass) overrides ``forward`` without changing
    what it computes, so slimkit may quantize it like its base class. Usable as a decorator."""
    _PLAIN_FORWARD.add(f"{cls.__module__}.{cls.__qualname__}")
    return cls


def _own_forward(module: nn.Module, base: type) -> bool:
    """True when a subclass between ``type(module)`` and ``base`` defines its own forward."""
    for cls in type(module).__mro__:
        if cls is base:
            return False
        ours_or_plain = getattr(cls, "_slimkit_quant_class", False) or (
            f"{cls.__module__}.{cls.__qualname__}" in _PLAIN_FORWARD
        )
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
