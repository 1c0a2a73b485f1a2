"""``importance: obs``: the units whose removal the least-squares refit compensates best.

Optimal Brain Surgeon on the input Gram matrix ``G`` of every layer that reads a group (as in
OBC / ZipLM for structured units): removing the columns ``B`` of one unit and refitting the
others costs ``tr(W_B [P_BB]^-1 W_B^T)`` with ``P = (G + lambda I)^-1``. Units are removed
greedily, cheapest first, each removal updating ``W`` and ``P`` of every reader,

    W <- W - W_B P_BB^-1 P_B:        P <- P - P_:B P_BB^-1 P_B:

so that later choices see what the refit of earlier ones already absorbed (two copies of a
feature: the second becomes expensive once the first is gone). Large groups (MLP neurons) are
removed a 64th of their units at a time, each chunk with one exact block update. The greedy
order is the score:
units removed earlier score lower. It needs recorded inputs with Gram matrices and is meant for
``reconstruct: true`` (which then does the refit for real).
"""

from __future__ import annotations

import torch

from .data_aware import Consumer, PointData
from .reconstruct import _matrix
from .statistics import columns_of

_CHUNKS = 64  # a group of n units is removed n / 64 at a time (one at a time for up to 127 units)


class _Reader:
    """One reader's weight and inverse Gram matrix, and the columns of each unit of the group."""

    def __init__(self, consumer: Consumer, columns: list[list[int]], damping: float) -> None:
        stats = consumer.stats
        gram = stats.gram / max(stats.count, 1)
        weight = _matrix(consumer.module, stats).to(gram.device)
        if stats.bias:
            weight = torch.cat([weight, consumer.module.bias.detach().double().to(gram.device)[:, None]], 1)
        scale = float(gram.diagonal().mean())
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        self.inverse = torch.linalg.inv(gram + max(damping * scale, 1e-12) * eye)
        self.weight = weight
        self.columns = columns
        width = {len(c) for c in columns}
        self.index = torch.tensor(columns, dtype=torch.long, device=gram.device) if len(width) == 1 else None

    def costs(self, alive: torch.Tensor) -> torch.Tensor:
        """The cost of removing each unit now (inf for units already gone)."""
        out = torch.full((len(self.columns),), float("inf"), dtype=torch.float64)
        units = alive.nonzero().flatten()
        if self.index is not None:
            idx = self.index[units.to(self.index.device)]  # [U, b]
            if idx.shape[1] == 1:  # one column per unit (MLP neurons): ||W_j||^2 / P_jj
                j = idx[:, 0]
                out[units] = (self.weight[:, j].square().sum(0) / self.inverse[j, j]).cpu()
                return out
            blocks = torch.linalg.inv(self.inverse[idx[:, :, None], idx[:, None, :]])  # [U, b, b]
            w = self.weight[:, idx]  # [out, U, b]
            out[units] = torch.einsum("oub,ubc,ouc->u", w, blocks, w).cpu()
            return out
        for u in units.tolist():
            cols = self.columns[u]
            w = self.weight[:, cols]
            out[u] = float((w.T * torch.linalg.solve(self.inverse[cols][:, cols], w.T)).sum())
        return out

    def remove(self, units: list[int]) -> None:
        cols = [c for u in units for c in self.columns[u]]
        if not cols:
            return
        p_b = self.inverse[cols]  # [b, c]
        p_bb = p_b[:, cols]
        correction = p_b / p_bb if len(cols) == 1 else torch.linalg.solve(p_bb, p_b)  # P_BB^-1 P_B:
        self.weight -= self.weight[:, cols] @ correction
        self.inverse -= p_b.T @ correction


def obs_scores(data: PointData, group_id: int, pruned: torch.Tensor, damping: float, limit: int) -> torch.Tensor | None:
    """Greedy OBS removal order of one group's units as scores, for the first ``limit`` units
    removed (None: no reader was recorded); the rest follow by their cost at that point."""
    group = data.groups[group_id]
    readers = []
    for consumer in data.consumers.values():
        members = [m for g, m in consumer.members if g == group_id]
        if not members or consumer.stats.gram is None or consumer.stats.count == 0:
            continue
        columns = []
        for unit in range(group.size):
            positions = sorted({p for m in members for p in group.members[m].index[unit]})
            columns.append(columns_of(consumer.stats, consumer.module, positions))
        readers.append(_Reader(consumer, columns, damping))
    if not readers:
        return None
    alive = ~pruned.clone()
    gone = pruned.nonzero().flatten().tolist()
    for reader in readers:  # earlier points' units are gone already
        reader.remove(gone)
    scores = torch.full((group.size,), float(group.size), dtype=torch.float64)
    removable = max(min(int(alive.sum()) - group.min_keep, limit - int(pruned.sum())), 0)
    chunk = max(1, int(alive.sum()) // _CHUNKS)
    rank = 0
    while rank < removable:
        costs = sum(reader.costs(alive) for reader in readers)
        take = torch.argsort(costs, stable=True)[: min(chunk, removable - rank)].tolist()
        for unit in take:
            scores[unit] = float(rank)
            rank += 1
        alive[take] = False
        for reader in readers:
            reader.remove(take)
    if bool(alive.any()):
        costs = sum(reader.costs(alive) for reader in readers)[alive]
        scores[alive] = float(group.size) + torch.argsort(torch.argsort(costs)).double()
    return scores
