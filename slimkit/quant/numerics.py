"""Quantization arithmetic shared by fake-quant (training), calibration and INT8 conversion.

One set of formulas, so that the fake-quant model, the INT8 model and the ONNX model agree:

* activations: 8-bit per tensor, stored as ``uint8`` (what oneDNN and onnxruntime consume).
  Affine: ``scale = (max - min) / 255``, ``zero_point = round(-min / scale)``, the range always
  containing 0 so that zero padding is exact. Symmetric: ``scale = amax / 127.5`` and
  ``zero_point = 128`` (PyTorch's convention for symmetric ``quint8``).
* weights: ``int8`` in ``[-127, 127]``, symmetric (zero-point 0), per output channel or per
  tensor (onnxruntime's and TensorRT's convention); with ``quant.weights.bits: 7``, in
  ``[-63, 63]``. On x86 CPUs without VNNI, oneDNN's (and onnxruntime's) u8 x s8 kernels add
  pairs of products in int16 (``vpmaddubsw``), which saturates once ``2 * 255 * |w|`` passes
  32767: measured on an AVX2 EPYC, 8-bit weights against uint8 inputs gave 6-21% relative error
  on random data and 2% on a trained CNN's logits, and results that changed with the thread
  count; 7-bit weights compute exactly there (``slimkit.quant.int8_hardware``).
* biases of layers with static inputs: on the int32 grid ``input_scale * weight_scale``, as
  onnxruntime's int8 kernels add them to the int32 accumulator.
"""

from __future__ import annotations

import torch

ACT_QMIN, ACT_QMAX = 0, 255
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # 8-bit weights; weight_qmax(bits) for others
SYMMETRIC_ACT_ZERO_POINT = 128
INT32_LIMIT = 2**31 - 1
EPS = torch.finfo(torch.float32).eps


def activation_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) of a uint8 per-tensor quantizer for a range."""
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / ((ACT_QMAX - ACT_QMIN) / 2), min=EPS)
        zero_point = torch.full_like(scale, SYMMETRIC_ACT_ZERO_POINT, dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((max_pos - min_neg) / (ACT_QMAX - ACT_QMIN), min=EPS)
    zero_point = torch.clamp(ACT_QMIN - torch.round(min_neg / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale, zero_point


def weight_qmax(bits: int) -> int:
    """The largest symmetric weight level for ``bits`` (8: 127, 7: 63)."""
    return 2 ** (bits - 1) - 1


def weight_scale_from_amax(amax: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Symmetric int8 scale for a per-channel (or per-tensor) absolute maximum."""
    return torch.clamp(amax.float() / qmax, min=EPS)


def quantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, axis: int | None, qmax: int = WEIGHT_QMAX
) -> torch.Tensor:
    """int8 weights in ``[-qmax, qmax]`` for ``scale``: one per channel along ``axis``, a scalar,
    or (``axis=None``) any shape that broadcasts against ``weight`` (an embedding's per-row
    ``[..., 1]``)."""
    if scale.dim() == 0 or axis is None:
        scaled = weight / scale
    else:
        shape = [1] * weight.dim()
        shape[axis] = -1
        scaled = weight / scale.reshape(shape)
    return torch.clamp(torch.round(scaled), -qmax, qmax).to(torch.int8)


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``bias`` on the int32 grid of ``input_scale * weight_scale`` (per output channel), with a
    straight-through gradient.

    onnxruntime's QLinearConv / QGemm add the bias to the int32 accumulator, so they round a
    float bias to that grid (``round(b / (sx * sw))``); the fake-quant and INT8 models use the
    same rounded bias, so that all three compute the same integers.
    """
    step = input_scale.float() * weight_scale.float()
    levels = torch.clamp(torch.round(bias / step), -INT32_LIMIT, INT32_LIMIT)
    return bias + (levels * step - bias).detach()


def quantize_activation(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> torch.Tensor:
    """uint8 activations: ``round(x * (1 / scale)) + zero_point``, rounded half to even.

    Multiplying by the reciprocal (not dividing) is what PyTorch's fake-quant kernels and the
    ``quantized_decomposed`` ops that compiled and exported graphs run compute, so the eager
    INT8 layers, the traced ones and the fake-quant model round every value the same way.
    """
    # in place on the one new tensor: the same values in half the time of four fresh tensors
    # (on MiniLM's eager INT8 model these passes took a third of the forward)
    q = torch.mul(x, 1.0 / scale)
    q.round_()
    q.add_(zero_point)
    q.clamp_(ACT_QMIN, ACT_QMAX)
    return q.to(torch.uint8)


def dynamic_activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch affine uint8 qparams (scale float32, zero_point int32), the formula of
    onnxruntime's DynamicQuantizeLinear: the one copy that dynamic fake-quant, the eager and the
    traced INT8 layers use. ``min`` / ``max`` rather than ``aminmax``: the ONNX exporter
    translates those (ReduceMin / ReduceMax)."""
    x = x.detach()
    return activation_qparams(x.min(), x.max(), symmetric=False)


