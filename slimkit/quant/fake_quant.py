"""The activation quantizer each quantized layer owns as its ``input_quantizer`` child.

It observes the layer's input (while the schedule says so), holds the current scale and
zero-point, and fake-quantizes the input. Its state is 0-dim buffers (and the observer's
histogram), kept in a child module so that pruning, which slices the per-output-channel
tensors of the layer itself, never touches it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..recipe import ActivationQuantConfig
from .numerics import (
    ACT_QMAX,
    ACT_QMIN,
    activation_qparams,
    dynamic_activation_qparams,
    fake_quantize_activation,
    lsq_fake_quantize,
)
from .observers import make_observer


class ActivationQuantizer(nn.Module):
    """Static per-tensor uint8 fake-quant of a layer's input, with an observer.

    ``observe`` and ``fake_quant`` are set by the schedule; ranges only update in training
    mode (or inside :func:`slimkit.calibrate`), so evaluating a QAT model never moves them.
    With ``learn`` the scale and zero-point are parameters (LSQ / LSQ+), initialised from the
    observer (calibration or the first QAT batches) and then trained.
    """

    def __init__(self, config: ActivationQuantConfig, learn: bool = False) -> None:
        super().__init__()
        self.symmetric = config.symmetric
        self.learn = learn
        self.observer = make_observer(config.observer, config.percentile, config.averaging_constant)
        scale, zero_point = torch.ones(()), torch.zeros((), dtype=torch.int32)
        if learn:
            self.scale = nn.Parameter(scale)
            self.zero_point = nn.Parameter(zero_point.float(), requires_grad=not self.symmetric)
            # Learned qparams start from the observer once, then only gradients move them.
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        self.observe = False
        self.fake_quant = False
        self.calibrating = False

    @property
    def has_range(self) -> bool:
        """True once the observer saw data (or learned qparams were initialised)."""
        if self.learn and bool(self.initialized):
            return True
        return self.observer.has_data

    def extra_repr(self) -> str:
        kind = type(self.observer).__name__
        return f"{kind}, symmetric={self.symmetric}, learn={self.learn}, fake_quant={self.fake_quant}"

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute scale / zero-point from the observer (learned ones only until initialised)."""
        if not self.observer.has_data:
            return
        if self.learn and bool(self.initialized) and not self.calibrating:
            return
        scale, zero_point = activation_qparams(*self.observer.range(), self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.to(self.zero_point.dtype))
        if self.learn:
            self.initialized.fill_(True)

    def active_scale(self) -> torch.Tensor | None:
        """The scale this quantizer fake-quantizes with now (no gradient), or None while it
        passes its input through (float phase, no range yet)."""
        if not self.fake_quant or not self.has_range:
            return None
        return self.scale.detach().abs() if self.learn else self.scale

    def qparams(self) -> tuple[float, int]:
        """The scale and zero-point INT8 conversion uses (learned ones rounded like in training)."""
        scale = float(self.scale.detach().abs()) if self.learn else float(self.scale)
        zero_point = self.zero_point.detach()
        if self.learn:
            zero_point = torch.clamp(torch.round(zero_point), ACT_QMIN, ACT_QMAX)
        return scale, int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.observe and self.training) or self.calibrating:
            self.observer.update(x)
            self.refresh()
        if not self.fake_quant or not self.has_range:
            return x
        if self.learn:
            if self.symmetric:  # uint8 with the fixed zero-point 128 == int8 around 0
                return lsq_fake_quantize(x, self.scale, None, ACT_QMIN - 128, ACT_QMAX - 128)
            return lsq_fake_quantize(x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX)
        return fake_quantize_activation(x, self.scale, self.zero_point)


class DynamicActivationQuantizer(nn.Module):
    """Per-batch uint8 fake-quant (``mode: dynamic``): the range of every input is its own,
    exactly as the dynamic INT8 kernels compute it at inference."""

    def __init__(self) -> None:
        super().__init__()
        self.fake_quant = False
        self.calibrating = False

    has_range = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant:
            return x
        scale, zero_point = dynamic_activation_qparams(x)
        return fake_quantize_activation(x, scale, zero_point)
