"""Attention heads as pruning units, from the adapters' :class:`~slimkit.adapters.HeadLayout`.

One unit is one key/value head together with the query heads that read it (without
grouped-query attention: one head). Its members are the head's rows in every query, key,
value (and per-head gate) projection and its columns in the output projection. Zeroing the
value rows alone already makes the head's output exactly zero (softmax(...) @ 0 = 0), so
masked and physically pruned attention agree whatever the attention kernel does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import HeadLayout, ModelAdapter
from .units import Member, UnitGroup


def _positions(offset: int, heads: list[int], head_dim: int) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


def head_group(layout: HeadLayout) -> UnitGroup:
    rep = layout.num_heads // layout.num_kv_heads
    units = range(layout.num_kv_heads)
    query_heads = [list(range(u * rep, (u + 1) * rep)) for u in units]
    members: dict[tuple[str, str], Member] = {}

    def add(module: str, side: str, index: list[list[int]]) -> None:
        key = (module, side)
        if key in members:  # a fused projection (qkv): one member, positions of all its blocks
            for unit, positions in enumerate(index):
                members[key].index[unit] = sorted(members[key].index[unit] + positions)
        else:
            members[key] = Member(module, side, index)

    for module, offset in layout.query:
        add(module, "out", [_positions(offset, q, layout.head_dim) for q in query_heads])
    for module, offset in layout.key_value:
        add(module, "out", [_positions(offset, [u], layout.head_dim) for u in units])
    for module, offset in layout.output:
        add(module, "in", [_positions(offset, q, layout.head_dim) for q in query_heads])
    for module, offset in layout.shared:  # one value per query head
        add(module, "out", [_positions(offset, q, 1) for q in query_heads])
    return UnitGroup("heads", layout.name, layout.num_kv_heads, list(members.values()), layout=layout)


def tie_groups(groups: list[UnitGroup]) -> list[UnitGroup]:
    """Head groups whose layouts share per-head modules (``HeadLayout.shared``) become one group:
    the same heads leave every layer, and the shared module's columns with them."""
    out: list[UnitGroup] = []
    by_shared: dict[tuple, UnitGroup] = {}
    for group in groups:
        key = tuple(sorted(group.layout.shared))
        first = by_shared.get(key) if key else None
        if first is None or first.size != group.size:
            out.append(group)
            if key:
                by_shared.setdefault(key, group)
            continue
        members = {(m.module, m.side): m for m in first.members}
        for member in group.members:
            if (member.module, member.side) not in members:  # a shared module is listed once
                first.members.append(member)
        first.tied.append(group.layout)
    return out


def set_head_counts(
    model: nn.Module, adapter: ModelAdapter, groups: list[UnitGroup], pruned: list[torch.Tensor]
) -> dict[str, list[int]]:
    """After slicing: tell each attention module how many heads it has left.

    Returns {attention module: [query heads, key/value heads]}.
    """
    heads = {}
    for group, mask in zip(groups, pruned):
        if group.kind != "heads":
            continue
        for layout in (group.layout, *group.tied):
            kv = layout.num_kv_heads - int(mask.sum())
            query = kv * (layout.num_heads // layout.num_kv_heads)
            adapter.set_attention_heads(model, layout, query, kv)
            heads[layout.name] = [query, kv]
    return heads
