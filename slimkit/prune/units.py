"""What a structured pruning unit is: one channel / MLP neuron, or one attention head (with
grouped-query attention: one key/value head and its query heads).

A :class:`UnitGroup` lists every coupled layer a unit lives in. Each :class:`Member` names a
module, the side of it the unit occupies (``out``: output features / channels, ``in``: input
features) and, for every unit, the positions on that side. Channel groups come from
Torch-Pruning's dependency graph (``graph.py``), head groups from the model adapters
(``heads.py``); masking, importance and physical removal only ever see this plain data, keyed
by module *names*, so they work on the live model, on a copy, and after QAT swapped classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..adapters import HeadLayout
from ..distributed import mul_mask_

Side = Literal["out", "in"]

# Module types whose tensors slimkit knows how to mask and slice along a side.
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class Member:
    """The positions the units of a group occupy on one side of one module."""

    module: str
    side: Side
    index: list[list[int]]  # index[u]: positions of unit u along the side

    def positions(self, units: list[int] | torch.Tensor) -> list[int]:
        units = units.tolist() if isinstance(units, torch.Tensor) else units
        return sorted(p for u in units for p in self.index[u])


@dataclass
class UnitGroup:
    """Units that are kept or removed together across coupled layers."""

    kind: Literal["channels", "heads"]
    root: str  # the module whose outputs define the units (the attention module for heads)
    size: int
    members: list[Member]
    # Grouped convolutions: every block of units must lose the same number of units.
    blocks: list[list[int]] | None = None
    layout: HeadLayout | None = None  # heads only
    tied: list[HeadLayout] = field(default_factory=list)  # heads of other layers pruned with these
    ops: list[str] = field(default_factory=list)  # traced ops between the layers (for errors)

    @property
    def min_keep(self) -> int:
        """Units that always stay: one per block (so no layer is ever emptied)."""
        return len(self.blocks) if self.blocks else 1

    def describe(self) -> str:
        names = sorted({f"{m.module} ({m.side})" for m in self.members})
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        return f"{self.kind} group rooted at {self.root!r} ({self.size} units; couples {shown})"


def transposed_attrs(module: nn.Module, transposed: dict[type, tuple[str, str]]) -> tuple[str, str] | None:
    """The (out size, in size) attribute names of a transposed Linear (HF ``Conv1D``), or None.
    Subclasses count: quantization swaps a layer's class for a fake-quant subclass while pruning
    still slices it at convert."""
    for cls in type(module).__mro__:
        if cls in transposed:
            return transposed[cls]
    return None


def is_transposed_linear(module: nn.Module, transposed: dict[type, tuple[str, str]]) -> bool:
    return transposed_attrs(module, transposed) is not None


def tensor_roles(module: nn.Module, side: Side, transposed: dict[type, tuple[str, str]]) -> list[tuple[str, int]]:
    """(tensor name, dim) pairs that hold a side's features, for masking and importance.

    Grouped (non-depthwise) convolutions list no input role: their input positions do not map
    to one weight column, and zero inputs already contribute nothing.
    """
    roles: list[tuple[str, int]] = []
    if is_transposed_linear(module, transposed):
        roles = [("weight", 1), ("bias", 0)] if side == "out" else [("weight", 0)]
    elif isinstance(module, nn.Linear):
        roles = [("weight", 0), ("bias", 0)] if side == "out" else [("weight", 1)]
    elif isinstance(module, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        if side == "out":
            roles = [("weight", out_dim), ("bias", 0)]
        elif module.groups == 1:
            roles = [("weight", in_dim)]
    elif isinstance(module, _NORMS) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
        roles = [("weight", 0), ("bias", 0)]
    elif isinstance(module, nn.Embedding) and side == "out":  # per-head tables (MPNet's position bias)
        roles = [("weight", 1)]
    return [(name, dim) for name, dim in roles if getattr(module, name, None) is not None]


def supports(module: nn.Module, transposed: dict[type, tuple[str, str]]) -> bool:
    """Whether slimkit can mask and slice this module as a member of a channel group."""
    return is_transposed_linear(module, transposed) or isinstance(
        module, (nn.Linear, nn.modules.conv._ConvNd, nn.PReLU, *_NORMS)
    )


def is_depthwise(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.modules.conv._ConvNd)
        and conv.groups > 1
        and conv.groups == conv.in_channels == conv.out_channels
    )


def unit_lookup(member: Member, length: int, device: torch.device) -> torch.Tensor:
    """Position -> unit id along a member's side (-1 where no unit of the group lives)."""
    lookup = torch.full((length,), -1, dtype=torch.long)
    for unit, positions in enumerate(member.index):
        lookup[positions] = unit
    return lookup.to(device)


def zero_plan(
    model: nn.Module, groups: list[UnitGroup], pruned: list[torch.Tensor], transposed: dict
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, keep mask) pairs that make the pruned units contribute exactly nothing.

    Producers (``out`` members) are what makes a unit's output zero; consumers' input columns
    are zeroed too so that the weights that ``convert`` removes are the zero ones. Each mask is a
    product of per-dimension 0/1 vectors, shaped to broadcast ([out, in, 1, 1] for a conv), so
    re-applying it after an optimizer step is one multiply over the tensor.
    """
    cuts: dict[int, tuple[torch.Tensor, dict[int, set[int]]]] = {}
    for group, mask in zip(groups, pruned):
        units = mask.nonzero().flatten().tolist()
        if not units:
            continue
        for member in group.members:
            module = model.get_submodule(member.module) if member.module else model
            positions = member.positions(units)
            for name, dim in tensor_roles(module, member.side, transposed):
                tensor = getattr(module, name)
                entry = cuts.setdefault(id(tensor), (tensor, {}))
                entry[1].setdefault(dim, set()).update(positions)
    plan = []
    for tensor, dims in cuts.values():
        keep = torch.ones([1] * tensor.dim(), dtype=tensor.dtype, device=tensor.device)
        for dim, positions in dims.items():
            vector = torch.ones(tensor.shape[dim], dtype=tensor.dtype, device=tensor.device)
            vector[sorted(positions)] = 0
            shape = [1] * tensor.dim()
            shape[dim] = tensor.shape[dim]
            keep = keep * vector.view(shape)
        plan.append((tensor, keep))
    return plan


@torch.no_grad()
def apply_zero_plan(plan: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for tensor, keep in plan:
        mul_mask_(tensor, keep)  # an FSDP2 DTensor: each process zeroes its own shard
