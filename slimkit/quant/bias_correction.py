"""Bias correction (``quant.bias_correction``; Nagel et al. 2019, empirical form).

Rounding a layer's weights to int8 adds an error ``e = q(W) - W`` whose expected effect on
the output, ``E[conv(x, e)]`` per output channel, is rarely zero: per-tensor grids in
particular shift some channels' outputs, and the shifts add up through the network. During
:func:`slimkit.calibrate` each quantized layer also computes ``conv(x, e)`` (or
``linear(x, e)``) on the calibration inputs it receives and averages it per output channel;
the average is subtracted from the layer's (BatchNorm-folded) bias by the fake-quant forward
and by the INT8 conversion. It lives in a ``bias_correction`` buffer of the fake-quant layer
(``state_dict``, so checkpoints keep it) and ends up inside the int8 layer's ``bias``.

Usable alone (PTQ) or before QAT (calibrate, then train: the correction stays as calibrated
and training adapts around it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BUFFER = "bias_correction"


class _Mean:
    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor, count: int) -> None:
        self.total = values if self.total is None else self.total + values
        self.count += count


def _weight_error(layer: nn.Module) -> torch.Tensor:
    """``q(W) - W`` of the folded weight, in the weight's own layout."""
    from .qat import _fake_quant_folded_weight, quantization_inputs

    weight, _, _ = quantization_inputs(layer)
    quantized, _, _ = _fake_quant_folded_weight(layer)
    return (quantized - weight).detach()


def _output_shift(layer: nn.Module, kind: str, x: torch.Tensor, error: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel of ``layer(x)`` computed with weights ``error``."""
    if kind == "conv2d":
        out = F.conv2d(x, error, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return out.sum(dim=(0, 2, 3)), out.shape[0] * out.shape[2] * out.shape[3]
    if kind == "linear":
        out = F.linear(x, error)
    else:  # GPT-2 Conv1D: weight [in, out]
        out = x @ error
    flat = out.reshape(-1, out.shape[-1])
    return flat.sum(dim=0), flat.shape[0]


class BiasCorrection:
    """Collects the output shift of every layer during one calibration, then stores it."""

    def __init__(self, layers: dict[str, nn.Module], kinds: dict[str, str]) -> None:
        self.layers = layers
        self.kinds = kinds
        self.means = {name: _Mean() for name in layers}
        self.errors: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> BiasCorrection:
        for name, layer in self.layers.items():
            self.errors[name] = _weight_error(layer)
            self.handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                shift, count = _output_shift(module, self.kinds[name], args[0].float(), self.errors[name])
                self.means[name].add(shift.detach(), count)

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if exc[0] is not None:
            return
        for name, layer in self.layers.items():
            mean = self.means[name]
            if mean.total is not None and mean.count:
                set_correction(layer, mean.total / mean.count)


def set_correction(layer: nn.Module, correction: torch.Tensor) -> None:
    """Store (replacing) the layer's bias correction, to be subtracted from its bias."""
    correction = correction.detach().float().to(layer.weight.device)
    if BUFFER in layer._buffers:
        layer._buffers[BUFFER].copy_(correction)
    else:
        layer.register_buffer(BUFFER, correction)


def correction_of(layer: nn.Module) -> torch.Tensor | None:
    return layer._buffers.get(BUFFER)


def apply(bias: torch.Tensor | None, layer: nn.Module, out_channels: int) -> torch.Tensor | None:
    """``bias - correction`` (a zero bias first if the layer has none), or ``bias`` unchanged."""
    correction = correction_of(layer)
    if correction is None:
        return bias
    if bias is None:
        bias = torch.zeros(out_channels, device=correction.device)
    return bias - correction


def detach(layer: nn.Module) -> None:
    layer._buffers.pop(BUFFER, None)


__all__ = ["BiasCorrection", "apply", "correction_of", "detach", "set_correction"]
