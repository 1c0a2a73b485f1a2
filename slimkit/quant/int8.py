"""INT8 layers: int8 weights + scales as tensors, computed by oneDNN's int8 kernels.

``convert`` swaps each fake-quant layer's class in place to an INT8 subclass of its original
class (``nn.Conv2d`` -> ``Int8Conv2d``, ...), so the model keeps its own class and every
module keeps its name. State (all plain tensors, no quantized dtypes, saved as-is by
safetensors):

* ``weight``: ``int8`` (Linear layout ``[out, in]`` also for GPT-2's Conv1D);
* ``weight_scale``: ``float32 [out]``, symmetric (zero-point 0);
* ``bias``: ``float32 [out]`` (the folded BatchNorm's shift included);
* ``input_scale`` / ``input_zero_point``: the uint8 input's qparams (absent for dynamic layers,
  which compute them per batch).

Two execution paths with identical numerics:

* eager: ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` with weights prepacked
  once by ``qconv_prepack`` / ``qlinear_prepack`` (u8 x s8 -> s32 accumulate -> fp32 out, VNNI
  on x86); only the input quantization is a separate elementwise pass.
* traced (``torch.compile`` via :func:`slimkit.quant.compile_int8`, ``torch.export`` /
  :func:`slimkit.export_onnx`): the reference pattern ``dequantize(quantize(x))`` ->
  ``conv/linear(dequantize(w_int8))`` with PyTorch's ``quantized_decomposed`` ops. Inductor
  (with torchao's x86 passes) lowers it to the same oneDNN int8 kernels with ReLU / add /
  requantization fused, and the ONNX exporter writes it as QuantizeLinear / DequantizeLinear
  (QDQ), which onnxruntime runs as QLinearConv / QLinearMatMul.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleError
from . import int8_hardware
from .numerics import ACT_QMAX, ACT_QMIN, WEIGHT_QMAX, WEIGHT_QMIN, dynamic_activation_qparams, quantize_activation
from .sites import prepare_sites_for_tracing
from .state import Int8LayerState, QuantMixin, attach_state, state_of, subclass, version_of


def load_decomposed_ops():
    """PyTorch's ``quantized_decomposed`` ops (the PT2E quantize / dequantize vocabulary that
    Inductor lowers and the ONNX exporter translates); registered on first import."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


