"""What a target budget costs per group: the latency, MACs or parameters of the layers a group's
units live in, as a function of how many units each group loses.

:func:`layers_of` finds, for every conv / linear (and, for parameters, norm) module that some
group's units live in, its shape at the target's batch size (one traced forward) and, per group,
how many of its input / output positions one unit occupies. :class:`CostModel` then predicts
the whole model's cost for per-group removal counts:

* ``macs`` / ``params``: exact per layer from the widths every group leaves it (the rest of the
  model, e.g. attention score products, is held constant, and corrected by counting the
  physically pruned copy);
* ``latency``: each layer's dense time times, for every group that touches it, the ratio its
  measured time at that group's width bears to the dense time (a product, so a layer whose
  inputs and outputs both shrink falls as its MACs do); the rest of the model's measured time
  (weights streamed from memory, norms, activations, residual adds) is spread over the layers by
  their memory traffic and shrinks with it, except a fixed part (per-op overhead) found by timing
  the smallest model too (:meth:`CostModel.calibrate`); what this misses is corrected by timing
  the chosen copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import call_model
from ..modules import get_module
from .latency import LatencyTable, LayerShape
from .units import UnitGroup, transposed_attrs

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class Layer:
    """One module some group's units live in."""

    name: str
    shape: LayerShape | None  # None: a norm (parameters only)
    channels: int = 0  # norms: their width
    affine: int = 0  # norms: parameters per channel
    out_elements: int = 0  # convs: output positions per channel (batch included); linear: tokens
    calls: int = 1
    sides: dict[int, list[float]] = field(default_factory=dict)  # group -> [in, out] positions per unit

    def widths(self, counts: dict[int, int]) -> tuple[float, float]:
        """(in, out) widths with ``counts[g]`` units removed from each group ``g`` given."""
        removed_in = sum(counts.get(g, 0) * per[0] for g, per in self.sides.items())
        removed_out = sum(counts.get(g, 0) * per[1] for g, per in self.sides.items())
        if self.shape is None:
            return self.channels - removed_in - removed_out, 0.0
        return self.shape.in_features - removed_in, self.shape.out_features - removed_out

    def macs(self, counts: dict[int, int]) -> float:
        if self.shape is None:
            return 0.0
        n_in, n_out = self.widths(counts)
        groups = n_in if self.shape.depthwise else self.shape.groups
        kernel = math.prod(self.shape.kernel) if self.shape.kernel else 1
        return self.calls * n_out * (n_in / max(groups, 1)) * kernel * self.out_elements

    def params(self, counts: dict[int, int]) -> float:
        if self.shape is None:
            return self.affine * self.widths(counts)[0]
        n_in, n_out = self.widths(counts)
        groups = n_in if self.shape.depthwise else self.shape.groups
        kernel = math.prod(self.shape.kernel) if self.shape.kernel else 1
        return n_out * (n_in / max(groups, 1)) * kernel + (n_out if self.shape.bias else 0)


