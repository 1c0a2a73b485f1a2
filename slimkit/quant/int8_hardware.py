"""What the CPU's int8 kernels compute exactly: 8-bit weights need VNNI on x86.

oneDNN's (and onnxruntime's) u8 x s8 kernels on x86 CPUs without VNNI (AVX2 and AVX-512 before
Cascade Lake, AMD before Zen 4) multiply with ``vpmaddubsw``, which adds each pair of
``uint8 * int8`` products in int16 with saturation: once ``255 * (|w1| + |w2|)`` passes 32767,
the sum is clipped. 8-bit weights (up to 127) can get there, 7-bit ones (up to 63: at most
32130) cannot. Measured on an AVX2 EPYC (``benchmarks`` note in the README's INT8 section):
8-bit weights gave 6-21% relative error against the exact integer result on random data, 0.2-2%
on a trained digits CNN's logits, and outputs that changed with the thread count; 7-bit weights
gave the exact result (the INT8 model then matches its fake-quant model to 1e-4).

So ``quant.weights.bits: auto`` (the default) means 7 on an x86 CPU without VNNI and 8
elsewhere, decided on the machine that prepares the model. A model with 8-bit weights (saved on
another CPU, or ``bits: 8``) still computes exactly on such a CPU: its layers run each weight as
two halves (:meth:`~.int8.Int8Layer._split`, a second kernel call), eagerly, since compiled and
onnxruntime kernels would saturate; it says so once.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch
from torch import nn

logger = logging.getLogger("slimkit")

EXACT_QMAX = 63  # the largest weight level whose u8 x s8 pair sums fit int16: 255 * 2 * 63 = 32130
_warned: set[str] = set()


@functools.cache
def saturating_cpu() -> bool:
    """True on an x86 CPU whose int8 kernels add u8 x s8 pairs in int16 (no VNNI, no AMX)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    if probe is None:  # an older torch: read the flags
        try:
            flags = open("/proc/cpuinfo").read()  # noqa: SIM115 -- a small pseudo-file, read once
        except OSError:
            return False
        return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return not bool(probe())


def strided_1x1_races() -> bool:
    """True where oneDNN's int8 1x1 convolution with a stride races between threads: on the AVX2
    EPYC of the README it gave outputs that changed from call to call with 2 threads (up to 3.4
    off, one thread exact; 8 -> 8 channels on 16x16, stride 2; ResNet downsample layers) while
    the stride-1 kernel on the subsampled input, the same values, stayed exact. Seen with the
    kernels of CPUs without VNNI only, so the workaround (:class:`~.int8.Int8Layer`) runs there."""
    return saturating_cpu()


def auto_weight_bits() -> int:
    """``quant.weights.bits: auto``: 7 where the int8 kernels would saturate with 8, else 8."""
    return 7 if saturating_cpu() else 8


def resolve_weight_bits(bits: int | str) -> int:
    return auto_weight_bits() if bits == "auto" else int(bits)


def saturating_layers(model: nn.Module) -> list[str]:
    """The INT8 conv / Linear layers (uint8 inputs) whose weights reach beyond ``EXACT_QMAX``."""
    from .int8 import int8_state

    found = []
    for name, module in model.named_modules():
        state = int8_state(module)
        weight = getattr(module, "weight", None)
        if state is None or not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8:
            continue
        if int(weight.abs().amax()) > EXACT_QMAX if weight.numel() else False:
            found.append(name)
    return found


def warn_if_saturating(model: nn.Module) -> list[str]:
    """On a CPU without VNNI: the INT8 layers whose 8-bit weights its kernels would saturate
    (they then run as two exact halves, eagerly); said once per model class."""
    if not saturating_cpu():
        return []
    layers = saturating_layers(model)
    key = type(model).__name__
    if layers and key not in _warned:
        _warned.add(key)
        logger.warning(
            "slimkit: this CPU has no VNNI, so its int8 kernels add pairs of uint8 x int8 products in int16, "
            "which saturates with 8-bit weights (measured: 0.2-2%% relative error on a trained CNN's logits, "
            "results that change with the thread count). %d INT8 layer(s) of %s (%s%s) have 8-bit weights: they "
            "run as two exact 7-bit halves, eagerly (a second kernel call each; compiled and onnxruntime kernels "
            "would saturate). Prepare the model on this machine with quant.weights.bits: auto (the default) or "
            "7 for one exact call, or run it on a CPU with VNNI (avx512_vnni / avx_vnni) or AMX.",
            len(layers),
            key,
            ", ".join(layers[:3]),
            ", ..." if len(layers) > 3 else "",
        )
    return layers


__all__ = [
    "EXACT_QMAX",
    "auto_weight_bits",
    "resolve_weight_bits",
    "saturating_cpu",
    "saturating_layers",
    "strided_1x1_races",
]
