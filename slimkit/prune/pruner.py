"""The pruning method: masks while training, physical removal at ``convert``.

``prepare`` finds the units (channel groups from the dependency graph, head groups from the
adapter), checks on a copy that masking them equals removing them, and registers its state
under ``controller.state.prune``: which units are pruned, the Taylor statistics, the
unstructured / N:M keep masks and the last pruning point done. Being buffers of the model,
they are in every checkpoint, so ``resume_from_checkpoint`` continues exactly, and DDP keeps
them in sync. After every optimizer step (``on_step``) the schedule may prune more units;
then every masked weight is set back to zero. ``convert`` slices the pruned units out of every
coupled layer, updates attention attributes and config fields, and records the manifest of
final shapes that ``save_pretrained`` writes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..adapters import call_model
from ..controller import Controller, Method
from ..distributed import mul_mask_
from ..errors import UnsupportedModelError
from ..model_info import add_method_notes
from ..modules import get_module
from ..recipe import PruneConfig
from . import manifest
from .blocks import block_module, remove_blocks, renamer
from .data_aware import PointData, missing_data_error
from .depth import DepthPruning, setup_depth
from .discovery import find_channel_groups, find_head_groups, find_sparse_weights
from .heads import set_head_counts
from .oneshot import calibrate_point, call_on_batch, reconstruct_point
from .points import prune_to_point
from .reconstruct import recalibrate_batchnorms
from .schedule import due_point, pruning_points, target_at_point
from .scope import pruned_scope
from .slicing import remove_units
from .state import PruneState, UnitKind, broadcast, distributed
from .target import DEFAULT_ROUND_TO, TargetOutcome, restored_outcome
from .units import UnitGroup, apply_zero_plan, zero_plan
from .verify import find_inexact

logger = logging.getLogger("slimkit")


class Pruner(Method):
    """Structured pruning (channels, MLP neurons, heads) and unstructured / N:M masks."""

    name = "prune"
    config: PruneConfig

    def __init__(self, controller: Controller, config: PruneConfig, example_inputs: Any = None) -> None:
        super().__init__(controller, config)
        self.example_inputs = example_inputs
        self.transposed: dict[type, tuple[str, str]] = {}
        self.channels = UnitKind("channels", [], config.channels, config.round_to)
        self.heads = UnitKind("heads", [], config.heads, None)
        self.skipped: dict[str, str] = {}  # channel group root -> why it is left whole
        self.sparse_weights: list[str] = []  # modules whose weights carry keep masks
        self.excluded: set[str] = set()
        self.included: set[str] | None = None  # prune.include: only these modules (None: all)
        self.depth: DepthPruning | None = None
        self.state: PruneState | None = None
        self.data: PointData | None = None  # recorded inputs / gradients of data-aware points
        self._deferred: int | None = None  # a point due at prepare that waits for slimkit.calibrate
        self._deferred_hook = None
        self._plan: list | None = None
        self._sparse_tensors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._removed: float | None = None
        self._model_ref: nn.Module | None = None
        self._converted = False
        self._synced = False
        self.target_outcome: TargetOutcome | None = None  # prune.target: what was asked, predicted, measured

    # ------------------------------------------------------------------------------------
    # prepare
    # ------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        cfg = self.config
        adapter = self.controller.adapter
        self.transposed = dict(adapter.transposed_linear_types())
        self.excluded = self._excluded(model)
        layouts = adapter.attention_heads(model) if cfg.width else []
        if cfg.heads > 0 or (cfg.target is not None and layouts):
            self.heads = UnitKind("heads", self._head_groups(model, layouts), cfg.heads, None)
        if cfg.channels > 0 or cfg.target is not None:
            self.channels = UnitKind("channels", self._channel_groups(model, layouts), cfg.channels, self._round_to)
        if cfg.width and cfg.verify:
            with self.controller.suspended():
                find_inexact(
                    model,
                    self.channels.groups + self.heads.groups,
                    self._inputs(model),
                    call_model,
                    self.transposed,
                    memo={id(self.controller): self.controller},
                    finish=lambda probe, groups, masks: set_head_counts(probe, adapter, groups, masks),
                )
        self.sparse_weights, sparse_shapes = find_sparse_weights(
            model, cfg, self.excluded, self.included, self.transposed
        )
        gradient = cfg.importance if cfg.gradient_based else None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        target_groups = len(self.channels.groups) + len(self.heads.groups) if cfg.target is not None else None
        self.state = PruneState(self.channels.total, self.heads.total, gradient, sparse_shapes, target_groups)
        self.state = self.state.to(device)
        self.state.register_load_state_dict_post_hook(lambda module, keys: self._after_load())
        if cfg.layers > 0:
            self.depth = self._depth_setup(model)
            self.state.add_module("depth", self.depth.state)
        self.controller.state.add_module("prune", self.state)
        self._model_ref = model
        if cfg.records_inputs or cfg.gradient_based:
            self.data = PointData(model, cfg, [self.channels, self.heads], self.transposed)
        self._advance(model, self.controller.step, prepare=True)

    def _head_groups(self, model: nn.Module, layouts: list) -> list[UnitGroup]:
        try:
            return find_head_groups(model, layouts, self.excluded, self.included)
        except UnsupportedModelError as exc:
            if self.config.target is None:
                raise
            # a target chooses among what can be pruned: heads that cannot be are left whole
            logger.warning("prune.target: attention heads are left whole: %s", exc)
            return []

    @property
    def _round_to(self) -> int | None:
        cfg = self.config
        return cfg.round_to if cfg.round_to is not None or cfg.target is None else DEFAULT_ROUND_TO

    def _inputs(self, model: nn.Module) -> Any:
        """Example inputs for tracing (dict inputs get the adapter's trace kwargs)."""
        adapter = self.controller.adapter
        inputs = self.example_inputs if self.example_inputs is not None else adapter.example_inputs(model)
        if isinstance(inputs, dict):
            inputs = {**inputs, **adapter.trace_kwargs(model)}
        return inputs

    def _excluded(self, model: nn.Module) -> set[str]:
        excluded, self.included = pruned_scope(model, self.controller.adapter, self.config)
        return excluded

    def _depth_setup(self, model: nn.Module) -> DepthPruning:
        with self.controller.suspended():
            return setup_depth(
                model, self.config, self.controller.adapter, self._inputs(model), {id(self.controller): self.controller}
            )

    def _channel_groups(self, model: nn.Module, layouts: list) -> list[UnitGroup]:
        with self.controller.suspended():
            groups, self.skipped = find_channel_groups(
                model, self._inputs(model), layouts, self.transposed, self.excluded, self.included, self._round_to
            )
        return groups

    # ------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------
    def on_step(self, model: nn.Module, step: int) -> None:
        if not self._synced:
            # prepare may have run before the process group existed (masks of step 0 computed
            # per process): from the first step on, every process holds rank 0's state.
            if distributed():
                broadcast(list(self.state.buffers()))
            self._invalidate()  # and a plan made before fully_shard names the replaced parameters
            self._synced = True
        if self.data is not None and self.data.gradients is not None:
            self.data.gradients.flush(self.state)
        if self.depth is not None:
            self.depth.fold()
        self.run_deferred(model)
        self._advance(model, step)

    def _advance(self, model: nn.Module, step: int, prepare: bool = False) -> None:
        point = due_point(self.config.schedule, step, int(self.state.last_point))
        if point is not None and prepare and self._waits_for_data(point):
            self._defer(model, point)
        elif point is not None:
            self._point(model, point)
        if self.data is not None:
            if int(self.state.last_point) >= pruning_points(self.config.schedule)[-1]:
                self.data.finished()  # nothing left to rank or refit
                self.data = None
            else:
                self.data.window(step, int(self.state.last_point))
        if self.depth is not None:
            self._advance_depth(model, step)
        self.apply_masks(model)

    def _advance_depth(self, model: nn.Module, step: int) -> None:
        if self.config.target is not None and not bool(self.state.target_solved):
            return  # with a target its solver chooses the blocks, at the first pruning point
        with self.controller.suspended():
            changed = self.depth.advance(model, step)
        if changed:
            broadcast(changed)
            self.depth.refresh()
            self._invalidate()

    # -- data-aware points -------------------------------------------------------------------
    def _targets(self, point: int) -> bool:
        if self.config.target is not None:
            return target_at_point(self.config.schedule, 0.5, point) > 0
        return any(target_at_point(self.config.schedule, k.final, point) > 0 for k in (self.channels, self.heads))

    def _waits_for_data(self, point: int) -> bool:
        return self.data is not None and self._targets(point) and bool(self.data.lacking(self.state))

    def _needs_calibration(self) -> bool:
        """Whether a step-0 point cannot be done without data (not only allocated with it)."""
        cfg = self.config
        return cfg.importance in ("activation", "obs", "taylor", "fisher") or cfg.reconstruct

    def _defer(self, model: nn.Module, point: int) -> None:
        """Keep a point due at prepare for slimkit.calibrate. If calibrate does not come, the
        point is done (or refused, when it cannot be done without data) at the first training
        forward, step or convert; a point that only allocates by sensitivity is done at the
        first forward of any kind, with normalised scores."""
        self._deferred = point

        def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.controller._suspended:
                return
            if not self._needs_calibration() or (module.training and torch.is_grad_enabled()):
                self.run_deferred(module)

        self._deferred_hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def _clear_deferred(self) -> None:
        self._deferred = None
        if self._deferred_hook is not None:
            self._deferred_hook.remove()
            self._deferred_hook = None

    def run_deferred(self, model: nn.Module) -> None:
        """Perform a point that waited for calibration data, with the data there is."""
        if self._deferred is None:
            return
        point = self._deferred
        missing = self.data.lacking(self.state) if self.data is not None else []
        if missing and self._needs_calibration():
            raise missing_data_error(self.config, point, missing)  # still pending: calibrate may come
        self._clear_deferred()
        self._point(model, point)
        self.apply_masks(model)

    def _point(self, model: nn.Module, point: int, reconstruct: bool | None = None) -> None:
        """Prune to ``point`` with the statistics gathered for it, refit, and mark it done."""
        before = [p.clone() for p in self._pruned()]
        recorder = self.data.recorder if self.data is not None else None
        if recorder is not None and recorder.seen == 0 and self._targets(point):
            logger.warning(
                "prune: no layer inputs were recorded before the pruning point at step %d (no training "
                "forwards in the last prune.statistics_steps steps); ranking by l2 and not refitting",
                point,
            )
        prune_to_point(self, model, point)
        refit = self.config.reconstruct if reconstruct is None else reconstruct
        if refit and self.data is not None:
            self._broadcast_refit(reconstruct_point(self, before, self._pruned()))
        self.state.last_point.fill_(point)
        if self.data is not None:
            self.data.after_point()
        self._invalidate()

    def _pruned(self) -> list[torch.Tensor]:
        """The pruned mask of every group (channels, then heads), on the CPU."""
        flat = self.channels.split(self.state.channels_pruned) + self.heads.split(self.state.heads_pruned)
        return [p.cpu() for p in flat]

    def _broadcast_refit(self, modules: list[nn.Module]) -> None:
        tensors = [t.data for m in modules for t in (m.weight, getattr(m, "bias", None)) if t is not None]
        broadcast(tensors)

    def takes_calibration(self) -> bool:
        return self._deferred is not None or self.depth is not None

    def waits_for_calibration(self) -> bool:
        depth_waits = (
            self.depth is not None and self.config.layer_importance == "output_cosine" and not self.depth.batches
        )
        return self._deferred is not None or depth_waits

    def calibrate(self, model: nn.Module, batches: list, *, allow_degenerate: bool = False) -> None:
        """``slimkit.calibrate``: a waiting point gathers its statistics from the batches and prunes;
        ``prune.layers`` ranks blocks on them (and removes them now when due at this step).
        ``allow_degenerate`` concerns quantization ranges only."""
        blocks_before = self._blocks_removed()
        refit = self._deferred is not None and self.config.reconstruct
        if self._deferred is not None:
            calibrate_point(self, model, batches, self._deferred)
            self._clear_deferred()
            self._advance(model, self.controller.step)  # masks; drops the recorders if no point is left
        if self.depth is not None:
            with self.controller.suspended():
                self.depth.calibrate(model, batches)
            self._advance_depth(model, self.controller.step)
        if refit and self._blocks_removed() > blocks_before:
            # the point recomputed BatchNorm statistics with these blocks still in the forward; the
            # layers after a removed block see other inputs without it. prune.target judged its
            # plans with statistics taken after the removal (on MobileNetV3 at 2x, 8 blocks out:
            # output cosine 0.26 against the 0.75 the plan measured, before this pass)
            with self.controller.suspended():
                recalibrate_batchnorms(model, batches, call_on_batch)

    def _blocks_removed(self) -> int:
        return 0 if self.depth is None else int(self.depth.state.removed.sum())

    def nothing_to_calibrate(self) -> str:
        cfg = self.config
        if not cfg.structured or not (cfg.records_inputs or cfg.gradient_based):
            return f"prune: importance '{cfg.importance}' needs no data (units were ranked at prepare)"
        return (
            f"prune: no pruning point is due at step {self.controller.step} (schedule starts at "
            f"{cfg.schedule.start_step}; later points record training forwards)"
        )

    def _after_load(self) -> None:
        # A checkpoint restored the state: a point it already did no longer waits for data.
        if self._deferred is not None and int(self.state.last_point) >= self._deferred:
            self._clear_deferred()
        if self.config.target is not None and bool(self.state.target_solved) and self.target_outcome is None:
            self.target_outcome = restored_outcome(self)  # the widths; the timings were not checkpointed
        self._invalidate()

    def _invalidate(self) -> None:
        self._plan = None
        self._sparse_tensors = None
        self._removed = None

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Set every masked weight back to zero (after each optimizer step)."""
        if self._plan is None:
            groups = self.channels.groups + self.heads.groups
            pruned = self.channels.split(self.state.channels_pruned) + self.heads.split(self.state.heads_pruned)
            self._plan = zero_plan(model, groups, pruned, self.transposed)
        apply_zero_plan(self._plan)
        if self._sparse_tensors is None:
            self._sparse_tensors = [
                (get_module(model, n).weight, getattr(self.state, f"keep_{i}"))
                for i, n in enumerate(self.sparse_weights)
            ]
        for weight, keep in self._sparse_tensors:
            mul_mask_(weight, keep)

    # ------------------------------------------------------------------------------------
    # reporting
    # ------------------------------------------------------------------------------------
    def _removed_fraction(self) -> float:
        """Fraction of the model's parameters that are removed (structured) or masked to zero."""
        if self._removed is None:
            model = self._model_ref
            total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("slimkit."))
            removed: dict[int, torch.Tensor] = {}
            for tensor, keep in self._plan or []:
                mask = removed.setdefault(id(tensor), torch.zeros(tensor.shape, dtype=torch.bool))
                mask |= (keep == 0).cpu()
            for weight, keep in self._sparse_tensors or []:
                mask = removed.setdefault(id(weight), torch.zeros(weight.shape, dtype=torch.bool))
                mask |= ~keep.cpu()
            for block in self.depth.removed_blocks() if self.depth is not None else []:
                for tensor in block_module(model, block).parameters():
                    removed[id(tensor)] = torch.ones(tensor.shape, dtype=torch.bool)
            self._removed = sum(int(m.sum()) for m in removed.values()) / max(total, 1)
        return self._removed

    def skipped_modules(self) -> list[str]:
        if self.depth is None or self._converted:
            return []
        return [self.depth.blocks[i].name for i in sorted(self.depth.hooks.gated)]

    def log_values(self) -> dict[str, float]:
        if self.state is None or self._converted:
            return {}
        if self._plan is None:
            self.apply_masks(self._model_ref)
        out: dict[str, float] = {}
        for kind in (self.channels, self.heads):
            if kind.groups:
                out[f"prune/{kind.name}"] = float(getattr(self.state, f"{kind.name}_pruned").float().mean())
        if self.sparse_weights:
            keeps = [getattr(self.state, f"keep_{i}") for i in range(len(self.sparse_weights))]
            out["prune/sparsity"] = sum(int((~k).sum()) for k in keeps) / sum(k.numel() for k in keeps)
        if self.depth is not None:
            out.update(self.depth.log_values())
        out["prune/params"] = self._removed_fraction()
        return out

    def summary(self) -> dict[str, Any]:
        """What is pruned now, per kind: units pruned / prunable, and the groups left whole."""
        out: dict[str, Any] = {}
        for kind in (self.channels, self.heads):
            if kind.groups:
                flat = getattr(self.state, f"{kind.name}_pruned")
                out[kind.name] = {"pruned": int(flat.sum()), "prunable": kind.total}
        if self.depth is not None:
            out["layers"] = {
                "removed": [b.name for b in self.depth.removed_blocks()],
                "removable": [b.name for b in self.depth.blocks],
            }
        out["skipped"] = dict(self.skipped)
        if self.target_outcome is not None:
            out["target"] = self.target_outcome.as_dict()
        return out

    # ------------------------------------------------------------------------------------
    # convert
    # ------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        self.run_deferred(model)
        self.apply_masks(model)
        values = self.log_values()
        if not self.config.structured:
            self._report(model, values)
            self._converted = True
            return model
        adapter = self.controller.adapter
        before = manifest.snapshot(model)
        groups = self.channels.groups + self.heads.groups
        pruned = self.channels.split(self.state.channels_pruned) + self.heads.split(self.state.heads_pruned)
        pruned = [p.cpu() for p in pruned]
        remove_units(model, groups, pruned, self.transposed)
        heads = set_head_counts(model, adapter, groups, pruned)
        layers, config = {}, {}
        if self.depth is not None:
            removed = self.depth.removed_blocks()
            self.depth.remove()
            layers, config = remove_blocks(model, self.depth.stacks, set(removed), adapter)
            rename = renamer(layers)
            heads = {rename(k): v for k, v in heads.items() if rename(k) is not None}
        config.update(adapter.after_pruning(model))
        block = manifest.changes(before, manifest.snapshot(model))
        block.update({"format": manifest.MANIFEST_FORMAT, "heads": heads, "config": config})
        if layers:
            block["layers"] = layers
        manifest.set_manifest(model, manifest.merge(manifest.manifest_of(model), block))
        self._report(model, values)
        self._converted = True
        return model

    def _report(self, model: nn.Module, values: dict[str, float]) -> None:
        report = {}
        names = {
            "prune/channels": "channels / MLP neurons removed",
            "prune/heads": "attention heads removed",
            "prune/sparsity": f"weight sparsity ({self.config.nm or 'unstructured'}, dense tensors)",
            "prune/params": "parameters removed or zeroed",
            "prune/layers": "blocks removed",
        }
        for key, value in values.items():
            report[names[key]] = f"{100 * value:.1f}%"
        if self.target_outcome is not None:
            report["target"] = self.target_outcome.describe()
        if self.depth is not None:
            gone = [b.name for b in self.depth.removed_blocks()]
            report[names["prune/layers"]] = f"{len(gone)} of {len(self.depth.blocks)} ({', '.join(gone) or 'none'})"
        add_method_notes(model, report)

    def remove(self, model: nn.Module) -> None:
        self._clear_deferred()
        if self.data is not None:
            self.data.finished()
            self.data = None
        if self.depth is not None:
            self.depth.remove()