# ----------------------------------------------------------------------------------------
# fake quantization with straight-through gradients
# ----------------------------------------------------------------------------------------


def keep_nonfinite(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` with ``x``'s NaN / inf values put back: PyTorch's fake-quant kernels clamp
    them to finite grid values, which would hide a diverged input or weight behind plausible
    numbers (and a finite loss)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # One reduction instead of a mask, a select and the select's backward on every
        # activation: QAT's step cost over a plain one fell from 1.69x to 1.31x on resnet18 and
        # from 1.37x to 1.17x on MiniLM (2-core CPU). min and max propagate NaN; a CPU tensor's
        # values are at hand, so the branch costs no device sync (traced graphs keep the select).
        if x.numel() == 0:
            return quantized
        lo, hi = torch.aminmax(x.detach())
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return quantized
    return torch.where(torch.isfinite(x), quantized, x)


class _MaskedStraightThrough(torch.autograd.Function):
    """PyTorch's fused fake-quant kernel forward (values and the in-range mask in one pass),
    with a backward that selects the gradient by the mask. PyTorch's own backward multiplies by
    the boolean mask, which first casts it to a float tensor the size of the activation: on a
    resnet18 QAT step that cast and product were a tenth of the step on CPU. Same values, same
    gradients (tested against ``torch.fake_quantize_per_*_affine``)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax):
        if axis is None:
            enabled = torch.ones((), dtype=torch.long, device=x.device)
            out, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, scale, zero_point, enabled, qmin, qmax
            )
        else:
            out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, scale, zero_point, axis, qmin, qmax
            )
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None, None, None, None


def _fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, qmin: int, qmax: int
) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _MaskedStraightThrough.apply(x, scale, zero_point, axis, qmin, qmax)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-tensor uint8 fake-quant; gradient 1 inside the clipping range and 0 outside; NaN and
    inf pass through unchanged."""
    return keep_nonfinite(x, _fake_quantize(x, scale, zero_point, None, ACT_QMIN, ACT_QMAX))


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, axis: int, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Symmetric fake-quant of weights to ``[-qmax, qmax]``, per channel along ``axis`` (or per
    tensor for a 0-dim scale); straight-through gradient, 0 outside the clipping range; NaN /
    inf kept."""
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    return keep_nonfinite(w, _fake_quantize(w, scale, zero, None if scale.dim() == 0 else axis, -qmax, qmax))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's gradient scaling)."""
    return x * factor + (x - x * factor).detach()


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quant with learned scale (and zero-point): LSQ (Esser et al. 2020) and LSQ+.

    Gradients: ``x`` gets the straight-through estimator (1 inside the range, 0 outside);
    ``scale`` gets ``round(x/s) - x/s`` inside and the clipping bound outside, scaled by
    ``1 / sqrt(numel_per_scale * qmax)``; ``zero_point`` (rounded with STE) gets ``-scale``
    where ``x`` is clipped and 0 inside.
    """
    per_scale = x.numel() // max(scale.numel(), 1)
    factor = 1.0 / float(per_scale * qmax) ** 0.5
    s = _scale_grad(scale.abs().clamp_min(EPS), factor)
    if axis is not None and s.dim() > 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    if zero_point is None:
        q = torch.clamp(_round_ste(x / s), qmin, qmax)
        return keep_nonfinite(x, q * s)
    zp = _round_ste(torch.clamp(_scale_grad(zero_point, factor), qmin, qmax))
    q = torch.clamp(_round_ste(x / s) + zp, qmin, qmax)
    return keep_nonfinite(x, (q - zp) * s)
