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
from ..distributed import full_tensor, mul_mask_
from ..errors import ConfigError, UnsupportedModelError
from ..modules import get_module, match_modules, matches_any, user_named_modules
from ..recipe import PruneConfig
from . import importance, manifest
from .checks import check_round_to, nm_message
from .graph import channel_groups
from .heads import head_group, set_head_counts
from .schedule import due_point, pruning_points, target_at_point
from .selection import select
from .slicing import remove_units
from .sparse import input_dim, magnitude_masks, nm_mask
from .units import UnitGroup, apply_zero_plan, zero_plan
from .verify import find_inexact

logger = logging.getLogger("slimkit")


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's masks everywhere: every process must remove the very same units."""
    if not _distributed():
        return
    for tensor in tensors:
        view = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        if torch.distributed.get_backend() == "nccl" and not view.is_cuda:
            moved = view.cuda()
            torch.distributed.broadcast(moved, src=0)
            view.copy_(moved.cpu())
        else:
            torch.distributed.broadcast(view, src=0)


class PruneState(nn.Module):
    """The checkpointed pruning state (a child of ``controller.state``)."""

    def __init__(self, channels: int, heads: int, taylor: bool, sparse: list[torch.Size]) -> None:
        super().__init__()
        self.register_buffer("last_point", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("channels_pruned", torch.zeros(channels, dtype=torch.bool))
        self.register_buffer("heads_pruned", torch.zeros(heads, dtype=torch.bool))
        if taylor:
            self.register_buffer("channels_taylor", torch.zeros(channels))
            self.register_buffer("heads_taylor", torch.zeros(heads))
        for i, shape in enumerate(sparse):
            self.register_buffer(f"keep_{i}", torch.ones(shape, dtype=torch.bool))

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the pruning state is not callable")


class _Kind:
    """The groups of one kind (channels or heads) and their slice of the state."""

    def __init__(self, name: str, groups: list[UnitGroup], final: float, round_to: int | None) -> None:
        self.name, self.groups, self.final, self.round_to = name, groups, final, round_to
        self.offsets = []
        total = 0
        for group in groups:
            self.offsets.append(total)
            total += group.size
        self.total = total

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + g.size] for o, g in zip(self.offsets, self.groups)]


