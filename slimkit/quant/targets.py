"""The three kinds of quantization target, each one implementation of
:class:`~.lifecycle.QuantTarget`: layers, weight-only embeddings and activation sites.

They hold what the lifecycle needs between steps (the module, its quantizers, its folded
BatchNorm); the arithmetic and the module surgery live in :mod:`.qat` / :mod:`.int8`,
:mod:`.embeddings`, :mod:`.sites` and :mod:`.fold`. :data:`TARGET_KINDS` is their order:
layers convert first, so that a site on a folded BatchNorm moves to the ``nn.Identity`` that
replaces it (sites are found by name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FormatError, IncompatibleError
from ..recipe import ActivationQuantConfig
from . import bias_correction, fold, qat, sites
from . import embeddings as qemb
from .fake_quant import ActivationQuantizer
from .hub_checks import saved_module
from .int8 import empty_int8_like, int8_state, make_int8
from .layers import OUT_AXIS, layer_kind
from .lifecycle import Phase
from .state import WeightSpec, state_of


class LayerTarget:
    """A Conv2d / Linear / transposed Linear: fake-quant weight and input, then INT8 kernels."""

    block_key = "layers"

    def __init__(
        self,
        name: str,
        module: nn.Module,
        kind: str,
        spec: WeightSpec,
        activations: ActivationQuantConfig,
        *,
        dynamic: bool,
        bias_correction: bool,
        folded: tuple[str, nn.Module] | None = None,
        own_input: bool = True,
    ) -> None:
        self.name, self.module, self.kind, self.spec = name, module, kind, spec
        self.activations, self.dynamic, self.bias_correction = activations, dynamic, bias_correction
        self.bn_name, self.bn = folded if folded is not None else (None, None)
        self.own_input = own_input
        self.input_from_site = False  # its input is a site's tensor, read as it is (set by the Quantizer)

    def attach(self, model: nn.Module) -> None:
        learn = self.spec.learn
        qat.attach(self.module, self.kind, self.spec, self.activations, self.dynamic, learn, self.bn, self.own_input)
        if self.bias_correction:  # zeros until calibrate measures it; present so checkpoints load
            out = self.module.weight.shape[OUT_AXIS[self.kind]]
            bias_correction.set_correction(self.module, torch.zeros(out))

    @property
    def input_quantizer(self) -> nn.Module | None:
        """The quantizer whose qparams this layer's input has: its own, or a site's (static)."""
        return qat.layer_state(self.module).input_source

    def use_input_of(self, quantizer: nn.Module, from_site: bool) -> None:
        """Take the input quantized by ``quantizer`` (a site's) instead of quantizing it here."""
        qat.layer_state(self.module).input_source = quantizer
        self.input_from_site = from_site

    def quantizers(self) -> dict[str, nn.Module]:
        own = self.module._modules.get("input_quantizer")
        return {} if own is None else {f"{self.name}.input_quantizer": own}

    def set_phase(self, phase: Phase) -> None:
        state = qat.layer_state(self.module)
        state.weight_fake_quant = phase.fake_quant
        if state.bn is not None:
            fold.set_frozen(state.bn, phase.bn_frozen)
        own = self.module._modules.get("input_quantizer")
        if own is not None:
            _set_quantizer_phase(own, phase)

    def input_qparams(self) -> tuple[float, int] | None:
        return None if self.dynamic else self.input_quantizer.qparams()

    def to_int8(self, model: nn.Module) -> None:
        input_qparams = self.input_qparams()
        weight_int8, scale, bias = qat.int8_parameters(self.module, input_qparams and input_qparams[0])
        qat.detach_layer(self.module)  # the layer has its own class again
        make_int8(
            self.module, self.kind, type(self.module), weight_int8, scale, bias, input_qparams, self.input_from_site
        )
        if self.bn is not None:
            fold.fold_away(model, self.bn_name, self.bn)

    def detach(self, model: nn.Module) -> None:
        qat.detach_layer(self.module)

    @classmethod
    def describe(cls, modules: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        layers = {}
        for name, module in modules:
            state = int8_state(module)
            if state is not None:
                entry = {"kind": state.kind, "activations": "dynamic" if state.dynamic else "static"}
                if state.input_from_site:
                    entry["input"] = "site"
                layers[name] = entry
        return {"layers": layers}

    @classmethod
    def rebuild(cls, model: nn.Module, block: dict[str, Any]) -> None:
        for name, info in block.get("layers", {}).items():
            layer = saved_module(model, name, "layer")
            kind = info.get("kind")
            if layer_kind(layer) != kind:
                raise FormatError(
                    f"config.json: quantized layer {name!r} is a {kind} in the folder but a "
                    f"{type(layer).__name__} in the rebuilt {type(model).__name__}"
                )
            dynamic, from_site = info.get("activations") == "dynamic", info.get("input") == "site"
            empty_int8_like(layer, kind, dynamic=dynamic, input_from_site=from_site)


class SiteTarget:
    """An activation quantizer between layers (a conv output, a residual add, ...); a
    pass-through site (``site.share``) reuses another site's quantizer and owns none."""

    block_key = "sites"

    def __init__(self, site: sites.Site, activations: ActivationQuantConfig, learn: bool, device: torch.device) -> None:
        self.name, self.site = site.module, site
        self.activations, self.learn = activations, learn
        self.device = device  # for a quantizer on a module without tensors (an activation, an add)
        self.own: nn.Module | None = None
        self.source: SiteTarget = self  # whose quantizer this site's qparams come from

    def attach(self, model: nn.Module) -> None:
        if self.site.share is not None:  # pass-through sites need nothing before conversion
            return
        module = model.get_submodule(self.name)
        device = next((t.device for t in module.parameters()), self.device)
        self.own = ActivationQuantizer(self.activations, self.learn).to(device)
        sites.attach(module, self.site.where, self.own)

    @property
    def quantizer(self) -> nn.Module:
        return self.source.own

    def quantizers(self) -> dict[str, nn.Module]:
        return {} if self.own is None else {f"{self.name}.{self.site.where}_quantizer": self.own}

    def set_phase(self, phase: Phase) -> None:
        if self.own is not None:
            _set_quantizer_phase(self.own, phase)

    def to_int8(self, model: nn.Module) -> None:
        module = model.get_submodule(self.name)  # by name: a folded BatchNorm is an Identity now
        scale, zero_point = self.quantizer.qparams()
        sites.install_int8(module, self.site.where, scale, zero_point, self.site.read_by_layers_only)

    def detach(self, model: nn.Module) -> None:
        sites.detach(model.get_submodule(self.name))

    @classmethod
    def describe(cls, modules: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        return {
            "sites": {name: sites.site_of(module) for name, module in modules if sites.site_of(module)},
            "sites_read_by_layers_only": [name for name, module in modules if sites.read_by_layers_only(module)],
        }

    @classmethod
    def rebuild(cls, model: nn.Module, block: dict[str, Any]) -> None:
        layers_only = set(block.get("sites_read_by_layers_only", ()))
        for name, where in block.get("sites", {}).items():
            module = saved_module(model, name, "site")
            sites.install_int8(module, where, 1.0, 0, read_by_layers_only=name in layers_only)


class EmbeddingTarget:
    """An ``nn.Embedding`` with an int8 table and one scale per row (weight-only)."""

    block_key = "embeddings"

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module

    def attach(self, model: nn.Module) -> None:
        qemb.attach(self.module)

    def quantizers(self) -> dict[str, nn.Module]:
        return {}  # weight-only: the lookup's output is float

    def set_phase(self, phase: Phase) -> None:
        qemb.set_fake_quant(self.module, phase.fake_quant)

    def to_int8(self, model: nn.Module) -> None:
        qemb.convert(self.module)

    def detach(self, model: nn.Module) -> None:
        qemb.detach(self.module)

    @classmethod
    def describe(cls, modules: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        names = [name for name, module in modules if qemb.is_int8_embedding(module)]
        if not names:
            return {}
        return {
            "embeddings": names,
            "embedding_weights": "int8, symmetric, per row (weight, weight_scale), weight-only",
        }

    @classmethod
    def rebuild(cls, model: nn.Module, block: dict[str, Any]) -> None:
        for name in block.get("embeddings", ()):
            embedding = saved_module(model, name, "embedding")
            if not isinstance(embedding, nn.Embedding):
                raise FormatError(
                    f"config.json: quantized embedding {name!r} is a {type(embedding).__name__} in the rebuilt "
                    f"{type(model).__name__}, not an nn.Embedding"
                )
            qemb.empty_int8_like(embedding)


def _set_quantizer_phase(quantizer: nn.Module, phase: Phase) -> None:
    quantizer.fake_quant = phase.fake_quant
    quantizer.calibrating = phase.calibrating
    if not phase.calibrating:  # calibration observes in eval mode; the schedule's flag stays
        quantizer.observe = phase.observe


TARGET_KINDS = (LayerTarget, SiteTarget, EmbeddingTarget)


def detach_copy(model: nn.Module) -> None:
    """Every fake-quant role removed from ``model``'s modules, found by their states rather than
    by a quantizer's targets: for a ``copy.deepcopy`` of a prepared model, which copies the states
    and swapped classes while the quantizer's targets still hold the original's modules. The
    copy computes in float again, as :meth:`Quantizer.remove` leaves the original."""
    for module in list(model.modules()):
        state = state_of(module)
        if state is None:
            continue
        if state.int8 is not None or (state.embedding is not None and state.embedding.int8):
            raise IncompatibleError(
                f"{type(module).__name__} is already converted to INT8; only a prepared model's copy detaches"
            )
        if state.layer is not None:
            qat.detach_layer(module)  # its folded BatchNorm too
        if state.embedding is not None:
            qemb.detach(module)
        if state.site is not None:
            sites.detach(module)
        state = state_of(module)
        if state is not None and state.batchnorm is not None:
            fold.detach(module)


__all__ = ["TARGET_KINDS", "EmbeddingTarget", "LayerTarget", "SiteTarget", "detach_copy"]
