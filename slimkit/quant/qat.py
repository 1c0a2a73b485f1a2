"""Fake-quant layers, made by swapping a layer's class in place.

``prepare`` turns an ``nn.Conv2d`` into a ``QATConv2d`` (a subclass of its own class) by
assigning ``module.__class__``: the module object, its Parameters and every reference to it
stay the same, so pruning (which holds those references and slices them at convert time),
the optimizer and hooks keep working. What QAT adds lives on the layer:

* ``input_quantizer``: a child module with the activation observer and qparams;
* ``weight_scale``: only with ``learn_scales``, the learned weight scale(s), one per output
  channel with leading dimension == out_channels (so pruning slices it with the weight).

BatchNorm folding: when a conv's only consumer is a BatchNorm, the conv fake-quantizes the
*folded* weight ``w * s`` (``s = gamma / sqrt(running_var + eps)``) and divides the result by
``s`` again, so the BatchNorm that follows still sees unfolded outputs and trains on batch
statistics; from ``freeze_bn_step`` on it uses its running statistics and the pair computes
exactly the folded int8 conv that ``convert`` builds (Krishnamoorthi 2018, section 3.2). The
division happens on the weight, not on the output, so folding costs no activation-sized
work.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import managed_by_fsdp
from . import bias_correction
from .fold import norm_remainder
from .layers import OUT_AXIS
from .numerics import (
    EPS,
    WEIGHT_QMAX,
    WEIGHT_QMIN,
    fake_quantize_weight,
    lsq_fake_quantize,
    quantize_bias,
    quantize_weight,
)
from .observers import weight_scale
from .quantizers import ActivationQuantizer, DynamicActivationQuantizer

ORIGINAL_CLASS_ATTR = "_slimkit_original_class"
STATE_ATTR = "_slimkit_qat"
FOLDED_INTO_ATTR = "_slimkit_folded_into"  # on a folded BatchNorm: the LayerState of its conv
NEUTRAL_ATTR = "_slimkit_neutral"  # on a converted BatchNorm subclass kept for its activation


@dataclasses.dataclass
class WeightSpec:
    per_channel: bool
    observer: str
    percentile: float
    learn: bool


@dataclasses.dataclass
class LayerState:
    """What a fake-quant layer knows besides its tensors (kept in the module's ``__dict__``)."""

    kind: str
    spec: WeightSpec
    bn: nn.Module | None = None  # the BatchNorm folded into this conv, not a submodule of it
    weight_fake_quant: bool = False
    # the quantizer of this layer's input (its own, or a site's); its scale sets the bias grid
    input_source: nn.Module | None = None
    _cache: tuple | None = None  # (key, scale) of an expensive weight observer

    @property
    def axis(self) -> int:
        return OUT_AXIS[self.kind]


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)`` of a BatchNorm."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight * inv_std if bn.weight is not None else inv_std


def _unfold(quantized: torch.Tensor, s: torch.Tensor, axis: int) -> torch.Tensor:
    """Divide the folded weight by ``s`` again. A channel with ``gamma == 0`` (timm and
    torchvision zero-init the last BN of residual blocks) folds to all-zero weights; dividing
    by 1 there keeps them zero, and the BatchNorm still outputs ``beta`` for it."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return quantized / safe.reshape(_channel_shape(quantized, axis))


def _channel_shape(weight: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return shape


def _observed_scale(layer: nn.Module, state: LayerState, weight: torch.Tensor, s: torch.Tensor | None):
    """The weight scale of the (folded) weight from the weight observer.

    Per-channel ranges are scale-equivariant (``range(w * s) == |s| * range(w)``), so the
    expensive observers (percentile, MSE search) run on the raw weight once per weight update
    and are rescaled by the BN factor every step.
    """
    spec = state.spec
    if not spec.per_channel or spec.observer == "minmax" or managed_by_fsdp(layer):  # see managed_by_fsdp
        return weight_scale(weight.detach(), state.axis, spec.per_channel, spec.observer, spec.percentile)
    raw = layer.weight
    key = (raw._version, raw.data_ptr(), tuple(raw.shape))
    if state._cache is None or state._cache[0] != key:
        state._cache = (key, weight_scale(raw.detach(), state.axis, True, spec.observer, spec.percentile))
    scale = state._cache[1]
    return scale if s is None else torch.clamp(scale * s.detach().abs(), min=EPS)


def quantization_inputs(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(folded weight, BN factor or None, weight scale) exactly as training fake-quantizes them.

    Used by the forward pass and by ``convert``, so that the INT8 weights are the integers the
    fake-quant model computed with.
    """
    state: LayerState = layer.__dict__[STATE_ATTR]
    weight = layer.weight
    s = bn_factor(state.bn) if state.bn is not None else None
    if s is not None:
        weight = weight * s.reshape(_channel_shape(weight, state.axis))
    if state.spec.learn:
        scale = layer.weight_scale.abs()
        if s is not None and scale.dim() > 0:
            scale = torch.clamp(scale * s.detach().abs(), min=EPS)
    else:
        scale = _observed_scale(layer, state, weight, s)
    return weight, s, scale


