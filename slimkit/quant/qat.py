"""Fake-quant layers, made by swapping a layer's class in place.

``prepare`` turns an ``nn.Conv2d`` into a ``QATConv2d`` (a subclass of its own class) by
assigning ``module.__class__``: the module object, its Parameters and every reference to it
stay the same, so pruning (which holds those references and slices them at convert time),
the optimizer and hooks keep working. What QAT adds lives on the layer:

* ``input_quantizer``: a child module with the activation observer and qparams;
* ``weight_scale``: only with ``learn_scales``, the learned weight scale(s), one per output
  channel with leading dimension == out_channels (so pruning slices it with the weight).

What slimkit knows of the layer besides its tensors is its :class:`~.state.LayerState`
(``state_of(layer).layer``).

BatchNorm folding (:mod:`.fold`): when a conv's only consumer is a BatchNorm, the conv
fake-quantizes the *folded* weight ``w * s`` (``s = gamma / sqrt(running_var + eps)``) and
divides the result by ``s`` again, so the BatchNorm that follows still sees unfolded outputs and
trains on batch statistics; from ``freeze_bn_step`` on it uses its running statistics and the
pair computes exactly the folded int8 conv that ``convert`` builds (Krishnamoorthi 2018,
section 3.2). The division happens on the weight, not on the output, so folding costs no
activation-sized work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import managed_by_fsdp
from . import bias_correction, fold
from .fake_quant import ActivationQuantizer, DynamicActivationQuantizer
from .fold import bn_factor, channel_shape, folded_bias, folds_now
from .layers import OUT_AXIS
from .numerics import (
    EPS,
    fake_quantize_weight,
    lsq_fake_quantize,
    quantize_bias,
    quantize_weight,
)
from .observers import weight_scale
from .state import (
    LayerState,
    QuantMixin,
    WeightSpec,
    attach_state,
    clear,
    restore_class,
    state_of,
    swap_class,
    version_of,
)


def layer_state(layer: nn.Module) -> LayerState:
    return state_of(layer).layer


def _observed_scale(layer: nn.Module, state: LayerState, weight: torch.Tensor, s: torch.Tensor | None):
    """The weight scale of the (folded) weight from the weight observer.

    Per-channel ranges are scale-equivariant (``range(w * s) == |s| * range(w)``), so the
    expensive observers (percentile, MSE search) run on the raw weight once per weight update
    and are rescaled by the BN factor every step.
    """
    spec = state.spec
    axis = OUT_AXIS[state.kind]
    if not spec.per_channel or spec.observer == "minmax" or managed_by_fsdp(layer):  # see managed_by_fsdp
        return weight_scale(weight.detach(), axis, spec.per_channel, spec.observer, spec.percentile, spec.qmax)
    raw = layer.weight
    key = (version_of(raw), raw.data_ptr(), tuple(raw.shape))
    if state.weight_cache is None or state.weight_cache[0] != key:
        state.weight_cache = (key, weight_scale(raw.detach(), axis, True, spec.observer, spec.percentile, spec.qmax))
    scale = state.weight_cache[1]
    return scale if s is None else torch.clamp(scale * s.detach().abs(), min=EPS)


def quantization_inputs(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(folded weight, BN factor or None, weight scale) exactly as training fake-quantizes them.

    Used by the forward pass and by ``convert``, so that the INT8 weights are the integers the
    fake-quant model computed with.
    """
    state = layer_state(layer)
    weight = layer.weight
    s = bn_factor(state.bn) if state.bn is not None else None
    if s is not None:
        weight = weight * s.reshape(channel_shape(weight, OUT_AXIS[state.kind]))
    if state.spec.learn:
        scale = layer.weight_scale.abs()
        if s is not None and scale.dim() > 0:
            scale = torch.clamp(scale * s.detach().abs(), min=EPS)
    else:
        scale = _observed_scale(layer, state, weight, s)
    return weight, s, scale


