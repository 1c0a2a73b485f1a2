"""Activation quantizers between layers ("sites"): conv outputs and the residual adds they feed.

Quantizing only the inputs of Conv / Linear layers leaves every tensor that is not a layer
input in float: the output of a conv that feeds a residual add, the add itself, the shortcut.
onnxruntime then runs those convs in fp32 (QLinearConv needs a quantized output) and
converts layouts around them, and Inductor cannot keep the int8 chain either. With
``quant.conv_outputs`` (the default) slimkit also quantizes, like onnxruntime's
``quantize_static``:

* the output of every quantized Conv2d, after its folded BatchNorm and a ReLU-like
  activation that only it feeds (the ReLU is then absorbed by the uint8 range);
* the output of every add whose two operands are quantized (residual adds), after its ReLU;
* a max-pool output (or another op that keeps values on the grid) that feeds such an add,
  with the qparams of its input ("pass-through", exact: no new rounding);
* sigmoid gates of quantized tensors and their products: the ``sigmoid(x)`` inside an
  ``nn.SiLU`` module (``x * sigmoid(x)``, where ``x`` is a site's; a ``"gate"`` site: the
  module's class gets :class:`GatedSiLU` in front), the output of a module computing a sigmoid
  of a site's tensor (a squeeze-excite gate), and the operands of products of quantized tensors.
  onnxruntime then runs them as ``QLinearSigmoid`` / ``QLinearMul`` (int8 lookups and products)
  instead of float ops between dequantize and quantize nodes, as for its own ``quantize_static``
  graph: EfficientNet-B0's graph ran 1.2-1.7x the time of ``quantize_static``'s without them.

A quantized layer whose input *is* such a tensor reads it as it is (its input qparams are the
site's; no second rounding), and one whose input is on a site's grid (after a max-pool or a
functional ReLU) reuses the site's qparams.

Placement comes from one watched forward pass (:mod:`slimkit.quant.dataflow`); a site is a
forward hook (``where="output"``) or pre-hook (``where="input"``, for a tensor read only inside
one module, e.g. the activation inside timm's ``BatchNormAct2d``) on a module that runs once,
with the quantizer as that module's child (``output_quantizer`` / ``input_quantizer``) during
QAT and ``<where>_scale`` / ``<where>_zero_point`` buffers once converted. Module objects stay
where they are (the pruning contract).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from ..modules import matches_any
from .dataflow import Key, Op, Recording
from .numerics import ACT_QMAX, ACT_QMIN
from .state import QuantMixin, SiteState, attach_state, clear, restore_class, state_of, swap_class

Where = Literal["output", "input", "gate"]

_RELU = {"relu", "relu_", "relu6"}
_HARDTANH = {"hardtanh", "hardtanh_"}
_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__"}
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_SILU = {"silu", "silu_"}
# ops whose output values are some of their input's values (or 0): quantized inputs stay on
# the grid of their qparams, so the output needs no new rounding
_ON_GRID = {
    "max_pool2d",
    "_max_pool2d",
    "max_pool2d_with_indices",
    "adaptive_max_pool2d",
    "_adaptive_max_pool2d",
    "relu",
    "relu_",
    "flatten",
    "reshape",
    "view",
    "contiguous",
    "dropout",
}


@dataclasses.dataclass(frozen=True)
class Site:
    module: str
    where: Where
    share: str | None = None  # pass-through: reuse the qparams of the site on this module
    # every reader of the tensor is a quantized layer that reads it as this site's values
    read_by_layers_only: bool = False


@dataclasses.dataclass
class Plan:
    sites: dict[str, Site] = dataclasses.field(default_factory=dict)  # module name -> site
    # quantized layer -> ("site" | "grid", module of the site whose qparams its input has)
    inputs: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


def _relu_like(op: Op) -> bool:
    if op.name in _RELU:
        return True
    if op.name in _HARDTANH:
        low = op.args[1] if len(op.args) > 1 else op.kwargs.get("min_val", -1.0)
        return isinstance(low, (int, float)) and low >= 0
    return False


def _is_residual_add(op: Op) -> bool:
    if op.name not in _ADD or len(op.inputs) != 2 or op.kwargs.get("alpha", 1) != 1:
        return False
    a, b = op.args[0], op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape


def _is_product(op: Op) -> bool:
    """A product of two tensors (broadcasting allowed: a squeeze-excite gate is [N, C, 1, 1])."""
    if op.name not in _MUL or len(op.inputs) != 2:
        return False
    a, b = op.args[0], op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()


class _Planner:
    def __init__(self, rec: Recording, layers: Iterable[str], exclude: list[str], gates: Iterable[str] | None) -> None:
        self.rec = rec
        self.layers = set(layers)
        # nn.SiLU modules, whose sigmoid can become a "gate" site; None: no gates, sigmoids or products
        self.gates = None if gates is None else set(gates)
        self.exclude = exclude
        self.plan = Plan()
        self.site_at: dict[Key, str] = {}  # quantized tensor -> module of its site
        self.covered: set[Key] = set()  # tensors quantized by the layer that reads them

    def follow(self, key: Key, bn: nn.Module | None) -> list[Key]:
        """``key`` and what it becomes through its folded BatchNorm and ReLU-like activations
        that are its only readers."""
        chain = [key]
        while True:
            readers = self.rec.readers.get(chain[-1], [])
            if len(readers) != 1:
                return chain
            op = self.rec.ops[readers[0]]
            folded_bn = (
                bn is not None and op.name == "batch_norm" and len(op.args) > 1 and op.args[1] is bn.running_mean
            )
            if not (folded_bn or _relu_like(op)) or not op.outputs:
                return chain
            chain.append(op.outputs[0])

    def _usable(self, name: str) -> bool:
        return (
            name != ""
            and name not in self.plan.sites
            and self.rec.single_call(name) is not None
            and not matches_any(name, self.exclude)
        )

    def locate(self, key: Key) -> Site | Literal["covered"] | None:
        """Where ``key`` can be quantized for every reader: after the module that returns it,
        or on the input of a module that contains every reader (``"covered"`` when that is a
        quantized layer: its own input quantizer does it)."""
        readers = self.rec.readers.get(key, [])
        if not readers:
            return None  # a model output: never quantized
        for name in self.rec.returned_by.get(key, []):
            call = self.rec.single_call(name)
            if self._usable(name) and min(readers) >= call.end:
                return Site(name, "output")
        for name in self.rec.received_by.get(key, []):
            call = self.rec.single_call(name)
            if call is None or call.input != key or not call.start <= min(readers) <= max(readers) < call.end:
                continue
            if name in self.layers:
                return "covered"
            if self._usable(name):
                return Site(name, "input")
        return None

    def place(self, chain: list[Key], share: str | None = None) -> Key | None:
        """Put a site on the last placeable tensor of ``chain``; returns that tensor."""
        for key in reversed(chain):
            found = self.locate(key)
            if found == "covered":
                self.covered.add(key)
                return None
            if isinstance(found, Site):
                site = dataclasses.replace(found, share=share)
                self.plan.sites[site.module] = site
                self.site_at[key] = site.module
                return key
        return None

    def _quantized_operand(self, key: Key, grid: dict[Key, str]) -> bool:
        """Make an add operand quantized: it is a site, or on a site's grid (then it gets a
        pass-through site where one can go), or gets a site of its own."""
        if key in self.site_at:
            return True
        if key in grid:
            self.place([key], share=grid[key])
            return True
        placed = self.place([key])
        if placed is None:
            return False
        grid[placed] = self.site_at[placed]
        return True

    def _operands(self, op: Op, grid: dict[Key, str]) -> bool:
        return all([self._quantized_operand(k, grid) for k in op.inputs])  # a list: place every one

    def run(self, convs: dict[str, nn.Module | None]) -> Plan:
        for name, bn in convs.items():
            call = self.rec.single_call(name)
            if call is not None and call.output is not None:
                self.place(self.follow(call.output, bn))
        grid: dict[Key, str] = dict(self.site_at)  # tensors on a site's grid -> that site
        for op in self.rec.ops:
            if op.name in _ON_GRID and op.inputs and op.inputs[0] in grid and op.outputs:
                grid.setdefault(op.outputs[0], grid[op.inputs[0]])
            elif _is_residual_add(op) and any(k in grid for k in op.inputs) and self._operands(op, grid):
                placed = self.place(self.follow(op.outputs[0], None))
                if placed is not None:
                    grid[placed] = self.site_at[placed]
            elif self.gates is None:
                continue
            elif op.name in _SILU and op.inputs and op.inputs[0] in grid and op.outputs:
                self._gate(op, grid)
            elif self._gate_or_product(op, grid):
                self._quantized_operand(op.outputs[0], grid)
        for name in sorted(self.layers):
            call = self.rec.single_call(name)
            if call is None or call.input is None or call.input not in grid:
                continue
            if call.input not in self.site_at:  # on a site's grid: a pass-through site if possible
                self.place([call.input], share=grid[call.input])
            if call.input in self.site_at:
                self.plan.inputs[name] = ("site", self.site_at[call.input])
            else:
                self.plan.inputs[name] = ("grid", grid[call.input])
        for key, module in self.site_at.items():
            site = self.plan.sites[module]
            if site.where == "output" and self._read_by_layers_only(key, module):
                self.plan.sites[module] = dataclasses.replace(site, read_by_layers_only=True)
        return self.plan

    @staticmethod
    def _gate_or_product(op: Op, grid: dict[Key, str]) -> bool:
        """A sigmoid of a quantized tensor, or a product of two: its output is quantized too."""
        if not op.outputs or not op.inputs:
            return False
        if op.name == "sigmoid":
            return op.inputs[0] in grid
        return _is_product(op) and all(k in grid for k in op.inputs)

    def _gate(self, op: Op, grid: dict[Key, str]) -> None:
        """``silu(x)`` with ``x`` quantized, computed by an ``nn.SiLU`` module alone: a ``"gate"``
        site on that module quantizes its ``sigmoid(x)``, and its output (the product) is made
        quantized too, so that both become int8 ops."""
        for name in self.rec.received_by.get(op.inputs[0], []):
            call = self.rec.single_call(name)
            alone = (
                call is not None and call.input == op.inputs[0] and (call.start, call.end) == (op.index, op.index + 1)
            )
            if name in self.gates and alone and self._usable(name):
                self.plan.sites[name] = Site(name, "gate")
                self._quantized_operand(op.outputs[0], grid)
                return

    def _read_by_layers_only(self, key: Key, module: str) -> bool:
        """Every op that reads ``key`` runs inside a quantized layer whose input is this site."""
        calls = [
            self.rec.single_call(layer)
            for layer, (kind, source) in self.plan.inputs.items()
            if kind == "site" and source == module
        ]
        spans = [(c.start, c.end) for c in calls if c is not None and c.input == key]
        readers = self.rec.readers.get(key, [])
        return bool(readers) and all(any(start <= r < end for start, end in spans) for r in readers)


def plan_sites(
    rec: Recording,
    layers: Iterable[str],
    convs: dict[str, nn.Module | None],
    exclude: list[str],
    gates: Iterable[str] | None = None,
) -> Plan:
    """The sites of a model: ``layers`` are the quantized layers, ``convs`` maps each quantized
    Conv2d to the BatchNorm folded into it (or None), ``gates`` names the ``nn.SiLU`` modules
    (None: sigmoids and products stay float, ``quant.gates: false``)."""
    return _Planner(rec, layers, exclude, gates).run(convs)


# ----------------------------------------------------------------------------------------
# the hooks: fake-quant during QAT, quantize -> dequantize once converted
# ----------------------------------------------------------------------------------------


def _quantize(module: nn.Module, where: str, x: torch.Tensor) -> torch.Tensor:
    quantizer = module._modules.get(f"{where}_quantizer")
    if quantizer is not None:  # QAT / calibration: observe and fake-quantize as scheduled
        return quantizer(x)
    if torch.compiler.is_compiling():  # traced: constant qparams, PyTorch's PT2E q / dq pattern
        from .int8 import load_decomposed_ops

        qd = load_decomposed_ops()
        scale, zero_point = state_of(module).site.trace_qparams
        q = qd.quantize_per_tensor(x, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)
        return qd.dequantize_per_tensor(q, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)
    if state_of(module).site.read_by_layers_only:
        # eager INT8: the layers that read x quantize it with these qparams (exactly the values
        # rounding here first would give them)
        return x
    scale = getattr(module, f"{where}_scale")
    zero_point = getattr(module, f"{where}_zero_point")
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, ACT_QMIN, ACT_QMAX)


def quantize_output_hook(module: nn.Module, args, output):
    return _quantize(module, "output", output)


def quantize_input_hook(module: nn.Module, args):
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return (_quantize(module, "input", args[0]), *args[1:])


class GatedSiLU(QuantMixin):
    """Mixin put in front of an ``nn.SiLU`` with a ``"gate"`` site: ``x * q(sigmoid(x))``, the
    sigmoid's output quantized (fake-quant in QAT, its converted qparams once INT8)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * _quantize(self, "gate", torch.sigmoid(input))