def folded_bias(bias: torch.Tensor | None, bn: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The bias of ``conv + BatchNorm`` folded into one conv: ``(b - mean) * s + beta``."""
    shift = bn.bias if bn.bias is not None else torch.zeros_like(s)
    return ((bias if bias is not None else 0.0) - bn.running_mean) * s + shift


@torch.no_grad()
def int8_parameters(
    layer: nn.Module, input_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight in the layer's layout, per-channel scale, float bias) of a fake-quant layer,
    with its BatchNorm folded in and, for a static ``input_scale``, the bias on the int32 grid:
    the numbers the fake-quant forward computes with."""
    state: LayerState = layer.__dict__[STATE_ATTR]
    weight, s, scale = quantization_inputs(layer)
    if scale.dim() == 0:
        scale = scale.expand(weight.shape[state.axis])
    weight_int8 = quantize_weight(weight, scale, state.axis)
    bias = layer.bias
    if state.bn is not None:
        bias = folded_bias(bias, state.bn, s)
    bias = bias_correction.apply(bias, layer, weight.shape[state.axis])
    if bias is not None and input_scale is not None:
        bias = quantize_bias(bias, torch.tensor(input_scale, device=bias.device), scale)
    return weight_int8, scale.clone(), None if bias is None else bias.detach().clone()


def _fake_quant_folded_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(fake-quantized folded weight, BN factor or None, weight scale)."""
    state: LayerState = layer.__dict__[STATE_ATTR]
    weight, s, scale = quantization_inputs(layer)
    if state.spec.learn:
        axis = state.axis if scale.dim() > 0 else None
        return lsq_fake_quantize(weight, scale, None, WEIGHT_QMIN, WEIGHT_QMAX, axis), s, scale
    return fake_quantize_weight(weight, scale, state.axis), s, scale


def fake_quant_weight(layer: nn.Module) -> torch.Tensor:
    """The fake-quantized weight in the layer's own (unfolded) domain."""
    state: LayerState = layer.__dict__[STATE_ATTR]
    quantized, s, _ = _fake_quant_folded_weight(layer)
    return quantized if s is None else _unfold(quantized, s, state.axis)


def folds_now(state: LayerState) -> bool:
    """True when the conv computes ``conv + BatchNorm`` as one folded conv (fake-quant on and
    the BatchNorm on its running statistics: eval mode or frozen); the BatchNorm then passes
    its input through (keeping any activation it runs)."""
    bn = state.bn
    return (
        bn is not None
        and state.weight_fake_quant
        and (not bn.training or bn._slimkit_bn_frozen)
        and norm_remainder(bn) is not None
    )


def _weight_and_bias(layer: nn.Module, state: LayerState) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not state.weight_fake_quant:
        return layer.weight, layer.bias
    if state.bn is not None and not folds_now(state):  # the BatchNorm normalizes with batch stats
        return fake_quant_weight(layer), layer.bias
    weight, s, scale = _fake_quant_folded_weight(layer)
    bias = layer.bias if state.bn is None else folded_bias(layer.bias, state.bn, s)
    bias = bias_correction.apply(bias, layer, weight.shape[state.axis])
    source = state.input_source
    input_scale = None if source is None else source.active_scale()
    if bias is not None and input_scale is not None:
        bias = quantize_bias(bias, input_scale, scale.detach())
    return weight, bias


class QATLayer:
    """Mixin placed in front of a layer's class: fake-quant input and weight, then compute."""

    _slimkit_quant_class = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state: LayerState = self.__dict__[STATE_ATTR]
        # no input quantizer: the input comes quantized from a site (slimkit.quant.sites)
        quantizer = self._modules.get("input_quantizer")
        x = input if quantizer is None else quantizer(input)
        weight, bias = _weight_and_bias(self, state)
        if state.kind == "conv2d":
            return self._conv_forward(x, weight, bias)
        if state.kind == "linear":
            return F.linear(x, weight, bias)
        size_out = x.size()[:-1] + (weight.shape[1],)  # GPT-2 Conv1D: weight is [in, out]
        out = torch.addmm(bias, x.reshape(-1, x.size(-1)), weight)
        return out.view(size_out)


class FreezableBatchNorm:
    """Mixin for a folded BatchNorm: after ``freeze_bn_step`` it uses (and no longer updates)
    its running statistics, also in training mode."""

    _slimkit_quant_class = True
    _slimkit_bn_frozen = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        conv_state = self.__dict__.get(FOLDED_INTO_ATTR)
        folded = self.__dict__.get(NEUTRAL_ATTR) or (conv_state is not None and folds_now(conv_state))
        remainder = norm_remainder(self) if folded else None
        if remainder is not None:  # the conv before it computed the normalization
            return remainder(self, input)
        if self.training and self._slimkit_bn_frozen:
            self.training = False
            try:
                return super().forward(input)
            finally:
                self.training = True
        return super().forward(input)


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


def swap_class(module: nn.Module, mixin: type, prefix: str) -> None:
    original = module.__dict__.get(ORIGINAL_CLASS_ATTR, type(module))
    module.__dict__[ORIGINAL_CLASS_ATTR] = original
    module.__class__ = subclass(mixin, original, prefix)


def restore_class(module: nn.Module) -> None:
    original = module.__dict__.pop(ORIGINAL_CLASS_ATTR, None)
    if original is not None:
        module.__class__ = original


def attach(
    layer: nn.Module,
    kind: str,
    spec: WeightSpec,
    activation_config,
    dynamic: bool,
    learn_activations: bool,
    bn: nn.Module | None,
    own_input: bool = True,
) -> None:
    """Make ``layer`` a fake-quant layer (in place); without ``own_input`` its input comes
    quantized from a site and it gets no input quantizer."""
    state = LayerState(kind=kind, spec=spec, bn=bn)
    device = layer.weight.device
    if own_input:
        quantizer = (
            DynamicActivationQuantizer() if dynamic else ActivationQuantizer(activation_config, learn_activations)
        )
        layer.add_module("input_quantizer", quantizer.to(device))
    if spec.learn:
        # Per channel the learned scale lives in the raw weight's domain (the BN factor is
        # applied on top); per tensor it scales the folded weight.
        weight = layer.weight.detach()
        if bn is not None and not spec.per_channel:
            weight = weight * bn_factor(bn).detach().reshape(_channel_shape(weight, OUT_AXIS[kind]))
        init = weight_scale(weight, OUT_AXIS[kind], spec.per_channel, spec.observer, spec.percentile)
        layer.weight_scale = nn.Parameter(init.to(device))
    layer.__dict__[STATE_ATTR] = state
    swap_class(layer, QATLayer, "QAT")
    if bn is not None:
        swap_class(bn, FreezableBatchNorm, "Folding")
        bn.__dict__[FOLDED_INTO_ATTR] = state
    quantizer = layer._modules.get("input_quantizer")
    state.input_source = quantizer if isinstance(quantizer, ActivationQuantizer) else None


def detach_layer(layer: nn.Module) -> None:
    """Undo :func:`attach` (the layer computes in floating point again)."""
    state: LayerState | None = layer.__dict__.pop(STATE_ATTR, None)
    if "input_quantizer" in layer._modules:
        del layer._modules["input_quantizer"]
    if "weight_scale" in layer._parameters:
        del layer._parameters["weight_scale"]
    bias_correction.detach(layer)
    restore_class(layer)
    if state is not None and state.bn is not None:
        restore_class(state.bn)
        state.bn.__dict__.pop("_slimkit_bn_frozen", None)
        state.bn.__dict__.pop(FOLDED_INTO_ATTR, None)


def is_qat_layer(module: nn.Module) -> bool:
    return STATE_ATTR in module.__dict__


__all__ = [
    "FreezableBatchNorm",
    "LayerState",
    "QATLayer",
    "WeightSpec",
    "attach",
    "bn_factor",
    "detach_layer",
    "fake_quant_weight",
    "folded_bias",
    "int8_parameters",
    "is_qat_layer",
    "quantization_inputs",
]
