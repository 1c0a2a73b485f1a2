"""Importance of every unit of a group: one score per unit, higher = more worth keeping.

* ``l1`` / ``l2``: the L1 norm / L2 norm of all the weights the unit owns across its coupled
  layers (a conv channel: its filter, its BatchNorm scale and the next layers' input columns;
  a head: its rows in q, k, v and its columns in the output projection).
* ``taylor``: first-order Taylor, ``sum |w * dL/dw|`` over the same weights, accumulated over
  every backward pass since the last pruning point (Molchanov et al., 2019).
* ``bn_scale``: ``|gamma|`` of the BatchNorm(s) that scale the channel (network slimming); a
  group without BatchNorm (MLP neurons, heads) falls back to ``l2``.
* ``activation`` (Wanda-style, no labels): ``sqrt(sum_j ||W[:, j]||^2 E[x_j^2])`` over the
  unit's input columns in every layer that reads it (the energy the unit adds to those
  layers' outputs), from recorded inputs (statistics.py).
* ``fisher`` (Kwon et al., 2022): ``sum_batches (dL/dm_u)^2`` with ``m_u`` a mask on the unit's
  output; ``dL/dm_u = sum_j W[:, j] . dL/dW[:, j]`` over the unit's input columns in the
  layers that read it, so it comes from the same gradient hooks as ``taylor``.

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


def activation(model: nn.Module, group: UnitGroup, transposed: dict, stats: dict) -> torch.Tensor | None:
    """The Wanda-style score from recorded consumer inputs; None when no consumer was recorded."""
    energy = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for i, member in enumerate(group.members):
        record = stats.get(member.module)
        if member.side != "in" or record is None or record.sq is None:
            continue
        module = get_module(model, member.module)
        weight = module.weight.detach().double()
        if record.layout == "transposed":
            per_position = weight.square().sum(1)
        elif record.layout == "linear":
            per_position = weight.square().sum(0)
        else:  # conv: all kernel taps of an input channel
            per_position = weight.square().sum(dim=[d for d in range(weight.dim()) if d != 1])
        _scatter(group, i, (per_position.cpu() * record.mean_sq.cpu()), energy)
        found = True
    return energy.sqrt() if found else None


def scores(model: nn.Module, group: UnitGroup, kind: str, transposed: dict, taylor: torch.Tensor | None = None):
    if kind in ("taylor", "fisher"):
        return taylor.detach().double().cpu()
    if kind == "bn_scale":
        return bn_scale(model, group, transposed)
    return magnitude(model, group, transposed, 1 if kind == "l1" else 2)


def consumer_roles(model: nn.Module, group: UnitGroup, transposed: dict) -> list[tuple[nn.Module, int, int]]:
    """The weight roles on the input side (the layers that read the units); all roles if none."""
    roles = weight_roles(model, group, transposed)
    reading = [r for r in roles if group.members[r[2]].side == "in"]
    return reading or roles


class TaylorAccumulator:
    """Adds a per-unit gradient statistic into a pending vector on every backward pass.

    * ``taylor``: ``|w * grad|`` over every weight the unit owns;
    * ``fisher``: ``(sum w * grad)^2`` over the unit's input columns in the layers that read it
      (the squared gradient of a mask on the unit), summed first over every such layer of one
      backward pass, then squared.

    One gradient hook per weight tensor (a tensor may hold units of two groups: a conv's
    rows in one and its columns in another). The pending sums are folded into the
    checkpointed statistics once per optimizer step (``flush``), all-reduced first under DDP
    so that every process ranks with the same numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[UnitGroup],
        offsets: list[int],
        total: int,
        transposed,
        kind: str = "taylor",
    ):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.kind = kind
        self.pending = torch.zeros(total, dtype=torch.float32, device=device)
        self._signed = torch.zeros(total, dtype=torch.float64, device=device)  # fisher: this backward's sums
        self._fired: set[int] = set()
        roles: dict[int, tuple[nn.Parameter, list]] = {}
        for group, offset in zip(groups, offsets):
            chosen = (
                consumer_roles(model, group, transposed) if kind == "fisher" else weight_roles(model, group, transposed)
            )
            for module, dim, i in chosen:
                weight = module.weight
                length = weight.shape[dim]
                lookup = unit_lookup(group.members[i], length, weight.device)
                valid = lookup >= 0
                entry = roles.setdefault(id(weight), (weight, []))
                entry[1].append((dim, valid, lookup[valid] + offset))
        self.weights = [weight for weight, _ in roles.values()]
        # FSDP2: the hooks follow the whole parameter each forward gathers (fully_shard replaces it)
        self._handles = [
            follow_grad_hook(model, weight, lambda tensor, uses=uses: self._hook(tensor, uses))
            for weight, uses in roles.values()
        ]

    def _hook(self, weight: nn.Parameter, uses: list):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                if self.kind == "taylor":
                    contribution = (weight.detach() * grad).abs().float()
                    for dim, valid, target in uses:
                        per_position = _per_position(contribution, dim, lambda t: t)
                        self.pending.index_add_(0, target, per_position[valid])
                    return
                if id(weight) in self._fired:  # a new backward pass began: close the last one
                    self._close()
                self._fired.add(id(weight))
                contribution = (weight.detach() * grad).double()
                for dim, valid, target in uses:
                    per_position = _per_position(contribution, dim, lambda t: t)
                    self._signed.index_add_(0, target, per_position[valid].double())
                if len(self._fired) == len(self._handles):
                    self._close()

        return hook

    def _close(self) -> None:
        self.pending.add_(self._signed.square().to(self.pending.dtype))
        self._signed.zero_()
        self._fired.clear()

    def flush(self, into: torch.Tensor) -> None:
        if self._fired:
            self._close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.pending)
        into.add_(self.pending.to(into.device))
        self.pending.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
