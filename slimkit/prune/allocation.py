"""Global scope by measured sensitivity: how many units each layer loses.

For every group, the units are taken in score order and the loss of quality of removing the
lowest ``k`` is measured on the recorded inputs of the layers that read them: the output
energy those layers lose, relative to their output energy,

    e_g(k) = sum_c E||W_c z - W'_c z_K||^2 / sum_c E||W_c z||^2

with ``W'`` the least-squares refit when ``reconstruct`` is on (the optimal-brain-surgeon
form ``tr(W_R [G^-1]_RR^-1 W_R^T)``), else ``W`` with the removed columns cut. The target is
then spread over the groups where these curves rise least: ``k_g`` minimises ``sum_g e_g(k_g)``
for the total asked, greedily over the lower convex hull of each curve (sampled at every unit
for groups of up to 32 units, at 16 points for larger ones), never above ``max_layer_ratio`` of
a group.
"""

from __future__ import annotations

import torch

from .data_aware import Consumer
from .reconstruct import _matrix
from .selection import removable
from .units import UnitGroup

_GRID = 16  # curve samples per group (every unit when a group has up to 2 * _GRID)


def _weight_with_bias(consumer: Consumer) -> torch.Tensor:
    weight = _matrix(consumer.module, consumer.stats)
    if consumer.stats.bias:
        weight = torch.cat([weight, consumer.module.bias.detach().double()[:, None]], 1)
    return weight


class _ConsumerCurve:
    """The error of one consumer for a set of removed columns, from its Gram matrix."""

    def __init__(self, consumer: Consumer, damping: float, refit: bool) -> None:
        stats = consumer.stats
        self.consumer = consumer
        self.gram = stats.gram / max(stats.count, 1)
        self.weight = _weight_with_bias(consumer).to(self.gram.device)
        self.energy = float(torch.einsum("oi,ij,oj->", self.weight, self.gram, self.weight))
        self.inverse = None
        if refit:
            scale = float(self.gram.diagonal().mean())
            eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
            self.inverse = torch.linalg.inv(self.gram + max(damping * scale, 1e-12) * eye)

    def error(self, removed: list[int]) -> float:
        if not removed:
            return 0.0
        idx = torch.tensor(removed, dtype=torch.long, device=self.gram.device)
        w_r = self.weight[:, idx]
        if self.inverse is None:
            return float(torch.einsum("oi,ij,oj->", w_r, self.gram[idx][:, idx], w_r))
        p_rr = self.inverse[idx][:, idx]
        return float(torch.einsum("oi,oi->", w_r, torch.linalg.solve(p_rr, w_r.T).T))


def _hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of (k, error) points sorted by k."""
    hull: list[tuple[int, float]] = []
    for point in points:
        while len(hull) >= 2:
            (k1, e1), (k2, e2) = hull[-2], hull[-1]
            if (e2 - e1) * (point[0] - k1) >= (point[1] - e1) * (k2 - k1):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def group_readers(consumers: list[Consumer], damping: float, refit: bool) -> dict[int, list[_ConsumerCurve]]:
    """Group id -> the error curves of the recorded consumers that read its units."""
    readers: dict[int, list[_ConsumerCurve]] = {}
    for consumer in consumers:
        if consumer.stats.gram is None:
            continue
        curve = _ConsumerCurve(consumer, damping, refit)
        for g, _ in consumer.members:
            readers.setdefault(g, []).append(curve)
    return readers


def error_curve(
    readers: list[_ConsumerCurve], gid: int, order: torch.Tensor, mask: torch.Tensor, counts: list[int], removed_columns
) -> list[float]:
    """The relative output error of the group's readers with ``counts[j]`` units removed (the
    already pruned ``mask`` plus the next ones in ``order``), one value per count."""
    energy = sum(c.energy for c in readers) or 1.0
    done = int(mask.sum())
    out = []
    for k in counts:
        removed = mask.clone()
        removed[order[: max(k - done, 0)]] = True
        out.append(sum(curve.error(removed_columns(curve.consumer, gid, removed)) for curve in readers) / energy)
    return out


def removal_order(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The units not pruned yet, lowest score first."""
    alive = (~mask).nonzero().flatten()
    return alive[torch.argsort(score[alive], stable=True)]


def sensitivity_counts(
    groups: list[UnitGroup],
    group_ids: list[int],
    scores: list[torch.Tensor],
    pruned: list[torch.Tensor],
    target: float,
    consumers: list[Consumer],
    removed_columns,
    *,
    damping: float,
    refit: bool,
    max_layer_ratio: float,
) -> list[int] | None:
    """Units to remove per group (already pruned included), or None when a group has no
    recorded consumer (the caller falls back to normalised scores)."""
    readers = group_readers(consumers, damping, refit)
    if any(g not in readers for g in group_ids):
        return None
    total = sum(g.size for g in groups)
    extra = int(target * total + 1e-9) - sum(int(p.sum()) for p in pruned)
    counts = [int(p.sum()) for p in pruned]
    if extra <= 0:
        return counts
    segments = []  # (slope, group, units)
    for i, (group, gid, score, mask) in enumerate(zip(groups, group_ids, scores, pruned)):
        cap = max(removable(group, int(max_layer_ratio * group.size + 1e-9), None), counts[i])
        room = cap - counts[i]
        steps = room if room <= 2 * _GRID else _GRID
        samples = sorted({counts[i] + round(j * room / max(steps, 1)) for j in range(steps + 1)})
        errors = error_curve(readers[gid], gid, removal_order(score, mask), mask, samples, removed_columns)
        hull = _hull(list(zip(samples, errors)))
        for (k1, e1), (k2, e2) in zip(hull, hull[1:]):
            segments.append(((e2 - e1) / (k2 - k1), i, k2 - k1))
    for _, i, units in sorted(segments, key=lambda s: s[0]):
        if extra <= 0:
            break
        take = min(units, extra)
        counts[i] += take
        extra -= take
    return counts