def _shape(module: nn.Module, in_shape: tuple[int, ...], transposed: dict) -> LayerShape | None:
    if isinstance(module, nn.Linear) or transposed_attrs(module, transposed) is not None:
        weight = module.weight
        n_in, n_out = (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else weight.shape
        return LayerShape("linear", int(n_in), int(n_out), in_shape, -1, bias=module.bias is not None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and isinstance(module.padding, (tuple, str)):
        return LayerShape(
            "conv2d" if isinstance(module, nn.Conv2d) else "conv1d",
            module.in_channels,
            module.out_channels,
            in_shape,
            1,
            kernel=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
            bias=module.bias is not None,
        )
    return None


def layers_of(model: nn.Module, groups: list[UnitGroup], inputs: Any, transposed: dict) -> list[Layer]:
    """Every conv / linear / norm module the groups' units live in, with its traced shapes."""
    sides: dict[str, dict[int, list[float]]] = {}
    for g, group in enumerate(groups):
        for member in group.members:
            per_unit = sum(len(ix) for ix in member.index) / max(len(member.index), 1)
            entry = sides.setdefault(member.module, {}).setdefault(g, [0.0, 0.0])
            entry[0 if member.side == "in" else 1] += per_unit
    modules = {name: get_module(model, name) for name in sides}
    seen: dict[str, list] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                out = output if isinstance(output, torch.Tensor) else None
                entry = seen.setdefault(name, [tuple(args[0].shape), out.shape if out is not None else None, 0])
                entry[2] += 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, module in modules.items():
        if name not in seen:
            continue
        in_shape, output, calls = seen[name]
        if isinstance(module, _NORMS):
            width = int(module.weight.numel()) if getattr(module, "weight", None) is not None else 0
            affine = sum(1 for p in (module.weight, module.bias) if p is not None) if width else 0
            layers.append(Layer(name, None, channels=width, affine=affine, sides=sides[name]))
            continue
        shape = _shape(module, tuple(in_shape), transposed)
        if shape is None or output is None:
            continue
        out_elements = math.prod(output) // max(shape.out_features, 1)
        layers.append(Layer(name, shape, out_elements=out_elements, calls=calls, sides=sides[name]))
    return layers


class CostModel:
    """Predicted cost of the model for per-group removal counts (see the module docstring)."""

    def __init__(self, kind: str, layers: list[Layer], dense_total: float, table: LatencyTable | None = None):
        if kind == "latency":  # norms and the like are part of the rest
            layers = [layer for layer in layers if layer.shape is not None]
        self.kind, self.layers, self.table = kind, layers, table
        self._memo: dict[tuple[str, int, int], float] = {}
        self._interpolating = False  # see interpolating()
        self.by_group: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            for g in layer.sides:
                self.by_group.setdefault(g, []).append(i)
        layer_total = sum(self.layer_cost(i, {}) for i in range(len(self.layers)))
        # What the modelled layers do not cover; a latency can be below the sum of its layers
        # timed alone, so the rest never goes negative. For latency the rest is memory traffic
        # (a layer timed alone finds its weights in cache, in the model it streams them: at batch
        # 1 that dominates) and element-wise work on the layers' outputs (norms, activations,
        # residual adds: at large batches): it is spread over the layers by their weights +
        # inputs + outputs and shrinks with them. MACs / parameters outside the layers are fixed.
        self.rest = max(dense_total - layer_total, 0.0)
        self._volume0 = sum(self._volume(i, {}) for i in range(len(self.layers))) if kind == "latency" else 0.0
        # the part of the rest that scales with traffic; the remainder (per-op framework
        # overhead) is fixed. All of it scales until `calibrate` sees the smallest model.
        self.scaled = self.rest if self._volume0 > 0 else 0.0

    def calibrate(self, counts: dict[int, int], measured: float) -> None:
        """Latency: split the rest into a fixed part (per-op overhead, which pruning keeps) and a
        part that scales with traffic, so that the prediction equals what was measured both for
        the dense model and for ``counts`` (in practice: every group at its smallest width)."""
        if self.kind != "latency" or self._volume0 <= 0:
            return
        n = range(len(self.layers))
        volume = sum(self._volume(i, counts) for i in n) / self._volume0
        rest_then = measured - sum(self.layer_cost(i, counts) for i in n)
        if volume < 1.0 - 1e-9:
            # dense: rest = fixed + scaled; at counts: rest_then = fixed + scaled * volume
            self.scaled = min(max((self.rest - rest_then) / (1.0 - volume), 0.0), self.rest)

    @contextmanager
    def interpolating(self) -> Iterator[None]:
        """Latency: within this block a width that was not timed is estimated linearly between
        the timed widths of the same layer instead of being timed (a plan off the candidate
        grid, e.g. uniform widths at an exact fraction, priced without timing dozens of widths)."""
        self._interpolating = True
        try:
            yield
        finally:
            self._interpolating = False

    def _ms(self, layer: Layer, counts: dict[int, int]) -> float:
        n_in, n_out = layer.widths(counts)
        key = (layer.name, round(n_in), round(n_out))
        if key not in self._memo:
            estimate = self._between(key) if self._interpolating else None
            if estimate is not None:
                return estimate
            self._memo[key] = self.table.ms(layer.shape, key[1], key[2])
        return self._memo[key]

    def _between(self, key: tuple[str, int, int]) -> float | None:
        """The time of an untimed ``(layer, in, out)`` width, linear between the nearest timed
        widths of that layer that differ from it on one side only (the nearest one beyond the
        timed range); None when that layer has no such timing."""
        for vary, keep in ((1, 2), (2, 1)):
            points = sorted((k[vary], ms) for k, ms in self._memo.items() if k[0] == key[0] and k[keep] == key[keep])
            if not points:
                continue
            x = key[vary]
            below = [p for p in points if p[0] <= x]
            above = [p for p in points if p[0] >= x]
            if below and above and above[0][0] > below[-1][0]:
                (x0, y0), (x1, y1) = below[-1], above[0]
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            return (below[-1] if below else above[0])[1]
        return None

    def layer_cost(self, i: int, counts: dict[int, int]) -> float:
        layer = self.layers[i]
        if self.kind == "macs":
            return layer.macs(counts)
        if self.kind == "params":
            return layer.params(counts)
        dense = self._ms(layer, {})
        cost = dense
        for g in layer.sides:
            if counts.get(g, 0):
                cost *= self._ms(layer, {g: counts[g]}) / max(dense, 1e-9)
        return layer.calls * cost

    def _volume(self, i: int, counts: dict[int, int]) -> float:
        """Memory traffic of layer ``i`` in elements: its weights, its input and its output."""
        layer = self.layers[i]
        n_in, n_out = layer.widths(counts)
        per_input = math.prod(layer.shape.input_shape) / max(layer.shape.in_features, 1)
        return layer.params(counts) + layer.calls * (layer.out_elements * n_out + per_input * n_in)

    def _rest_scaled(self) -> float:
        return self.scaled if self.kind == "latency" and self._volume0 > 0 else 0.0

    def _rest_share(self, i: int, counts: dict[int, int]) -> float:
        """Layer ``i``'s share of the rest that scales (latency: by traffic; else none)."""
        if self.kind != "latency" or self._volume0 <= 0:
            return 0.0
        return self.scaled * self._volume(i, counts) / self._volume0

    def total(self, counts: dict[int, int]) -> float:
        fixed = self.rest - self._rest_scaled()
        return fixed + sum(self.layer_cost(i, counts) + self._rest_share(i, counts) for i in range(len(self.layers)))

    def delta(self, g: int, count: int, counts: dict[int, int]) -> float:
        """total(counts with group g at ``count``) - total(counts)."""
        new = {**counts, g: count}
        return sum(
            self.layer_cost(i, new)
            + self._rest_share(i, new)
            - self.layer_cost(i, counts)
            - self._rest_share(i, counts)
            for i in self.by_group.get(g, [])
        )

    def prime(self, candidates: list[list[int]]) -> None:
        """Latency: measure (or read from the cache) every figure the solver may ask for."""
        if self.kind != "latency":
            return
        for layer in self.layers:
            self._ms(layer, {})
            for g in layer.sides:
                for count in candidates[g]:
                    self._ms(layer, {g: count})
