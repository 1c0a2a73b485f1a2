"""Which units go at a pruning point.

``local`` scope removes the target fraction from every group (every layer keeps the same
share). ``global`` scope ranks all units of one kind together after dividing each group's
scores by that group's mean (so wide and narrow layers compare fairly) and removes the
lowest, no group losing more than ``max_layer_ratio`` of its units. In both scopes a group
always keeps at least one unit (one per conv group), ``round_to`` rounds the kept width *up*
to a multiple (never pruning more than asked), and units pruned earlier stay pruned.
"""

from __future__ import annotations

import torch

from .units import UnitGroup


def removable(group: UnitGroup, count: int, round_to: int | None) -> int:
    """The count actually removable: keeps min_keep, rounds the kept width, evens out blocks."""
    n = group.size
    count = max(0, min(count, n - group.min_keep))
    if round_to and round_to > 1 and count:
        kept = min(n, -(-(n - count) // round_to) * round_to)
        count = n - kept
    if group.blocks:
        per_block = min(count // len(group.blocks), min(len(b) for b in group.blocks) - 1)
        count = max(per_block, 0) * len(group.blocks)
    return count


def choose(group: UnitGroup, score: torch.Tensor, pruned: torch.Tensor, count: int) -> torch.Tensor:
    """``pruned`` plus the lowest-scored other units, up to ``count`` pruned in all."""
    new = pruned.clone()
    blocks = group.blocks or [list(range(group.size))]
    per_block = count // len(blocks) if group.blocks else count
    for block in blocks:
        idx = torch.tensor(block, dtype=torch.long)
        missing = per_block - int(pruned[idx].sum())
        if missing <= 0:
            continue
        candidates = idx[~pruned[idx]]
        order = torch.argsort(score[candidates], stable=True)
        new[candidates[order[:missing]]] = True
    return new


def select(
    groups: list[UnitGroup],
    scores: list[torch.Tensor],
    pruned: list[torch.Tensor],
    target: float,
    *,
    scope: str,
    max_layer_ratio: float,
    round_to: int | None,
) -> list[torch.Tensor]:
    """New pruned masks (one bool vector per group) for a target fraction of units."""
    if scope == "local":
        counts = [
            removable(g, max(int(target * g.size + 1e-9), int(p.sum())), round_to) for g, p in zip(groups, pruned)
        ]
        return [choose(g, s, p, c) for g, s, p, c in zip(groups, scores, pruned, counts)]

    total = sum(g.size for g in groups)
    extra = int(target * total + 1e-9) - sum(int(p.sum()) for p in pruned)
    counts = [int(p.sum()) for p in pruned]
    if extra > 0:
        caps = [
            max(removable(g, int(max_layer_ratio * g.size + 1e-9), None), int(p.sum())) for g, p in zip(groups, pruned)
        ]
        normalised, owners = [], []
        for i, (s, p) in enumerate(zip(scores, pruned)):
            alive = ~p
            if not alive.any():
                continue
            mean = float(s[alive].mean())
            normalised.append(s[alive] / (mean if mean > 0 else 1.0))
            owners.append(torch.full((int(alive.sum()),), i, dtype=torch.long))
        if normalised:
            values, owner = torch.cat(normalised), torch.cat(owners)
            for j in torch.argsort(values, stable=True).tolist():
                if extra == 0:
                    break
                i = int(owner[j])
                if counts[i] < caps[i]:
                    counts[i] += 1
                    extra -= 1
    counts = [max(removable(g, c, round_to), int(p.sum())) for g, c, p in zip(groups, counts, pruned)]
    return [choose(g, s, p, c) for g, s, p, c in zip(groups, scores, pruned, counts)]