class Pruner(Method):
    """Structured pruning (channels, MLP neurons, heads) and unstructured / N:M masks."""

    name = "prune"
    config: PruneConfig

    def __init__(self, controller: Controller, config: PruneConfig, example_inputs: Any = None) -> None:
        super().__init__(controller, config)
        self.example_inputs = example_inputs
        self.transposed: dict[type, tuple[str, str]] = {}
        self.channels = _Kind("channels", [], config.channels, config.round_to)
        self.heads = _Kind("heads", [], config.heads, None)
        self.skipped: dict[str, str] = {}  # channel group root -> why it is left whole
        self.sparse_weights: list[str] = []  # modules whose weights carry keep masks
        self.excluded: set[str] = set()
        self.state: PruneState | None = None
        self._taylor: importance.TaylorAccumulator | None = None
        self._plan: list | None = None
        self._sparse_tensors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._removed: float | None = None
        self._model_ref: nn.Module | None = None
        self._converted = False
        self._synced = False

    # ------------------------------------------------------------------------------------
    # prepare
    # ------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        cfg = self.config
        adapter = self.controller.adapter
        self.transposed = dict(adapter.transposed_linear_types())
        self.excluded = self._excluded(model)
        layouts = adapter.attention_heads(model) if cfg.structured else []
        if cfg.heads > 0:
            self.heads = _Kind("heads", self._head_groups(model, layouts), cfg.heads, None)
        if cfg.channels > 0:
            self.channels = _Kind("channels", self._channel_groups(model, layouts), cfg.channels, cfg.round_to)
        if cfg.structured and cfg.verify:
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
        sparse_shapes = self._sparse_setup(model)
        taylor = cfg.importance == "taylor" and cfg.structured
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.state = PruneState(self.channels.total, self.heads.total, taylor, sparse_shapes).to(device)
        self.state.register_load_state_dict_post_hook(lambda module, keys: self._invalidate())
        self.controller.state.add_module("prune", self.state)
        self._model_ref = model
        if taylor:
            self._taylor = _TaylorPair(model, self.channels, self.heads, self.transposed)
        self._advance(model, self.controller.step)

    def _inputs(self, model: nn.Module) -> Any:
        """Example inputs for tracing (dict inputs get the adapter's trace kwargs)."""
        adapter = self.controller.adapter
        inputs = self.example_inputs if self.example_inputs is not None else adapter.example_inputs(model)
        if isinstance(inputs, dict):
            inputs = {**inputs, **adapter.trace_kwargs(model)}
        return inputs

    def _excluded(self, model: nn.Module) -> set[str]:
        adapter = self.controller.adapter
        patterns = adapter.prune_exclusions(model)
        if type(adapter).__name__ == "TorchAdapter" and patterns:
            logger.info(
                "prune: no adapter knows %s; excluding %s by default (classifier and stem guesses). "
                "Name other modules to keep in prune.exclude.",
                type(model).__name__,
                patterns,
            )
        for pattern in self.config.exclude:
            match_modules(model, pattern, role="prune.exclude: ")
            patterns.append(pattern)
        return {name for name, _ in user_named_modules(model) if name and matches_any(name, patterns)}

    def _head_groups(self, model: nn.Module, layouts: list) -> list[UnitGroup]:
        if not layouts:
            candidates = [
                n
                for n, m in user_named_modules(model)
                if n and ("attn" in n.rsplit(".", 1)[-1].lower() or "attention" in type(m).__name__.lower())
            ]
            raise UnsupportedModelError(
                f"prune.heads: slimkit knows no attention heads in {type(model).__name__}. It prunes the "
                "heads of timm ViT-style Attention (fused qkv) and of Hugging Face BERT / ViT / GPT-2 / "
                "Llama-style attention. "
                + (
                    f"Modules that look like attention here: {candidates[:6]}; "
                    if candidates
                    else "No module here looks like attention; "
                )
                + "set prune.heads: 0 (MLP neurons and channels are still pruned with prune.channels)."
            )
        groups = []
        for layout in layouts:
            projections = [m for m, _ in (*layout.query, *layout.key_value, *layout.output)]
            if any(n in self.excluded for n in (layout.name, *projections)):
                continue
            if layout.unsupported:
                raise UnsupportedModelError(
                    f"prune.heads: cannot remove heads of {layout.name!r} exactly: {layout.unsupported}. "
                    f"Add it to prune.exclude (exclude: [{layout.name!r}]) or set prune.heads: 0."
                )
            if layout.num_kv_heads > 1:
                groups.append(head_group(layout))
        return groups

    def _channel_groups(self, model: nn.Module, layouts: list) -> list[UnitGroup]:
        attention = {m for layout in layouts for m, _ in (*layout.query, *layout.key_value, *layout.output)}
        names = {}
        for name, module in user_named_modules(model):
            names.setdefault(module, name)
        with self.controller.suspended():
            groups, self.skipped = channel_groups(
                model,
                self._inputs(model),
                names=names,
                transposed=self.transposed,
                attention=attention,
                attention_outputs={m for layout in layouts for m, _ in layout.output},
                excluded=self.excluded,
            )
        groups = [g for g in groups if g.size > g.min_keep]
        if not groups:
            reasons = "; ".join(f"{root}: {why}" for root, why in list(self.skipped.items())[:6])
            raise UnsupportedModelError(
                f"prune.channels: {type(model).__name__} has no channel group slimkit can prune "
                f"exactly ({reasons or 'no conv / linear layer was traced'}). Set prune.channels: 0, "
                "or remove modules from prune.exclude."
            )
        check_round_to(groups, self.config.round_to)
        return groups

    def _sparse_setup(self, model: nn.Module) -> list[torch.Size]:
        cfg = self.config
        if not cfg.sparsity and not cfg.nm:
            return []
        shapes, widths = [], set()
        for name, module in user_named_modules(model):
            if name in self.excluded or isinstance(module, nn.Embedding):
                continue
            is_layer = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module) in self.transposed
            weight = getattr(module, "weight", None)
            if not is_layer or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            widths.add(int(weight.shape[input_dim(module, self.transposed)]))
            if cfg.nm and weight.shape[input_dim(module, self.transposed)] % int(cfg.nm.split(":")[1]):
                logger.info("prune.nm: %s stays dense (its input size is not a multiple of M)", name)
                continue
            self.sparse_weights.append(name)
            shapes.append(weight.shape)
        if not shapes and cfg.nm and widths:
            raise ConfigError(nm_message(cfg.nm, widths))
        if not shapes:
            raise UnsupportedModelError(
                f"prune: {type(model).__name__} has no linear / conv weight left for "
                f"{'prune.nm' if cfg.nm else 'prune.sparsity'} after prune.exclude"
            )
        return shapes

    # ------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------
    def on_step(self, model: nn.Module, step: int) -> None:
        if not self._synced:
            # prepare may have run before the process group existed (masks of step 0 computed
            # per process): from the first step on, every process holds rank 0's state.
            _broadcast(list(self.state.buffers()))
            self._invalidate()  # and a plan made before fully_shard names the replaced parameters
            self._synced = True
        if self._taylor is not None:
            self._taylor.flush(self.state)
        self._advance(model, step)

    def _advance(self, model: nn.Module, step: int) -> None:
        point = due_point(self.config.schedule, step, int(self.state.last_point))
        if point is not None:
            self._prune_to(model, point)
            self.state.last_point.fill_(point)
            self._invalidate()
        if self._taylor is not None and int(self.state.last_point) >= pruning_points(self.config.schedule)[-1]:
            self._taylor.remove()  # nothing left to rank
            self._taylor = None
        self.apply_masks(model)

    def _prune_to(self, model: nn.Module, point: int) -> None:
        cfg = self.config
        changed = []
        for kind in (self.channels, self.heads):
            target = target_at_point(cfg.schedule, kind.final, point)
            if not kind.groups:
                continue
            flat = getattr(self.state, f"{kind.name}_pruned")
            stats = getattr(self.state, f"{kind.name}_taylor", None)
            if target > 0:
                method = cfg.importance
                if method == "taylor" and not bool((stats > 0).any()):
                    logger.warning(
                        "prune: no gradients were seen since the last pruning point; ranking %s by l2 "
                        "magnitude at step %d",
                        kind.name,
                        point,
                    )
                    method = "l2"
                stat_parts = kind.split(stats) if stats is not None else [None] * len(kind.groups)
                scores = [
                    importance.scores(model, g, method, self.transposed, s) for g, s in zip(kind.groups, stat_parts)
                ]
                new = select(
                    kind.groups,
                    scores,
                    [p.cpu() for p in kind.split(flat)],
                    target,
                    scope=cfg.scope,
                    max_layer_ratio=cfg.max_layer_ratio,
                    round_to=kind.round_to,
                )
                flat.copy_(torch.cat(new).to(flat.device))
                changed.append(flat)
            if stats is not None:
                stats.zero_()  # Taylor sums restart at every pruning point
        changed += self._update_sparse(model, point)
        _broadcast(changed)

    def _update_sparse(self, model: nn.Module, point: int) -> list[torch.Tensor]:
        cfg = self.config
        if not self.sparse_weights:
            return []
        keeps = [getattr(self.state, f"keep_{i}") for i in range(len(self.sparse_weights))]
        modules = [get_module(model, n) for n in self.sparse_weights]
        weights = [full_tensor(m.weight) for m in modules]  # FSDP2: whole weights (a collective)
        if cfg.nm:
            if int(self.state.last_point) >= 0:
                return []  # N:M is a pattern, not a ratio: set once, at the first pruning point
            n, m = (int(v) for v in cfg.nm.split(":"))
            for module, weight, keep in zip(modules, weights, keeps):
                keep.copy_(nm_mask(weight, n, m, input_dim(module, self.transposed)))
            return keeps
        target = target_at_point(cfg.schedule, cfg.sparsity, point)
        if target <= 0:
            return []
        for keep, new in zip(keeps, magnitude_masks(weights, keeps, target, cfg.scope)):
            keep.copy_(new)
        return keeps

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
            self._removed = sum(int(m.sum()) for m in removed.values()) / max(total, 1)
        return self._removed

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
        out["prune/params"] = self._removed_fraction()
        return out

    def summary(self) -> dict[str, Any]:
        """What is pruned now, per kind: units pruned / prunable, and the groups left whole."""
        out: dict[str, Any] = {}
        for kind in (self.channels, self.heads):
            if kind.groups:
                flat = getattr(self.state, f"{kind.name}_pruned")
                out[kind.name] = {"pruned": int(flat.sum()), "prunable": kind.total}
        out["skipped"] = dict(self.skipped)
        return out

    # ------------------------------------------------------------------------------------
    # convert
    # ------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
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
        config = adapter.after_pruning(model)
        block = manifest.changes(before, manifest.snapshot(model))
        block.update({"format": manifest.MANIFEST_FORMAT, "heads": heads, "config": config})
        previous = model.__dict__.get(manifest.MANIFEST_ATTR)
        model.__dict__[manifest.MANIFEST_ATTR] = manifest.merge(previous, block)
        self._report(model, values)
        self._converted = True
        return model

    def _report(self, model: nn.Module, values: dict[str, float]) -> None:
        report = dict(model.__dict__.get("_slimkit_report") or {})
        names = {
            "prune/channels": "channels / MLP neurons removed",
            "prune/heads": "attention heads removed",
            "prune/sparsity": f"weight sparsity ({self.config.nm or 'unstructured'}, dense tensors)",
            "prune/params": "parameters removed or zeroed",
        }
        for key, value in values.items():
            report[names[key]] = f"{100 * value:.1f}%"
        model.__dict__["_slimkit_report"] = report

    def remove(self, model: nn.Module) -> None:
        if self._taylor is not None:
            self._taylor.remove()
            self._taylor = None


class _TaylorPair:
    """Taylor accumulators for channel and head units, folded into the state each step."""

    def __init__(self, model: nn.Module, channels: _Kind, heads: _Kind, transposed: dict) -> None:
        self.parts = [
            (
                kind.name,
                importance.TaylorAccumulator(model, kind.groups, kind.offsets, kind.total, transposed),
            )
            for kind in (channels, heads)
            if kind.groups
        ]

    def flush(self, state: PruneState) -> None:
        for name, acc in self.parts:
            acc.flush(getattr(state, f"{name}_taylor"))

    def remove(self) -> None:
        for _, acc in self.parts:
            acc.remove()
