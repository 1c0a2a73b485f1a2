"""Checks of a folder's ``pruning`` block before it changes a freshly built model.

The manifest may come from anyone, so it may only do what slimkit's pruning does: give listed
tensors smaller shapes of the same rank, and set the *size attributes* pruning changes
(widths, channel and head counts) to whole numbers of the type they already have. Any other
attribute (``forward``, ``training``, ``stride``, a config object, ...) is refused, as is a
shape that is negative, a string, of another rank or larger than the architecture's own.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..folder_checks import MAX_DIM, expect_format, expect_mapping, expect_shape, fail, is_count
from ..recipe_io import short_repr

WHERE = "config.json"
# What pruning writes (see manifest.changes): layer widths, channel / feature / head counts,
# per-head sizes; any name of this form that a module already holds as a whole number.
SIZE_ATTRIBUTE = re.compile(
    r"(?:num_\w+|\w+_(?:features|channels|size|heads|dim|groups)|groups|nf|nx|normalized_shape|split_size)\Z"
)


def check_block(block: Any, newest: int) -> dict:
    """The structure of the block (types of every field); module names are checked on use."""
    block = expect_mapping(block, WHERE, "slimkit.pruning")
    expect_format(block, WHERE, "pruning", newest)
    for name, shape in expect_mapping(block.get("tensors", {}), WHERE, "slimkit.pruning.tensors").items():
        expect_shape(shape, WHERE, f"slimkit.pruning.tensors[{short_repr(name)}]")
    attributes = expect_mapping(block.get("attributes", {}), WHERE, "slimkit.pruning.attributes")
    for module, attrs in attributes.items():
        for attr, value in expect_mapping(attrs, WHERE, f"slimkit.pruning.attributes[{short_repr(module)}]").items():
            field = f"slimkit.pruning.attributes[{short_repr(module)}].{short_repr(attr)}"
            if not isinstance(attr, str) or not SIZE_ATTRIBUTE.match(attr):
                raise fail(WHERE, field, "is not a size attribute pruning writes (widths and head counts only)")
            if not (is_count(value) or (isinstance(value, list) and all(is_count(v) for v in value))):
                raise fail(WHERE, field, f"must be a whole number >= 0 or a list of them, got {short_repr(value)}")
    for module, counts in expect_mapping(block.get("heads", {}), WHERE, "slimkit.pruning.heads").items():
        if not (isinstance(counts, list) and len(counts) == 2 and all(is_count(c, 1) for c in counts)):
            raise fail(
                WHERE,
                f"slimkit.pruning.heads[{short_repr(module)}]",
                f"must be [query heads, key/value heads] >= 1, got {short_repr(counts)}",
            )
    for stack, entry in expect_mapping(block.get("layers", {}), WHERE, "slimkit.pruning.layers").items():
        _check_layers(stack, entry)
    expect_mapping(block.get("config", {}), WHERE, "slimkit.pruning.config")
    return block


def _check_layers(stack: Any, entry: Any) -> None:
    """A depth-pruned stack: ``{"kept": [distinct block indices], "total": blocks before}``."""
    field = f"slimkit.pruning.layers[{short_repr(stack)}]"
    entry = expect_mapping(entry, WHERE, field)
    total, kept = entry.get("total"), entry.get("kept")
    if not is_count(total, 1):
        raise fail(WHERE, f"{field}.total", f"must be a whole number >= 1, got {short_repr(total)}")
    if not (
        isinstance(kept, list)
        and all(is_count(i) and i < total for i in kept)
        and len(set(kept)) == len(kept)
        and kept == sorted(kept)
    ):
        raise fail(
            WHERE,
            f"{field}.kept",
            f"must be an ascending list of distinct block indices below {total}, got {short_repr(kept)}",
        )


def check_shape(name: str, current: torch.Tensor, shape: list[int]) -> None:
    """Pruning only shrinks: same rank, no dimension larger than the architecture's own."""
    if len(shape) != current.dim() or any(new > old for new, old in zip(shape, current.shape)):
        raise fail(
            WHERE,
            f"slimkit.pruning.tensors[{name!r}]",
            f"is {shape} but the architecture's tensor is {list(current.shape)}; pruning only shrinks "
            "dimensions, so the folder was written for another architecture",
        )


def set_size_attribute(module: nn.Module, module_name: str, attr: str, value: int | list[int]) -> None:
    """``setattr`` for a size attribute the module already holds, with the same type."""
    current = getattr(module, attr, None)
    field = f"slimkit.pruning.attributes[{module_name!r}].{attr}"
    if is_count(current) and is_count(value):
        setattr(module, attr, value)
    elif isinstance(current, (tuple, list)) and isinstance(value, list) and len(value) == len(current):
        if not all(is_count(v) and v <= MAX_DIM for v in current):
            raise fail(WHERE, field, "is not a size attribute of this module")
        setattr(module, attr, type(current)(value))
    else:
        raise fail(
            WHERE,
            field,
            f"cannot be set to {short_repr(value)}: {type(module).__name__}.{attr} is {short_repr(current)}, not a "
            "size of that form",
        )
