"""The checkpointed pruning state and the bookkeeping of unit kinds (channels, heads).

Under DDP every process must remove the very same units: masks computed on rank 0 are
broadcast (:func:`broadcast`), and statistics are all-reduced before ranking.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .units import UnitGroup


def distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's masks everywhere: every process must remove the very same units."""
    if not distributed():
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

    def __init__(
        self,
        channels: int,
        heads: int,
        gradient: str | None,
        sparse: list[torch.Size],
        target_groups: int | None = None,
    ) -> None:
        super().__init__()
        if target_groups is not None:  # prune.target: the removal count chosen per group (channels, heads)
            self.register_buffer("target_solved", torch.tensor(False))
            self.register_buffer("target_counts", torch.zeros(target_groups, dtype=torch.long))
        self.register_buffer("last_point", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("channels_pruned", torch.zeros(channels, dtype=torch.bool))
        self.register_buffer("heads_pruned", torch.zeros(heads, dtype=torch.bool))
        if gradient:  # taylor / fisher sums since the last point (named by the statistic)
            self.register_buffer(f"channels_{gradient}", torch.zeros(channels))
            self.register_buffer(f"heads_{gradient}", torch.zeros(heads))
        for i, shape in enumerate(sparse):
            self.register_buffer(f"keep_{i}", torch.ones(shape, dtype=torch.bool))

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the pruning state is not callable")


class UnitKind:
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
