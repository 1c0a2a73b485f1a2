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

The method plans what to quantize (:mod:`.selection`, BatchNorm pairs :mod:`.fold`, activation
sites :mod:`.sites`) and then runs one lifecycle (:mod:`.lifecycle`) over its targets
(:mod:`.targets`): attach at prepare, set_phase every step, to_int8 at convert, detach on remove.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from ..adapters import call_model
from ..batches import model_inputs
from ..controller import Controller, Method
from ..distributed import broadcast_, is_distributed
from ..errors import IncompatibleError, NonFiniteError
from ..model_info import add_method_notes
from ..modules import user_named_modules
from ..recipe import QuantConfig
from . import bias_correction, equalization, keep_fp32, runtime, sites
from .calibration import InputSpread, batch_size, check_calibration
from .dataflow import Recording, record
from .fold import batchnorms_with_statistics, fold_pairs
from .int8 import require_int8_engine
from .int8_hardware import resolve_weight_bits
from .lifecycle import Phase, QuantTarget, calibrating, phase_at
from .numerics import weight_qmax
from .selection import exclude_hint, select_layers
from .state import WeightSpec
from .targets import EmbeddingTarget, LayerTarget, SiteTarget, detach_copy

logger = logging.getLogger("slimkit")

PHASES = {"float": 0.0, "observing": 1.0, "frozen": 2.0}