def int8_engine_problem() -> str | None:
    """Why oneDNN's int8 kernels cannot run here, or None when they can."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return f"this CPU is {platform.machine()}, not x86"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not hasattr(torch.ops.onednn, "qconv2d_pointwise") or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this PyTorch build lacks the oneDNN int8 ops (onednn.qconv2d_pointwise, qlinear_pointwise)"
    return None


def require_int8_engine(what: str = "INT8 conversion") -> None:
    problem = int8_engine_problem()
    if problem is not None:
        raise IncompatibleError(
            f"{what} needs the oneDNN x86 int8 engine ('onednn'), which is missing: {problem}. "
            "Export the fake-quant model with slimkit.export_onnx and run it on onnxruntime instead, "
            "or convert on an x86 machine with a standard PyTorch build."
        )


def int8_state(layer: nn.Module) -> Int8LayerState | None:
    state = state_of(layer)
    return None if state is None else state.int8


class Int8Layer(QuantMixin):
    """Mixin placed in front of a Conv2d / Linear / transposed Linear class."""

    # -- qparams and prepacked weights (cached, never copied; rebuilt when any tensor changes) --
    def _input_qparams(self) -> tuple[float, int]:
        cache = int8_state(self).cache
        scale, zero_point = self.input_scale, self.input_zero_point
        key = (version_of(scale), version_of(zero_point), scale.data_ptr())
        if cache.qparams is None or cache.qparams[0] != key:
            cache.qparams = (key, (float(scale), int(zero_point)))
        return cache.qparams[1]

    def _packed(self, x_scale: float, x_zero_point: int, x_shape: list[int] | None) -> torch.Tensor:
        state = int8_state(self)
        w = self.weight
        key = (version_of(w), w.data_ptr(), version_of(self.weight_scale), x_scale, x_zero_point)
        cached = state.cache.packed
        if cached is None or cached[0] != key:
            cached = state.cache.packed = (key, self._prepack(w, self.weight_scale, x_scale, x_zero_point, x_shape))
        return cached[1]

    def _prepack(self, w: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero_point: int, x_shape):
        if int8_state(self).kind == "conv2d":
            return torch.ops.onednn.qconv_prepack(
                w,
                w_scale,
                x_scale,
                x_zero_point,
                self._kernel_stride(),
                list(self.padding),
                list(self.dilation),
                self.groups,
                x_shape,
            )
        return torch.ops.onednn.qlinear_prepack(w, None)

    def _split(self, x_scale: float, x_zero_point: int) -> tuple | None:
        """On a CPU whose int8 kernels saturate (:mod:`.int8_hardware`), weights beyond 7 bits as
        two exact halves: ``w = 2 * high + low`` with ``high = floor(w / 2)`` in [-64, 63] and
        ``low`` in {0, 1}, so ``W x = high (2 s) x + low s x``; (packed high, packed low, 2 s),
        or None where one kernel call is exact (costs a second call per such layer)."""
        state = int8_state(self)
        w = self.weight
        key = (version_of(w), w.data_ptr(), version_of(self.weight_scale), x_scale, x_zero_point)
        if state.cache.split is None or state.cache.split[0] != key:
            parts = None
            if int8_hardware.saturating_cpu() and w.numel() and int(w.abs().amax()) > int8_hardware.EXACT_QMAX:
                high = torch.div(w, 2, rounding_mode="floor")
                low = w - 2 * high
                double = self.weight_scale * 2
                parts = (
                    self._prepack(high, double, x_scale, x_zero_point, None),
                    self._prepack(low, self.weight_scale, x_scale, x_zero_point, None),
                    double,
                )
            state.cache.split = (key, parts)
        return state.cache.split[1]

    def extra_repr(self) -> str:
        state = int8_state(self)
        mode = "dynamic" if state.dynamic else "static"
        return f"{super().extra_repr()}, int8={state.kind}, activations={mode}"

    def _subsamples(self) -> bool:
        """A strided 1x1 convolution without padding, run as its stride-1 convolution on the
        subsampled input (the same values) where oneDNN's strided int8 1x1 kernel races
        (:func:`.int8_hardware.strided_1x1_races`). Decided once per layer (every call asks)."""
        cache = int8_state(self).cache
        if cache.subsample is None:
            strided = int8_state(self).kind == "conv2d" and tuple(self.stride) != (1, 1)
            plain = strided and tuple(self.kernel_size) == (1, 1) and tuple(self.padding) == (0, 0)
            cache.subsample = plain and self.groups == 1 and int8_hardware.strided_1x1_races()
        return cache.subsample

    def _kernel_stride(self) -> list[int]:
        return [1, 1] if self._subsamples() else list(self.stride)

    def _subsampled(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride[0], :: self.stride[1]].contiguous(memory_format=torch.channels_last)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._reference_forward(input)
        return self._onednn_forward(input)

    def _onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        state = int8_state(self)
        if state.kind == "conv2d":
            x_scale, x_zp = self._input_qparams()
            qx = quantize_activation(x, x_scale, x_zp)
            if self._subsamples():
                qx = self._subsampled(qx)

            def conv(packed, w_scale, bias):
                return torch.ops.onednn.qconv2d_pointwise(
                    qx, x_scale, x_zp, packed, w_scale, self.weight_zero_point, bias, self._kernel_stride(),
                    list(self.padding), list(self.dilation), self.groups, 1.0, 0, torch.float32, "none", [], "",
                )  # fmt: skip

            split = self._split(x_scale, x_zp)
            if split is not None:
                return conv(split[0], split[2], self.bias) + conv(split[1], self.weight_scale, None)
            return conv(self._packed(x_scale, x_zp, None), self.weight_scale, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if state.dynamic:  # this batch's own range, as tensors (the .tensor overload)
            x_scale, x_zp = dynamic_activation_qparams(x2)
            qx = quantize_activation(x2, x_scale, x_zp)
            linear, packed = torch.ops.onednn.qlinear_pointwise.tensor, self._packed(0.0, 0, None)
            split = self._split(0.0, 0)
        else:
            x_scale, x_zp = self._input_qparams()
            qx = quantize_activation(x2, x_scale, x_zp)
            linear, packed = torch.ops.onednn.qlinear_pointwise, self._packed(x_scale, x_zp, None)
            split = self._split(x_scale, x_zp)

        def run(packed, w_scale, bias):
            return linear(
                qx, x_scale, x_zp, packed, w_scale, self.weight_zero_point, bias, 1.0, 0, torch.float32, "none", [], ""
            )

        if split is not None:  # see _split
            out = run(split[0], split[2], self.bias) + run(split[1], self.weight_scale, None)
        else:
            out = run(packed, self.weight_scale, self.bias)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """quantize -> dequantize -> fp32 op on dequantized int8 weights: the pattern Inductor
        lowers to oneDNN int8 kernels and the ONNX exporter writes as QDQ."""
        qd = load_decomposed_ops()
        state = int8_state(self)
        # compiled, the same kernel would race: a stride-1 conv whose output is subsampled (the
        # input subsampled instead breaks Inductor's dequantize -> conv pattern where a site feeds
        # it: 17 of resnet18's 20 convs lowered; this way all 20 are, at 4x the work of its three
        # 1x1 downsample convs)
        subsample = state.trace_subsample and not torch.compiler.is_exporting()
        if state.dynamic:
            if torch.compiler.is_exporting():  # one op, written to ONNX as DynamicQuantizeLinear
                x = torch.ops.slimkit.dynamic_qdq_uint8(x)
            else:
                scale, zero_point = dynamic_activation_qparams(x)
                q = qd.quantize_per_tensor.tensor(x, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)
                x = qd.dequantize_per_tensor.tensor(q, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)
        elif not state.input_from_site:
            x_scale, x_zp = state.trace_qparams
            q = qd.quantize_per_tensor(x, x_scale, x_zp, ACT_QMIN, ACT_QMAX, torch.uint8)
            x = qd.dequantize_per_tensor(q, x_scale, x_zp, ACT_QMIN, ACT_QMAX, torch.uint8)
        w = qd.dequantize_per_channel(
            self.weight,
            self.weight_scale,
            self.weight_zero_point,
            0,
            WEIGHT_QMIN - 1,
            WEIGHT_QMAX,
            torch.int8,
        )
        if state.kind == "conv2d":
            if subsample:
                return F.conv2d(x, w, self.bias, 1, 0, self.dilation, 1)[:, :, :: self.stride[0], :: self.stride[1]]
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        bias = self.bias
        if state.trace_bias is not None and x.dim() == 2 and torch.compiler.is_exporting():
            # onnxruntime fuses DQ -> Gemm into QGemm only when the bias is int32 behind its own
            # DequantizeLinear, as onnxruntime's quantize_static writes it; with a float bias the
            # Gemm runs in fp32 on weights dequantized at every call (5% of resnet50's batch-1 time)
            bias_int32, bias_scale = state.trace_bias
            bias = qd.dequantize_per_channel(
                bias_int32, bias_scale, torch.zeros_like(bias_int32), 0, INT32_MIN, INT32_MAX, torch.int32
            )
        return F.linear(x, w, bias)


@torch.library.custom_op("slimkit::dynamic_qdq_uint8", mutates_args=())
def dynamic_qdq_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantize to uint8 with the input's own range, then dequantize (ONNX:
    DynamicQuantizeLinear + DequantizeLinear, which onnxruntime fuses with the MatMul)."""
    scale, zero_point = dynamic_activation_qparams(x)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


