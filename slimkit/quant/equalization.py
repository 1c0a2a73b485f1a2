"""Cross-layer equalization (``quant.equalization``; Nagel et al. 2019, "Data-Free Quantization").

Two layers in a row, ``P`` then ``C``, with only positive-homogeneous ops between them (ReLU,
max / average pooling, P's own BatchNorm, dropout): scaling P's output channel ``i`` by
``1 / s_i`` and C's input channel ``i`` by ``s_i`` leaves the float function unchanged, since
``relu(x / s) = relu(x) / s`` for ``s > 0``. With ``s_i = sqrt(r1_i / r2_i)``, where ``r1_i`` is
the range of P's (BatchNorm-folded) output channel ``i`` and ``r2_i`` that of C's input
channel ``i``, both become ``sqrt(r1_i * r2_i)``: channels with tiny weights no longer waste a
per-tensor int8 grid set by one large channel. Chains (P -> C -> D) are equalized pair by pair,
repeated until the scales settle.

A depthwise consumer (``groups == in_channels == out_channels``) holds input channel ``i`` in
its row ``i``, so equalization goes through MobileNet / EfficientNet blocks. P's BatchNorm (the
one folded into it) is scaled instead of P's weight (``gamma / s``, ``beta / s``: exact), so the
BatchNorm keeps training in QAT. ReLU6, hard-swish, SiLU and other non-homogeneous activations
stop a pair (their output is not scaled by ``1 / s``), as do grouped convolutions, layers that
run twice and tensors read by more than one op (residual branches).

It changes weights in place at ``prepare``, before any optimizer step; the float function is
unchanged (tested to 1e-5).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .dataflow import Key, Recording
from .fold import bn_factor

# ops through which y -> y / s commutes per channel (s > 0), besides the producer's BatchNorm
_HOMOGENEOUS = {
    "relu",
    "relu_",
    "leaky_relu",
    "leaky_relu_",
    "max_pool2d",
    "_max_pool2d",
    "max_pool2d_with_indices",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "_adaptive_max_pool2d",
    "dropout",
    "contiguous",
}
_FLATTEN = {"flatten", "reshape", "view"}
MAX_ITERATIONS = 20


@dataclasses.dataclass
class Pair:
    producer: str
    consumer: str
    bn: nn.Module | None  # the producer's folded BatchNorm, scaled instead of its weight


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels == layer.out_channels


def _consumer_ok(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and (layer.groups == 1 or _is_depthwise(layer))
    )


def _passes(op, key: Key, bn: nn.Module | None) -> bool:
    if op.name == "batch_norm":
        return bn is not None and len(op.args) > 1 and op.args[1] is bn.running_mean
    if op.name in _FLATTEN:  # [N, C, 1, 1] -> [N, C]: channel i stays feature i
        x = op.args[0] if op.args else None
        return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] * x.shape[3] == 1
    if op.name == "mean":  # a spatial mean of [N, C, H, W] keeps channel i in place
        x = op.args[0] if op.args else None
        dims = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return isinstance(x, torch.Tensor) and x.dim() == 4 and bool(dims) and set(dims) <= {2, 3, -1, -2}
    if op.name in ("leaky_relu", "leaky_relu_"):
        slope = op.args[1] if len(op.args) > 1 else op.kwargs.get("negative_slope", 0.01)
        return isinstance(slope, (int, float)) and slope >= 0
    return op.name in _HOMOGENEOUS


def plan_pairs(rec: Recording, layers: dict[str, nn.Module], folded: dict[str, tuple[str, nn.Module]]) -> list[Pair]:
    """Every (producer, consumer) pair of quantized Conv2d / Linear layers that can be equalized."""
    inputs = {}
    for name in layers:
        call = rec.single_call(name)
        if call is not None and call.input is not None:
            inputs[call.input] = name
    pairs = []
    for name, layer in layers.items():
        call = rec.single_call(name)
        if call is None or call.output is None or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups != 1 and not _is_depthwise(layer):
            continue
        bn = folded.get(name, (None, None))[1]
        key = call.output
        while key not in inputs:
            readers = rec.readers.get(key, [])
            if len(readers) != 1:
                break
            op = rec.ops[readers[0]]
            if not op.outputs or not _passes(op, key, bn):
                break
            key = op.outputs[0]
        consumer = inputs.get(key)
        if consumer is None or consumer == name or len(rec.readers.get(key, [])) != 1:
            continue
        target = layers[consumer]
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        width = target.in_channels if isinstance(target, nn.Conv2d) else target.in_features
        if _consumer_ok(target) and channels == width:
            pairs.append(Pair(name, consumer, bn))
    return pairs


def _output_range(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    w = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).amax(dim=1)
    if bn is not None:
        w = w * bn_factor(bn).detach().abs()
    return w


def _input_range(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().abs()
    if _is_depthwise(layer):
        return w.reshape(w.shape[0], -1).amax(dim=1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


@torch.no_grad()
def _scale_pair(producer: nn.Module, consumer: nn.Module, bn: nn.Module | None, s: torch.Tensor) -> None:
    shape = [-1] + [1] * (producer.weight.dim() - 1)
    if bn is not None:  # exact: BN(y) * (1 / s) == BN with gamma / s and beta / s
        if bn.weight is not None:
            bn.weight.div_(s)
            bn.bias.div_(s)
        else:  # an affine-free BatchNorm cannot carry the scale: scale the conv, and its statistics
            producer.weight.div_(s.reshape(shape))
            bn.running_mean.div_(s)
            bn.running_var.div_(s * s)
            if producer.bias is not None:
                producer.bias.div_(s)
    else:
        producer.weight.div_(s.reshape(shape))
        if producer.bias is not None:
            producer.bias.div_(s)
    w = consumer.weight
    if _is_depthwise(consumer):
        w.mul_(s.reshape([-1] + [1] * (w.dim() - 1)))
    else:
        w.mul_(s.reshape([1, -1] + [1] * (w.dim() - 2)))


@torch.no_grad()
def equalize(modules: dict[str, nn.Module], pairs: list[Pair]) -> int:
    """Equalize every pair in place, repeated until no scale moves by more than 1e-4 (at most
    ``MAX_ITERATIONS`` sweeps); returns the number of sweeps."""
    for sweep in range(1, MAX_ITERATIONS + 1):
        largest = 0.0
        for pair in pairs:
            producer, consumer = modules[pair.producer], modules[pair.consumer]
            if pair.bn is not None and pair.bn.weight is None:
                continue
            r1, r2 = _output_range(producer, pair.bn), _input_range(consumer)
            usable = (r1 > 0) & (r2 > 0)
            s = torch.where(usable, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            s = s.clamp(1e-4, 1e4)
            _scale_pair(producer, consumer, pair.bn, s)
            largest = max(largest, float((s - 1).abs().max()))
        if largest < 1e-4:
            return sweep
    return MAX_ITERATIONS


__all__ = ["Pair", "equalize", "plan_pairs"]