def _install_hook(module: nn.Module, where: str, read_by_layers_only: bool = False) -> None:
    attach_state(module).site = SiteState(where, read_by_layers_only)
    if where == "gate":  # no hook: the quantizer sits inside GatedSiLU's forward
        swap_class(module, GatedSiLU, "Gated")
    elif where == "output":
        if quantize_output_hook not in module._forward_hooks.values():
            module.register_forward_hook(quantize_output_hook)
    elif quantize_input_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(quantize_input_hook)


def attach(module: nn.Module, where: str, quantizer: nn.Module) -> None:
    """Make ``module`` a fake-quant site (QAT): ``quantizer`` becomes its ``<where>_quantizer``."""
    module.add_module(f"{where}_quantizer", quantizer)
    _install_hook(module, where)


def detach(module: nn.Module) -> None:
    """Remove a site (QAT or converted) from ``module``."""
    site: SiteState | None = clear(module, "site")
    if site is None:
        return
    where = site.where
    if where == "gate":
        restore_class(module)
    module._modules.pop(f"{where}_quantizer", None)
    for name in (f"{where}_scale", f"{where}_zero_point"):
        module._buffers.pop(name, None)
    for hooks, fn in ((module._forward_hooks, quantize_output_hook), (module._forward_pre_hooks, quantize_input_hook)):
        for handle_id in [k for k, v in hooks.items() if v is fn]:
            del hooks[handle_id]


