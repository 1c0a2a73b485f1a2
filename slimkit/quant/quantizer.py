"""The ``quant`` method: fake-quant layers, the QAT schedule, calibration and INT8 conversion.

    recipe = slimkit.Recipe.from_dict({"quant": {"freeze_observers_step": 800, "freeze_bn_step": 800}})
    model = slimkit.prepare(model, recipe, example_inputs=x)   # fake-quant Conv2d / Linear / Conv1D
    ...                                                         # train; slimkit.step(model) per step
    int8 = slimkit.convert(model)                               # oneDNN int8 kernels, same class

Schedule (steps are optimizer steps, as counted by ``slimkit.step`` / the Trainer):

* before ``start_step``: the model computes in floating point (phase ``float``);
* from ``start_step``: weights and inputs are fake-quantized and observers track the input
  ranges in training mode (phase ``observing``);
* from ``freeze_observers_step``: ranges are fixed (phase ``frozen``);
* from ``freeze_bn_step``: folded BatchNorms use their running statistics.

``mode: ptq`` fake-quantizes from the start and observes only inside :func:`calibrate`;
``mode: dynamic`` quantizes only Linear layers, with each batch's own activation range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..adapters import call_model
from ..controller import Controller, Method
from ..errors import IncompatibleError, NonFiniteError, SlimkitError, UnsupportedModelError
from ..modules import match_modules, matches_any, user_named_modules
from ..recipe import QuantConfig
from . import bias_correction, equalization, qat, runtime, sites
from . import embeddings as qemb
from .calibration import InputSpread, batch_size, check_calibration, model_inputs
from .dataflow import Recording, record
from .fold import batchnorms_with_statistics, fold_pairs
from .int8 import make_int8, require_int8_engine
from .layers import layer_kind, unsupported_reason
from .quantizers import ActivationQuantizer

logger = logging.getLogger("slimkit")

PHASES = {"float": 0.0, "observing": 1.0, "frozen": 2.0}
FOLDED_ATTR = "_slimkit_folded_batchnorms"  # {bn name: "identity" | "frozen"} of a converted model
_PRUNING_MANIFEST_ATTR = "_slimkit_pruning"  # written by slimkit.prune's convert


@dataclasses.dataclass
class Phase:
    name: str
    fake_quant: bool
    observe: bool
    bn_frozen: bool


def phase_at(config: QuantConfig, step: int, calibrated: bool = False) -> Phase:
    """The schedule's state after ``step`` optimizer steps."""
    if config.mode == "ptq":  # float until calibrated, then fixed ranges
        return Phase("frozen", True, False, True) if calibrated else Phase("float", False, False, True)
    on = step >= config.start_step
    if config.mode == "dynamic":
        return Phase("observing" if on else "float", on, False, False)
    frozen_ranges = config.freeze_observers_step is not None and step >= config.freeze_observers_step
    bn_frozen = config.freeze_bn_step is not None and step >= config.freeze_bn_step
    name = "float" if not on else ("frozen" if frozen_ranges else "observing")
    return Phase(name, on, on and not frozen_ranges, bn_frozen)