@torch.no_grad()
def int8_parameters(
    layer: nn.Module, input_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight in the layer's layout, per-channel scale, float bias) of a fake-quant layer,
    with its BatchNorm folded in and, for a static ``input_scale``, the bias on the int32 grid:
    the numbers the fake-quant forward computes with."""
    state = layer_state(layer)
    weight, s, scale = quantization_inputs(layer)
    if scale.dim() == 0:
        scale = scale.expand(weight.shape[OUT_AXIS[state.kind]])
    weight_int8 = quantize_weight(weight, scale, OUT_AXIS[state.kind], state.spec.qmax)
    bias = layer.bias
    if state.bn is not None:
        bias = folded_bias(bias, state.bn, s)
    bias = bias_correction.apply(bias, layer, weight.shape[OUT_AXIS[state.kind]])
    if bias is not None and input_scale is not None:
        bias = quantize_bias(bias, torch.tensor(input_scale, device=bias.device), scale)
    return weight_int8, scale.clone(), None if bias is None else bias.detach().clone()


def _fake_quant_folded_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(fake-quantized folded weight, BN factor or None, weight scale)."""
    state = layer_state(layer)
    weight, s, scale = quantization_inputs(layer)
    if state.spec.learn:
        axis = OUT_AXIS[state.kind] if scale.dim() > 0 else None
        return lsq_fake_quantize(weight, scale, None, -state.spec.qmax, state.spec.qmax, axis), s, scale
    return fake_quantize_weight(weight, scale, OUT_AXIS[state.kind], state.spec.qmax), s, scale


def fake_quant_weight(layer: nn.Module) -> torch.Tensor:
    """The fake-quantized weight in the layer's own (unfolded) domain."""
    state = layer_state(layer)
    quantized, s, _ = _fake_quant_folded_weight(layer)
    return quantized if s is None else fold.unfold(quantized, s, OUT_AXIS[state.kind])


def _weight_and_bias(layer: nn.Module, state: LayerState) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not state.weight_fake_quant:
        return layer.weight, layer.bias
    if state.held is not None:
        return state.held
    if state.bn is not None and not folds_now(state):  # the BatchNorm normalizes with batch stats
        return fake_quant_weight(layer), layer.bias
    weight, s, scale = _fake_quant_folded_weight(layer)
    bias = layer.bias if state.bn is None else folded_bias(layer.bias, state.bn, s)
    bias = bias_correction.apply(bias, layer, weight.shape[OUT_AXIS[state.kind]])
    source = state.input_source
    input_scale = None if source is None else source.active_scale()
    if bias is not None and input_scale is not None:
        bias = quantize_bias(bias, input_scale, scale.detach())
    return weight, bias


@contextlib.contextmanager
def held_weights(layers: list[nn.Module]) -> Iterator[None]:
    """Fake-quantize each layer's weight (and bias grid) once and reuse it for every forward of
    the block: for many evaluation passes of an unchanged model (``quant.keep_fp32``), where
    re-quantizing every weight on every pass would cost as much as the passes. Eval mode and no
    gradients only: nothing may change a weight, a BatchNorm or a range meanwhile."""
    states = [layer_state(layer) for layer in layers]
    with torch.no_grad():
        for layer, state in zip(layers, states):
            if state.weight_fake_quant:
                state.held = tuple(t if t is None else t.detach() for t in _weight_and_bias(layer, state))
    try:
        yield
    finally:
        for state in states:
            state.held = None


class QATLayer(QuantMixin):
    """Mixin placed in front of a layer's class: fake-quant input and weight, then compute."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state = layer_state(self)
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
            weight = weight * bn_factor(bn).detach().reshape(channel_shape(weight, OUT_AXIS[kind]))
        init = weight_scale(weight, OUT_AXIS[kind], spec.per_channel, spec.observer, spec.percentile, spec.qmax)
        layer.weight_scale = nn.Parameter(init.to(device))
    swap_class(layer, QATLayer, "QAT")
    attach_state(layer).layer = state
    if bn is not None:
        fold.attach(bn, state)
    quantizer = layer._modules.get("input_quantizer")
    state.input_source = quantizer if isinstance(quantizer, ActivationQuantizer) else None


def detach_layer(layer: nn.Module) -> None:
    """Undo :func:`attach` (the layer computes in floating point again)."""
    state: LayerState | None = clear(layer, "layer")
    if "input_quantizer" in layer._modules:
        del layer._modules["input_quantizer"]
    if "weight_scale" in layer._parameters:
        del layer._parameters["weight_scale"]
    bias_correction.detach(layer)
    restore_class(layer)
    if state is not None and state.bn is not None:
        fold.detach(state.bn)


def is_qat_layer(module: nn.Module) -> bool:
    state = state_of(module)
    return state is not None and state.layer is not None


__all__ = [
    "QATLayer",
    "attach",
    "detach_layer",
    "fake_quant_weight",
    "int8_parameters",
    "is_qat_layer",
    "layer_state",
    "quantization_inputs",
]