def install_int8(
    module: nn.Module, where: str, scale: float, zero_point: int, read_by_layers_only: bool = False
) -> None:
    """Make ``module`` a converted site: uint8 qparams as buffers, quantize -> dequantize (in
    eager mode skipped when ``read_by_layers_only``: its readers quantize it themselves)."""
    detach(module)
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    module.register_buffer(f"{where}_scale", torch.tensor(float(scale), device=device))
    module.register_buffer(f"{where}_zero_point", torch.tensor(int(zero_point), dtype=torch.int32, device=device))
    _install_hook(module, where, read_by_layers_only)


def site_of(module: nn.Module) -> str | None:
    """``"output"`` / ``"input"`` when ``module`` is a site, else None."""
    state = state_of(module)
    return None if state is None or state.site is None else state.site.where


def read_by_layers_only(module: nn.Module) -> bool:
    state = state_of(module)
    return state is not None and state.site is not None and state.site.read_by_layers_only


def prepare_sites_for_tracing(model: nn.Module) -> None:
    """Converted sites' qparams as Python numbers (constants in traced graphs)."""
    for module in model.modules():
        where = site_of(module)
        if where is not None and f"{where}_quantizer" not in module._modules:
            scale = getattr(module, f"{where}_scale")
            zero_point = getattr(module, f"{where}_zero_point")
            state_of(module).site.trace_qparams = (float(scale), int(zero_point))


__all__ = [
    "GatedSiLU",
    "Plan",
    "Site",
    "attach",
    "detach",
    "install_int8",
    "plan_sites",
    "prepare_sites_for_tracing",
    "quantize_input_hook",
    "quantize_output_hook",
    "read_by_layers_only",
    "site_of",
]
