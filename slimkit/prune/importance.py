"""Importance of every unit of a group: one score per unit, higher = more worth keeping.

* ``l1`` / ``l2``: the L1 norm / L2 norm of all the weights the unit owns across its coupled
  layers (a conv channel: its filter, its BatchNorm scale and the next layers' input columns;
  a head: its rows in q, k, v and its columns in the output projection).
* ``taylor``: first-order Taylor, ``sum |w * dL/dw|`` over the same weights, accumulated over
  every backward pass since the last pruning point (Molchanov et al., 2019).
* ``bn_scale``: ``|gamma|`` of the BatchNorm(s) that scale the channel (network slimming); a
  group without BatchNorm (MLP neurons, heads) falls back to ``l2``.

Biases are not scored; every weight tensor of every member is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..distributed import follow_grad_hook, full_tensor
from ..modules import get_module
from .units import UnitGroup, tensor_roles, unit_lookup


def _per_position(weight: torch.Tensor, dim: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    dims = [d for d in range(weight.dim()) if d != dim]
    values = reduce(weight.detach().float())
    return values.sum(dim=dims) if dims else values


def weight_roles(model: nn.Module, group: UnitGroup, transposed: dict) -> list[tuple[nn.Module, int, int]]:
    """(module, dim, member index) for every weight tensor a group's units live in."""
    out = []
    for i, member in enumerate(group.members):
        module = get_module(model, member.module)
        for name, dim in tensor_roles(module, member.side, transposed):
            if name == "weight":
                out.append((module, dim, i))
    return out


def _scatter(group: UnitGroup, member_index: int, values: torch.Tensor, into: torch.Tensor) -> None:
    lookup = unit_lookup(group.members[member_index], values.shape[0], values.device)
    valid = lookup >= 0
    into.index_add_(0, lookup[valid].to(into.device), values[valid].to(into.dtype))


def magnitude(model: nn.Module, group: UnitGroup, transposed: dict, p: int) -> torch.Tensor:
    scores = torch.zeros(group.size, dtype=torch.float64)
    reduce = torch.abs if p == 1 else torch.square
    for module, dim, i in weight_roles(model, group, transposed):
        _scatter(group, i, _per_position(full_tensor(module.weight), dim, reduce).cpu(), scores)
    return scores if p == 1 else scores.sqrt()


def bn_scale(model: nn.Module, group: UnitGroup, transposed: dict) -> torch.Tensor:
    scores = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for i, member in enumerate(group.members):
        module = get_module(model, member.module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            _scatter(group, i, full_tensor(module.weight.detach()).abs().cpu(), scores)
            found = True
    return scores if found else magnitude(model, group, transposed, 2)


def scores(model: nn.Module, group: UnitGroup, kind: str, transposed: dict, taylor: torch.Tensor | None = None):
    if kind == "taylor":
        return taylor.detach().double().cpu()
    if kind == "bn_scale":
        return bn_scale(model, group, transposed)
    return magnitude(model, group, transposed, 1 if kind == "l1" else 2)


class TaylorAccumulator:
    """Adds ``|w * grad|`` per unit into a pending vector on every backward pass.

    One gradient hook per weight tensor (a tensor may hold units of two groups: a conv's
    rows in one and its columns in another). The pending sums are folded into the
    checkpointed statistics once per optimizer step (``flush``), all-reduced first under DDP
    so that every process ranks with the same numbers.
    """

    def __init__(self, model: nn.Module, groups: list[UnitGroup], offsets: list[int], total: int, transposed):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.pending = torch.zeros(total, dtype=torch.float32, device=device)
        roles: dict[int, tuple[nn.Parameter, list]] = {}
        for group, offset in zip(groups, offsets):
            for module, dim, i in weight_roles(model, group, transposed):
                weight = module.weight
                length = weight.shape[dim]
                lookup = unit_lookup(group.members[i], length, weight.device)
                valid = lookup >= 0
                entry = roles.setdefault(id(weight), (weight, []))
                entry[1].append((dim, valid, lookup[valid] + offset))
        # FSDP2: the hooks follow the whole parameter each forward gathers (fully_shard replaces it)
        self._handles = [
            follow_grad_hook(model, weight, lambda tensor, uses=uses: self._hook(tensor, uses))
            for weight, uses in roles.values()
        ]

    def _hook(self, weight: nn.Parameter, uses: list):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                contribution = (weight.detach() * grad).abs().float()
                for dim, valid, target in uses:
                    per_position = _per_position(contribution, dim, lambda t: t)
                    self.pending.index_add_(0, target, per_position[valid])

        return hook

    def flush(self, into: torch.Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.pending)
        into.add_(self.pending.to(into.device))
        self.pending.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