def _pattern_for(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _exclude_hint(names: list[str]) -> str:
    patterns = sorted({_pattern_for(n) for n in names})
    shown = patterns if len(patterns) < len(names) else names
    return "quant.exclude: [" + ", ".join(f'"{n}"' for n in shown[:8]) + (", ..." if len(shown) > 8 else "") + "]"


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of weight Parameters that more than one module owns (tied embeddings / heads)."""
    owners: dict[int, int] = {}
    for _, module in user_named_modules(model):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return {k for k, v in owners.items() if v > 1}


class Quantizer(Method):
    name = "quant"
    config: QuantConfig

    def __init__(self, controller: Controller, config: QuantConfig, example_inputs: Any = None) -> None:
        super().__init__(controller, config)
        self.example_inputs = example_inputs
        self.layers: dict[str, nn.Module] = {}
        self.embeddings: dict[str, nn.Module] = {}  # quant.embeddings: weight-only, no input quantizer
        self.folded: dict[str, str] = {}  # conv name -> BatchNorm name
        self.plan = sites.Plan()
        # every activation quantizer by its state-dict prefix: layer inputs and sites
        self.quantizers: dict[str, nn.Module] = {}
        self.skipped_tied: list[str] = []
        self.equalized: list[equalization.Pair] = []  # quant.equalization: the layer pairs scaled
        self.phase = Phase("float", False, False, False)
        self._load_hook = None

    # -- prepare -----------------------------------------------------------------------------
    def select_layers(self, model: nn.Module) -> dict[str, str]:
        """name -> kind of every layer this recipe quantizes; raises for unsupported layers."""
        cfg = self.config
        for pattern in cfg.exclude:
            match_modules(model, pattern, role="quant.exclude: ")
        tied = _tied_weights(model)
        dynamic = cfg.mode == "dynamic"
        # null: the default, on for transformers models, where the embedding table is up to half of
        # the weights; an embedding that cannot be int8 then stays float instead of being an error
        auto_embeddings = cfg.embeddings is None
        embeddings = self.controller.adapter.library == "transformers" if auto_embeddings else cfg.embeddings
        selected: dict[str, str] = {}
        problems: list[tuple[str, nn.Module, str]] = []
        blocked: list[str] = []
        for name, module in user_named_modules(model):
            if not name or matches_any(name, cfg.exclude) or matches_any(name, blocked):
                continue
            kind = layer_kind(module)
            if kind is None and embeddings and isinstance(module, nn.Embedding):
                reason = qemb.embedding_problem(module)
                if reason is not None and auto_embeddings:
                    logger.info("quant: keeping embedding %s in float: %s", name, reason)
                elif reason is not None:
                    problems.append((name, module, reason))
                    blocked.append(name)
                elif id(module._parameters.get("weight")) in tied:
                    self.skipped_tied.append(name)
                else:
                    selected[name] = "embedding"
                continue
            if kind is None:
                reason = unsupported_reason(module)
                relevant = reason is not None and not (dynamic and isinstance(module, nn.modules.conv._ConvNd))
                if relevant:
                    problems.append((name, module, reason))
                    blocked.append(name)
                continue
            if dynamic and kind == "conv2d":
                continue  # dynamic INT8 is for Linear layers; convolutions stay in float
            if id(module._parameters.get("weight")) in tied:
                self.skipped_tied.append(name)
                continue
            selected[name] = kind
        if problems:
            lines = "\n".join(f"  - {n} ({type(m).__name__}): {r}" for n, m, r in problems)
            raise UnsupportedModelError(
                f"quant: {len(problems)} layer(s) of {type(model).__name__} cannot be quantized:\n{lines}\n"
                f"Keep them in floating point with {_exclude_hint([n for n, _, _ in problems])} "
                "(names or fnmatch patterns; a module's children are excluded with it)."
            )
        if not any(kind != "embedding" for kind in selected.values()):
            raise UnsupportedModelError(
                f"quant: {type(model).__name__} has no layer to quantize (Conv2d, Linear or GPT-2 Conv1D"
                + (", Linear only in mode: dynamic" if dynamic else "")
                + f"{' after quant.exclude' if cfg.exclude else ''})."
            )
        if self.skipped_tied:
            logger.info("quant: keeping layers with tied weights in float: %s", self.skipped_tied)
        return selected

    def _record(self, model: nn.Module, convs: dict[str, nn.Module]) -> Recording | None:
        """One watched forward pass, when BatchNorms may fold or conv outputs get sites."""
        cfg = self.config
        folds = cfg.fold_bn and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        if not convs and not cfg.equalization:
            return None
        if not (folds or self._wants_sites() or cfg.equalization):
            return None
        inputs = self.example_inputs
        if inputs is None:
            inputs = self.controller.adapter.example_inputs(model)
        with self.controller.suspended():
            return record(model, inputs)

    def _wants_sites(self) -> bool:
        return self.config.conv_outputs and self.config.mode != "dynamic"

    def prepare(self, model: nn.Module) -> None:
        cfg = self.config
        selected = self.select_layers(model)
        modules = dict(user_named_modules(model))
        for name in [n for n, kind in selected.items() if kind == "embedding"]:
            del selected[name]
            qemb.attach(modules[name])
            self.embeddings[name] = modules[name]
        convs = {n: modules[n] for n, k in selected.items() if k == "conv2d"}
        recording = self._record(model, convs)
        pairs = fold_pairs(recording, convs, batchnorms_with_statistics(model)) if recording and cfg.fold_bn else {}
        if cfg.equalization and recording is not None:
            weighted = {n: modules[n] for n, k in selected.items() if k in ("conv2d", "linear")}
            self.equalized = equalization.plan_pairs(recording, weighted, pairs)
            sweeps = equalization.equalize(modules, self.equalized)
            logger.info("quant: equalized %d layer pairs (%d sweeps)", len(self.equalized), sweeps)
        if recording is not None and self._wants_sites():
            folded_bns = {n: pairs[n][1] if n in pairs else None for n in convs}
            self.plan = sites.plan_sites(recording, selected, folded_bns, cfg.exclude)
        del recording  # it keeps every activation of the example pass alive
        spec = qat.WeightSpec(
            per_channel=cfg.weights.granularity == "per_channel",
            observer=cfg.weights.observer,
            percentile=cfg.weights.percentile,
            learn=cfg.learn_scales,
        )
        for name, kind in selected.items():
            bn_name, bn = pairs.get(name, (None, None))
            qat.attach(
                modules[name],
                kind,
                spec,
                cfg.activations,
                dynamic=cfg.mode == "dynamic",
                learn_activations=cfg.learn_scales,
                bn=bn,
                own_input=name not in self.plan.inputs,
            )
            self.layers[name] = modules[name]
            if cfg.bias_correction:  # zeros until calibrate measures it; present so checkpoints load
                out = modules[name].weight.shape[qat.OUT_AXIS[kind]]
                bias_correction.set_correction(modules[name], torch.zeros(out))
            if "input_quantizer" in modules[name]._modules:
                self.quantizers[f"{name}.input_quantizer"] = modules[name].input_quantizer
            if bn_name is not None:
                self.folded[name] = bn_name
        for site in self.plan.sites.values():
            if site.share is None:  # pass-through sites need nothing before conversion
                module = modules[site.module]
                device = next((t.device for t in module.parameters()), modules[next(iter(selected))].weight.device)
                quantizer = ActivationQuantizer(cfg.activations, cfg.learn_scales).to(device)
                sites.attach(module, site.where, quantizer)
                self.quantizers[f"{site.module}.{site.where}_quantizer"] = quantizer
        for name, (_, site_name) in self.plan.inputs.items():
            self.layers[name].__dict__[qat.STATE_ATTR].input_source = self._site_quantizer(site_name)
        self._load_hook = self.controller.state.register_load_state_dict_post_hook(self._after_load)
        self.apply_phase(self.controller.step)
        logger.info(
            "quant: %d layers and %d embeddings fake-quantized (%s), %d BatchNorms folded, %d activation sites",
            len(self.layers),
            len(self.embeddings),
            cfg.mode,
            len(self.folded),
            len(self.plan.sites),
        )

    # -- schedule ----------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return all(quantizer.has_range for quantizer in self.quantizers.values())

    def apply_phase(self, step: int) -> None:
        self.phase = phase_at(self.config, step, self.calibrated)
        for layer in self.layers.values():
            state = layer.__dict__[qat.STATE_ATTR]
            state.weight_fake_quant = self.phase.fake_quant
            if state.bn is not None:
                state.bn._slimkit_bn_frozen = self.phase.bn_frozen
        for embedding in self.embeddings.values():
            qemb.set_fake_quant(embedding, self.phase.fake_quant)
        for quantizer in self.quantizers.values():
            quantizer.fake_quant = self.phase.fake_quant
            quantizer.observe = self.phase.observe

    def _after_load(self, module: nn.Module, incompatible: Any) -> None:
        # A checkpoint restored the step and observer state: re-derive the phase from them.
        self.apply_phase(int(module.step))

    def on_step(self, model: nn.Module, step: int) -> None:
        self.apply_phase(step)

    def nonfinite_batches(self) -> int:
        """Batches that activation observers ignored because they held NaN / inf (the most any one
        observer ignored: every observer sees every batch)."""
        observers = [q.observer for q in self.quantizers.values() if hasattr(q, "observer")]
        return max((int(o.nonfinite_batches) for o in observers), default=0)

    def log_values(self) -> dict[str, float]:
        return {
            "quant/phase": PHASES[self.phase.name],
            "quant/bn_frozen": float(self.phase.bn_frozen),
            "quant/nonfinite_batches": float(self.nonfinite_batches()),
        }

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self, model: nn.Module, batches: Iterable, num_batches: int | None = None, allow_degenerate: bool = False
    ) -> int:
        """Run ``num_batches`` batches through the model in eval mode with the observers on and
        fake-quant off; returns the number of batches seen. Degenerate data is refused or
        warned about (:func:`calibrate`)."""
        if self.config.mode == "dynamic":
            raise IncompatibleError(
                "calibrate: quant.mode is 'dynamic', which computes activation ranges per batch at "
                "inference; there is nothing to calibrate. Use mode: ptq (or qat) for static ranges."
            )
        if num_batches is not None and num_batches < 1:
            raise SlimkitError(f"calibrate: num_batches must be >= 1, got {num_batches}")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        for layer in self.layers.values():
            layer.__dict__[qat.STATE_ATTR].weight_fake_quant = False
        for embedding in self.embeddings.values():  # layer inputs are observed in float
            qemb.set_fake_quant(embedding, False)
        for quantizer in self.quantizers.values():
            quantizer.fake_quant = False
            quantizer.calibrating = True
        seen = samples = 0
        spread = InputSpread()
        correcting = (
            bias_correction.BiasCorrection(
                self.layers, {n: self.layers[n].__dict__[qat.STATE_ATTR].kind for n in self.layers}
            )
            if self.config.bias_correction
            else contextlib.nullcontext()
        )
        try:
            with self.controller.suspended(), correcting:
                for batch in batches:
                    if num_batches is not None and seen >= num_batches:
                        break
                    inputs = model_inputs(batch, device)
                    call_model(model, inputs)
                    seen += 1
                    samples += batch_size(inputs)
                    spread.add(inputs)
        finally:
            for quantizer in self.quantizers.values():
                quantizer.calibrating = False
            model.train(was_training)
            self.apply_phase(self.controller.step)
        if seen == 0:
            raise SlimkitError("calibrate: the dataloader yielded no batches")
        check_calibration(self.quantizers, samples, spread, allow_degenerate)
        return seen

    # -- convert -------------------------------------------------------------------------------
    def _site_quantizer(self, name: str) -> nn.Module:
        """The quantizer whose qparams site ``name`` uses (pass-through sites: their source's)."""
        site = self.plan.sites[name]
        while site.share is not None:
            site = self.plan.sites[site.share]
        return self.quantizers[f"{site.module}.{site.where}_quantizer"]

    def _input_quantizer(self, name: str) -> nn.Module:
        """The quantizer whose qparams layer ``name``'s input uses."""
        if name in self.plan.inputs:
            return self._site_quantizer(self.plan.inputs[name][1])
        return self.layers[name].input_quantizer

    def _check_ranges(self) -> None:
        if self.config.mode == "dynamic":
            return
        layers = [n for n in self.layers if not self._input_quantizer(n).has_range]
        between = [n for n in self.plan.sites if not self._site_quantizer(n).has_range]
        if not layers and not between:
            return
        how = (
            "run slimkit.calibrate(model, dataloader, num_batches=...) first"
            if self.config.mode == "ptq"
            else f"train past quant.start_step ({self.config.start_step}) or run slimkit.calibrate(...)"
        )
        missing = layers or between
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        if layers:
            raise IncompatibleError(
                f"convert: the input observers of {len(layers)} of {len(self.layers)} quantized layers "
                f"never saw data ({shown}), so they have no activation range: {how}. Layers that never "
                f"run can be kept in float with {_exclude_hint(layers)}."
            )
        raise IncompatibleError(
            f"convert: the observers of {len(between)} of {len(self.plan.sites)} activation sites between "
            f"layers (conv outputs, residual adds) never saw data ({shown}): {how}, or set "
            "quant.conv_outputs: false to quantize layer inputs only."
        )

    def _site_qparams(self) -> dict[str, tuple[float, int]]:
        """Each site's uint8 qparams (pass-through sites: those of the site they share)."""
        return {name: self._site_quantizer(name).qparams() for name in self.plan.sites}

    def _check_finite_qparams(self, site_qparams: dict[str, tuple[float, int]]) -> None:
        """A NaN / inf / non-positive scale (learned scales trained on NaN losses) would make the
        INT8 model output plausible finite garbage: refuse it, naming the quantizers."""
        qparams = {f"site {n}": q for n, q in site_qparams.items()}
        qparams.update({f"input of {n}": q for n in self.layers if (q := self._input_qparams(n)) is not None})
        bad = [name for name, (scale, _) in qparams.items() if not (math.isfinite(scale) and scale > 0)]
        if bad:
            raise NonFiniteError(
                f"convert: {len(bad)} activation scale(s) are NaN, infinite or not positive ({', '.join(bad[:6])}"
                f"{', ...' if len(bad) > 6 else ''}); training diverged (learned scales) or a checkpoint is "
                "damaged. Resume from an earlier checkpoint or recalibrate with slimkit.calibrate."
            )

    def _input_qparams(self, name: str) -> tuple[float, int] | None:
        return None if self.config.mode == "dynamic" else self._input_quantizer(name).qparams()

    @torch.no_grad()
    def convert(self, model: nn.Module) -> nn.Module:
        require_int8_engine()
        self._check_ranges()
        modules = dict(user_named_modules(model))
        folded: dict[str, str] = dict(model.__dict__.get(FOLDED_ATTR, {}))
        site_qparams = self._site_qparams()
        self._check_finite_qparams(site_qparams)
        for name in self.plan.sites:
            sites.detach(modules[name])
        diverged = [n for n, layer in self.layers.items() if not bool(torch.isfinite(layer.weight).all())]
        if diverged:
            raise NonFiniteError(
                f"convert: the weights of {', '.join(diverged[:6])} hold NaN / inf (training diverged); "
                "resume from an earlier checkpoint"
            )
        for name, layer in self.layers.items():
            state: qat.LayerState = layer.__dict__[qat.STATE_ATTR]
            input_qparams = self._input_qparams(name)
            weight_int8, scale, bias = qat.int8_parameters(layer, input_qparams and input_qparams[0])
            from_site = self.plan.inputs.get(name, ("",))[0] == "site"
            original = layer.__dict__[qat.ORIGINAL_CLASS_ATTR]
            qat.detach_layer(layer)
            make_int8(layer, state.kind, original, weight_int8, scale, bias, input_qparams, from_site)
            if state.bn is not None:
                bn_name = self.folded[name]
                folded[bn_name] = _fold_away(model, bn_name, modules[bn_name])
        for name, site in self.plan.sites.items():  # by name: a folded BatchNorm is an Identity now
            sites.install_int8(
                model.get_submodule(name), site.where, *site_qparams[name], read_by_layers_only=site.read_by_layers_only
            )
        for embedding in self.embeddings.values():
            qemb.convert(embedding)
        model.__dict__[FOLDED_ATTR] = folded
        runtime.install(model, self.config.compile)
        self._forget_training_tensors(model, [*self.quantizers, *(f"{n}.weight_scale" for n in self.layers)])
        self.layers = {}
        self.embeddings = {}
        self.quantizers = {}
        self.plan = sites.Plan()
        return model

    @staticmethod
    def _forget_training_tensors(model: nn.Module, names: list[str]) -> None:
        """Drop the fake-quant tensors from the pruning manifest: pruning records every tensor
        it sliced (a learned ``weight_scale`` included) and replays that list on a freshly built
        model at load time, where they do not exist; the INT8 block rebuilds them instead.
        ``names`` are tensors (``conv.weight_scale``) and quantizer modules (everything under)."""
        manifest = model.__dict__.get(_PRUNING_MANIFEST_ATTR)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
            return
        prefixes = tuple(f"{n}." for n in names)
        manifest["tensors"] = {
            k: v for k, v in manifest["tensors"].items() if k not in names and not k.startswith(prefixes)
        }

    def remove(self, model: nn.Module) -> None:
        modules = dict(user_named_modules(model))
        for name in self.plan.sites:
            sites.detach(modules[name])
        for layer in self.layers.values():
            qat.detach_layer(layer)
        for embedding in self.embeddings.values():
            qemb.detach(embedding)
        self.layers = {}
        self.embeddings = {}
        self.quantizers = {}
        self.plan = sites.Plan()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None


def _fold_away(model: nn.Module, name: str, bn: nn.Module) -> str:
    """Take a folded BatchNorm out of the computation: an exact ``nn.BatchNorm2d`` becomes
    ``nn.Identity``; a subclass with more behaviour (timm's BatchNormAct2d runs its activation)
    keeps that behaviour with identity statistics, frozen."""
    qat.restore_class(bn)
    if type(bn) is nn.BatchNorm2d:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Identity())
        return "identity"
    neutralize_batchnorm(bn)
    return "frozen"


def neutralize_batchnorm(bn: nn.Module) -> None:
    """Identity statistics (mean 0, var 1, eps 0, gamma 1, beta 0), running stats always used."""
    if bn.weight is not None:
        bn.weight.data.fill_(1.0)
        bn.bias.data.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    qat.swap_class(bn, qat.FreezableBatchNorm, "Folded")
    bn._slimkit_bn_frozen = True
    bn.__dict__[qat.NEUTRAL_ATTR] = True  # runs only what it does besides normalizing, if known