class Quantizer(Method):
    name = "quant"
    config: QuantConfig

    def __init__(self, controller: Controller, config: QuantConfig, example_inputs: Any = None) -> None:
        super().__init__(controller, config)
        self.example_inputs = example_inputs
        # every target in lifecycle order: layers, then sites, then embeddings (targets.TARGET_KINDS)
        self.targets: list[QuantTarget] = []
        self.plan = sites.Plan()
        # every activation quantizer by its state-dict prefix: layer inputs and sites
        self.quantizers: dict[str, nn.Module] = {}
        self.skipped_tied: list[str] = []
        self.equalized: list[equalization.Pair] = []  # quant.equalization: the layer pairs scaled
        self.phase = Phase("float", False, False, False)
        self._load_hook = None
        self.kept_fp32: keep_fp32.Choice | None = None  # quant.keep_fp32, once calibrate chose

    # -- introspection (tests, reports) ---------------------------------------------------------
    def _of(self, kind: type) -> dict[str, Any]:
        return {t.name: t for t in self.targets if isinstance(t, kind)}

    @property
    def layers(self) -> dict[str, nn.Module]:
        """Fake-quant layers by name."""
        return {name: t.module for name, t in self._of(LayerTarget).items()}

    @property
    def embeddings(self) -> dict[str, nn.Module]:
        """Fake-quant embeddings by name (``quant.embeddings``: weight-only)."""
        return {name: t.module for name, t in self._of(EmbeddingTarget).items()}

    @property
    def folded(self) -> dict[str, str]:
        """conv name -> name of the BatchNorm folded into it."""
        return {name: t.bn_name for name, t in self._of(LayerTarget).items() if t.bn_name is not None}

    # -- prepare -----------------------------------------------------------------------------
    def _planned(self) -> QuantConfig:
        """The config prepare plans with: the recipe's, with the layers keep_fp32 chose excluded."""
        if self.kept_fp32 is None or not self.kept_fp32.layers:
            return self.config
        return dataclasses.replace(self.config, exclude=[*self.config.exclude, *self.kept_fp32.layers])

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
        # before any training: quant.compile onnxruntime without its packages would fail only at convert
        runtime.check_mode(self.config.compile, "prepare")
        cfg = self._planned()
        selection = select_layers(model, cfg, self.controller.adapter)
        self.skipped_tied = selection.skipped_tied
        modules = dict(user_named_modules(model))
        selected = {n: k for n, k in selection.kinds.items() if k != "embedding"}
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
            # exactly nn.SiLU: GatedSiLU replaces its forward, so no subclass's own forward is lost
            gates = [n for n, m in modules.items() if type(m) is nn.SiLU] if cfg.gates else None
            self.plan = sites.plan_sites(recording, selected, folded_bns, cfg.exclude, gates)
        del recording  # it keeps every activation of the example pass alive
        spec = WeightSpec(
            per_channel=cfg.weights.granularity == "per_channel",
            observer=cfg.weights.observer,
            percentile=cfg.weights.percentile,
            learn=cfg.learn_scales,
            qmax=weight_qmax(resolve_weight_bits(cfg.weights.bits)),
        )
        layers = {
            name: LayerTarget(
                name,
                modules[name],
                kind,
                spec,
                cfg.activations,
                dynamic=cfg.mode == "dynamic",
                bias_correction=cfg.bias_correction,
                folded=pairs.get(name),
                own_input=name not in self.plan.inputs,
            )
            for name, kind in selected.items()
        }
        device = modules[next(iter(selected))].weight.device
        site_targets = {
            name: SiteTarget(site, cfg.activations, cfg.learn_scales, device) for name, site in self.plan.sites.items()
        }
        embeddings = [EmbeddingTarget(n, modules[n]) for n, k in selection.kinds.items() if k == "embedding"]
        self.targets = [*layers.values(), *site_targets.values(), *embeddings]
        for target in self.targets:
            target.attach(model)
        for site in site_targets.values():  # pass-through sites use their source's quantizer
            source = site.site
            while source.share is not None:
                source = self.plan.sites[source.share]
            site.source = site_targets[source.module]
        for name, (how, site_name) in self.plan.inputs.items():
            layers[name].use_input_of(site_targets[site_name].quantizer, from_site=how == "site")
        self.quantizers = {k: q for target in self.targets for k, q in target.quantizers().items()}
        self._load_hook = self.controller.state.register_load_state_dict_post_hook(self._after_load)
        self.apply_phase(self.controller.step)
        logger.info(
            "quant: %d layers and %d embeddings fake-quantized (%s), %d BatchNorms folded, %d activation sites",
            len(layers),
            len(embeddings),
            cfg.mode,
            len(self.folded),
            len(self.plan.sites),
        )

    # -- schedule ----------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return all(quantizer.has_range for quantizer in self.quantizers.values())

    def _set_phase(self, phase: Phase) -> None:
        for target in self.targets:
            target.set_phase(phase)

    def apply_phase(self, step: int) -> None:
        self.phase = phase_at(self.config, step, self.calibrated)
        self._set_phase(self.phase)

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
    def nothing_to_calibrate(self) -> str:
        return (
            "quant.mode is 'dynamic', which computes activation ranges per batch at inference; use mode: "
            "ptq (or qat) for static ranges"
        )

    def takes_calibration(self) -> bool:
        return self.config.mode != "dynamic"

    def waits_for_calibration(self) -> bool:
        return self.config.mode == "ptq" and not self.calibrated

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: list, *, allow_degenerate: bool = False) -> None:
        """Run the batches through the model in eval mode with the observers on and fake-quant
        off (``slimkit.calibrate``). Degenerate data is refused or warned about
        (:func:`slimkit.quant.calibration.check_calibration`). With ``keep_fp32``, the layers to
        keep in float are then measured and chosen, and the model is prepared again without them
        and recalibrated (:mod:`.keep_fp32`)."""
        self._observe(model, batches, allow_degenerate)
        if self.config.keep_fp32 is None or self.kept_fp32 is not None:
            return
        candidates = self._of(LayerTarget)
        choice = keep_fp32.choose(
            model,
            {name: target.module for name, target in candidates.items()},
            batches[: self.config.keep_fp32_batches],
            self.config,
            lambda fake_quant: self._measuring(model, fake_quant),
        )
        self.kept_fp32 = self._agreed(choice, list(candidates))
        logger.info("quant.keep_fp32: %s", self.kept_fp32.describe())
        if self.kept_fp32.layers:
            self.remove(model)
            self.prepare(model)
            self._observe(model, batches, allow_degenerate)

    def _agreed(self, choice: keep_fp32.Choice, names: list[str]) -> keep_fp32.Choice:
        """Under DDP every process measured on its own batches: all take rank 0's layers."""
        if not is_distributed():
            return choice
        keep = torch.tensor([float(n in choice.layers) for n in names])
        broadcast_([keep])
        layers = [n for n, kept in zip(names, keep.tolist()) if kept]
        return dataclasses.replace(choice, layers=sorted(layers, key=lambda n: -choice.recovery[n]))

    @contextlib.contextmanager
    def _evaluating(self, model: nn.Module, phase: Phase):
        """The whole model in eval mode in ``phase``, the other methods suspended; the schedule's
        phase and the model's mode come back afterwards."""
        was_training = model.training
        model.eval()
        self._set_phase(phase)
        try:
            with self.controller.suspended():
                yield
        finally:
            model.train(was_training)
            self.apply_phase(self.controller.step)

    def _measuring(self, model: nn.Module, fake_quant: bool):
        """Fake-quantized with the calibrated ranges, or in float (keep_fp32's measurements)."""
        name = "frozen" if fake_quant else "float"
        return self._evaluating(model, Phase(name, fake_quant, False, self.phase.bn_frozen))

    def _observe(self, model: nn.Module, batches: list, allow_degenerate: bool) -> None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        samples = 0
        spread = InputSpread()
        layers = self._of(LayerTarget)
        correcting = (
            bias_correction.BiasCorrection(
                {n: t.module for n, t in layers.items()}, {n: t.kind for n, t in layers.items()}
            )
            if self.config.bias_correction
            else contextlib.nullcontext()
        )
        # layer inputs are observed as the float model produces them
        with self._evaluating(model, calibrating(self.phase)), correcting:
            for batch in batches:
                inputs = model_inputs(batch, device)
                call_model(model, inputs)
                samples += batch_size(inputs)
                spread.add(inputs)
        check_calibration(self.quantizers, samples, spread, allow_degenerate)

    # -- convert -------------------------------------------------------------------------------
    def _check_ranges(self) -> None:
        if self.config.mode == "dynamic":
            return
        layers = self._of(LayerTarget)
        site_targets = self._of(SiteTarget)
        missing_layers = [n for n, t in layers.items() if not t.input_quantizer.has_range]
        between = [n for n, t in site_targets.items() if not t.quantizer.has_range]
        if not missing_layers and not between:
            return
        how = (
            "run slimkit.calibrate(model, dataloader, num_batches=...) first"
            if self.config.mode == "ptq"
            else f"train past quant.start_step ({self.config.start_step}) or run slimkit.calibrate(...)"
        )
        missing = missing_layers or between
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        if missing_layers:
            raise IncompatibleError(
                f"convert: the input observers of {len(missing_layers)} of {len(layers)} quantized layers "
                f"never saw data ({shown}), so they have no activation range: {how}. Layers that never "
                f"run can be kept in float with {exclude_hint(missing_layers)}."
            )
        raise IncompatibleError(
            f"convert: the observers of {len(between)} of {len(site_targets)} activation sites between "
            f"layers (conv outputs, residual adds) never saw data ({shown}): {how}, or set "
            "quant.conv_outputs: false to quantize layer inputs only."
        )

    def _check_finite(self) -> None:
        """A NaN / inf / non-positive scale (learned scales trained on NaN losses) would make the
        INT8 model output plausible finite garbage: refuse it, naming the quantizers; so would
        diverged weights."""
        qparams = {f"site {n}": t.quantizer.qparams() for n, t in self._of(SiteTarget).items()}
        layers = self._of(LayerTarget)
        qparams.update({f"input of {n}": q for n, t in layers.items() if (q := t.input_qparams()) is not None})
        bad = [name for name, (scale, _) in qparams.items() if not (math.isfinite(scale) and scale > 0)]
        if bad:
            raise NonFiniteError(
                f"convert: {len(bad)} activation scale(s) are NaN, infinite or not positive ({', '.join(bad[:6])}"
                f"{', ...' if len(bad) > 6 else ''}); training diverged (learned scales) or a checkpoint is "
                "damaged. Resume from an earlier checkpoint or recalibrate with slimkit.calibrate."
            )
        diverged = [n for n, t in layers.items() if not bool(torch.isfinite(t.module.weight).all())]
        if diverged:
            raise NonFiniteError(
                f"convert: the weights of {', '.join(diverged[:6])} hold NaN / inf (training diverged); "
                "resume from an earlier checkpoint"
            )

    @torch.no_grad()
    def convert(self, model: nn.Module) -> nn.Module:
        require_int8_engine()
        if self.config.keep_fp32 is not None and self.kept_fp32 is None:
            raise IncompatibleError(
                "convert: quant.keep_fp32 chooses the layers to keep in float at slimkit.calibrate(model, "
                "batches), which never ran on this model; calibrate first (before QAT training too), or name "
                "the layers in quant.exclude and drop keep_fp32"
            )
        self._check_ranges()
        self._check_finite()
        for target in self.targets:
            target.to_int8(model)
        runtime.install(model, self.config.compile)
        if self.kept_fp32 is not None:
            add_method_notes(model, {"layers kept in float (quant.keep_fp32)": self.kept_fp32.describe()})
        # pruning recorded every tensor it sliced, a learned weight_scale included; the INT8 block
        # rebuilds those at load time instead (a method edits another's state only through its API)
        from ..prune.manifest import forget_tensors

        forget_tensors(model, [*self.quantizers, *(f"{n}.weight_scale" for n in self.layers)])
        self._forget()
        return model

    def _forget(self) -> None:
        self.targets = []
        self.quantizers = {}
        self.plan = sites.Plan()

    def detach_copy(self, copy: nn.Module) -> None:
        detach_copy(copy)

    def remove(self, model: nn.Module) -> None:
        for target in self.targets:
            target.detach(model)
        self._forget()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