@dynamic_qdq_uint8.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def prepare_for_tracing(model: nn.Module) -> None:
    """Store every static INT8 layer's input qparams as Python numbers: a traced graph must
    see them as constants (what Inductor's int8 patterns and ONNX QuantizeLinear expect); the
    same for the sites between layers."""
    for module in model.modules():
        state = int8_state(module)
        if state is not None:  # a function call while tracing would break the graph
            state.trace_subsample = module._subsamples()
        if state is not None and not state.dynamic:
            state.trace_qparams = module._input_qparams()
            state.trace_bias = _int32_bias(module, state.trace_qparams[0]) if state.kind != "conv2d" else None
    prepare_sites_for_tracing(model)


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _int32_bias(layer: nn.Module, input_scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bias rounded to int32 at scale ``input_scale * weight_scale`` (the accumulator's
    scale), or None where that scale is zero or the bias would not fit: those keep a float bias."""
    scale = (input_scale * layer.weight_scale.double()).float()
    if not bool((scale > 0).all()):
        return None
    quantized = torch.round(layer.bias.double() / scale.double())
    if not bool(quantized.abs().le(INT32_MAX).all()):
        return None
    return quantized.to(torch.int32), scale


def is_int8_layer(module: nn.Module) -> bool:
    return int8_state(module) is not None


def make_int8(
    layer: nn.Module,
    kind: str,
    original_class: type,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_qparams: tuple[float, int] | None,
    input_from_site: bool = False,
) -> None:
    """Turn ``layer`` (in place) into an INT8 layer of ``original_class``'s family.

    ``weight_int8`` is in the layer's own layout; GPT-2 Conv1D weights are stored transposed to
    the Linear layout ``[out, in]`` that the kernels take.
    """
    device = weight_int8.device
    out = weight_int8.shape[1] if kind == "conv1d" else weight_int8.shape[0]
    if kind == "conv1d":
        weight_int8 = weight_int8.t()
    for name in ("weight", "bias", "weight_scale"):
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)
    layer.__dict__.pop("weight", None)
    layer.register_buffer("weight", weight_int8.contiguous())
    layer.register_buffer("weight_scale", weight_scale.detach().float().reshape(out).contiguous())
    layer.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int64, device=device), persistent=False)
    bias = torch.zeros(out, device=device) if bias is None else bias.detach().float()
    layer.register_buffer("bias", bias.contiguous())
    if input_qparams is not None:
        scale, zero_point = input_qparams
        layer.register_buffer("input_scale", torch.tensor(float(scale), device=device))
        layer.register_buffer("input_zero_point", torch.tensor(int(zero_point), dtype=torch.int32, device=device))
    from_site = bool(input_from_site and input_qparams is not None)
    attach_state(layer).int8 = Int8LayerState(kind, dynamic=input_qparams is None, input_from_site=from_site)
    layer.__class__ = subclass(Int8Layer, original_class, "Int8")


def empty_int8_like(layer: nn.Module, kind: str, dynamic: bool, input_from_site: bool = False) -> None:
    """Give a freshly built float layer the INT8 structure (zeros), for loading saved weights."""
    weight = layer.weight
    shape = tuple(weight.shape)
    make_int8(
        layer,
        kind,
        type(layer),
        torch.zeros(shape, dtype=torch.int8, device=weight.device),
        torch.ones(shape[1] if kind == "conv1d" else shape[0], device=weight.device),
        None,
        None if dynamic else (1.0, 0),
        input_from_site,
    )
