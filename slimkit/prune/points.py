"""One pruning point: rank the units, choose which go, update the sparse masks.

``Pruner`` calls :func:`prune_to_point` at every point of its schedule (and ``slimkit.calibrate``
at a point that waited for data); the scores come from ``importance`` (magnitude, Taylor /
Fisher sums, recorded activations) or ``obs`` (Optimal Brain Surgeon), the choice from
``selection`` (local or global scope) or ``oneshot.sensitivity_allocation``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..distributed import full_tensor
from ..modules import get_module
from . import importance
from .obs import obs_scores
from .oneshot import sensitivity_allocation
from .schedule import target_at_point
from .selection import choose, removable, select
from .sparse import input_dim, magnitude_masks, nm_mask
from .state import UnitKind, broadcast

if TYPE_CHECKING:
    from .pruner import Pruner

logger = logging.getLogger("slimkit")


def unit_scores(
    pruner: Pruner, model: nn.Module, kind: UnitKind, i: int, method: str, stat, pruned, target
) -> torch.Tensor:
    """The importance of each unit of group ``i`` of ``kind`` (higher: kept longer)."""
    group = kind.groups[i]
    if method in ("activation", "obs") and pruner.data is not None:
        if method == "obs":
            flat_id = i + (len(pruner.channels.groups) if kind is pruner.heads else 0)
            cfg = pruner.config
            share = cfg.max_layer_ratio if cfg.scope == "global" else target
            score = obs_scores(pruner.data, flat_id, pruned, cfg.damping, int(share * group.size + 1e-9) + 1)
        else:
            score = importance.activation(model, group, pruner.transposed, pruner.data.stats())
        if score is not None:
            return score
        logger.info("prune: no recorded input reads %s; ranking it by l2", group.describe())
    return importance.scores(model, group, "l2" if method in ("activation", "obs") else method, pruner.transposed, stat)


def prune_to_point(pruner: Pruner, model: nn.Module, point: int) -> None:
    """Rank every unit with the statistics gathered for ``point``, mark the schedule's share of
    each kind pruned (and update unstructured / N:M keep masks), and broadcast the result."""
    cfg = pruner.config
    if cfg.target is not None:
        changed = prune_to_target(pruner, model, point)
        broadcast(changed + update_sparse_masks(pruner, model, point))
        return
    changed = []
    for kind in (pruner.channels, pruner.heads):
        target = target_at_point(cfg.schedule, kind.final, point)
        if not kind.groups:
            continue
        flat = getattr(pruner.state, f"{kind.name}_pruned")
        stats = getattr(pruner.state, f"{kind.name}_{cfg.importance}", None) if cfg.gradient_based else None
        if target > 0:
            method = cfg.importance
            if method in ("taylor", "fisher") and not bool((stats > 0).any()):
                logger.warning(
                    "prune: no gradients were seen since the last pruning point; ranking %s by l2 magnitude at step %d",
                    kind.name,
                    point,
                )
                method = "l2"
            stat_parts = kind.split(stats) if stats is not None else [None] * len(kind.groups)
            pruned = [p.cpu() for p in kind.split(flat)]
            scores = [
                unit_scores(pruner, model, kind, i, method, s, p, target)
                for i, (s, p) in enumerate(zip(stat_parts, pruned))
            ]
            new = select_units(pruner, kind, scores, pruned, target)
            flat.copy_(torch.cat(new).to(flat.device))
            changed.append(flat)
        if stats is not None:
            stats.zero_()  # gradient sums restart at every pruning point
    changed += update_sparse_masks(pruner, model, point)
    broadcast(changed)


def prune_to_target(pruner: Pruner, model: nn.Module, point: int) -> list[torch.Tensor]:
    """``prune.target``: at the first point the solver chooses every group's final removal count
    (target.py, kept in the checkpointed state); each point removes the schedule's share of it,
    ``target_at_point(schedule, count / size, point)`` of each group."""
    cfg, state = pruner.config, pruner.state
    kinds = [pruner.channels, pruner.heads]
    if target_at_point(cfg.schedule, 0.5, point) <= 0:
        return []
    parts = []  # (kind, flat, stats, pruned, scores) per kind
    for kind in kinds:
        if not kind.groups:
            continue
        flat = getattr(state, f"{kind.name}_pruned")
        stats = getattr(state, f"{kind.name}_{cfg.importance}", None) if cfg.gradient_based else None
        method = cfg.importance
        if method in ("taylor", "fisher") and not bool((stats > 0).any()):
            logger.warning("prune: no gradients were seen since the last pruning point; ranking %s by l2", kind.name)
            method = "l2"
        stat_parts = kind.split(stats) if stats is not None else [None] * len(kind.groups)
        pruned = [p.cpu() for p in kind.split(flat)]
        scores = [
            unit_scores(pruner, model, kind, i, method, s, p, cfg.max_layer_ratio)
            for i, (s, p) in enumerate(zip(stat_parts, pruned))
        ]
        parts.append((kind, flat, stats, pruned, scores))
    if not bool(state.target_solved):
        from .target import solve_target

        all_scores = [s for part in parts for s in part[4]]
        all_pruned = [p for part in parts for p in part[3]]
        chosen, blocks, pruner.target_outcome = solve_target(pruner, model, all_scores, all_pruned)
        state.target_counts.copy_(torch.tensor(chosen, dtype=torch.long))
        if pruner.depth is not None:  # the blocks go with the depth schedule (Pruner._advance_depth)
            pruner.depth.plan(blocks)
        state.target_solved.fill_(True)
        logger.info("prune: %s", pruner.target_outcome.describe())
    changed, offset = [], 0
    for kind, flat, stats, pruned, scores in parts:
        new = []
        for i, (group, score, mask) in enumerate(zip(kind.groups, scores, pruned)):
            final = int(state.target_counts[offset + i])
            share = target_at_point(cfg.schedule, final / group.size, point)
            count = min(removable(group, int(share * group.size + 1e-9), kind.round_to), final)
            new.append(choose(group, score, mask, max(count, int(mask.sum()))))
        offset += len(kind.groups)
        flat.copy_(torch.cat(new).to(flat.device))
        changed.append(flat)
        if stats is not None:
            stats.zero_()
    return changed


def select_units(
    pruner: Pruner, kind: UnitKind, scores: list, pruned: list[torch.Tensor], target: float
) -> list[torch.Tensor]:
    """The new pruned masks of ``kind``'s groups: by sensitivity, or by score (local / global)."""
    cfg = pruner.config
    if cfg.scope == "global" and cfg.allocation == "sensitivity":
        counts = sensitivity_allocation(pruner, kind, scores, pruned, target)
        if counts is not None:
            return [choose(g, s, p, c) for g, s, p, c in zip(kind.groups, scores, pruned, counts)]
        logger.warning(
            "prune: %s: no recorded inputs for allocation by sensitivity (call slimkit.calibrate, or set "
            "prune.allocation: score); spreading the ratio by normalised scores",
            kind.name,
        )
    return select(
        kind.groups,
        scores,
        pruned,
        target,
        scope=cfg.scope,
        max_layer_ratio=cfg.max_layer_ratio,
        round_to=kind.round_to,
    )


def update_sparse_masks(pruner: Pruner, model: nn.Module, point: int) -> list[torch.Tensor]:
    """Unstructured / N:M keep masks at ``point``; returns the masks that changed."""
    cfg = pruner.config
    if not pruner.sparse_weights:
        return []
    keeps = [getattr(pruner.state, f"keep_{i}") for i in range(len(pruner.sparse_weights))]
    modules = [get_module(model, n) for n in pruner.sparse_weights]
    weights = [full_tensor(m.weight) for m in modules]  # FSDP2: whole weights (a collective)
    if cfg.nm:
        if int(pruner.state.last_point) >= 0:
            return []  # N:M is a pattern, not a ratio: set once, at the first pruning point
        n, m = (int(v) for v in cfg.nm.split(":"))
        for module, weight, keep in zip(modules, weights, keeps):
            keep.copy_(nm_mask(weight, n, m, input_dim(module, pruner.transposed)))
        return keeps
    target = target_at_point(cfg.schedule, cfg.sparsity, point)
    if target <= 0:
        return []
    for keep, new in zip(keeps, magnitude_masks(weights, keeps, target, cfg.scope)):
        keep.copy_(new)
    return keeps
