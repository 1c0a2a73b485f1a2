"""Check, on a copy, that zeroing units equals removing them -- before training relies on it.

Torch-Pruning treats every traced op it does not know as element-wise. An op that mixes
channels (a mean over channels, a channel shuffle, a reshape into heads) then couples layers
wrongly, and masks would no longer match the pruned model. ``find_inexact`` prunes half of every
group of a copy twice -- once with masks, once physically -- and compares the outputs; when they
differ it bisects down to the group at fault and raises an error that names it and the traced
ops inside, with the ``exclude`` entry that avoids it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleError
from .graph import output_tensors
from .selection import removable
from .slicing import remove_units
from .units import UnitGroup, apply_zero_plan, zero_plan


def _op_name(traced: str) -> str:
    """'_ElementWiseOp_3(MeanBackward1)' -> 'MeanBackward1' (the autograd node of the op)."""
    inner = traced[traced.find("(") + 1 : traced.rfind(")")] if "(" in traced else traced
    return inner or traced


def probe_masks(groups: list[UnitGroup]) -> list[torch.Tensor]:
    """Every other unit of each group (evenly over conv groups), never emptying a layer."""
    masks = []
    for group in groups:
        mask = torch.zeros(group.size, dtype=torch.bool)
        count = removable(group, group.size // 2, None)
        blocks = group.blocks or [list(range(group.size))]
        per_block = count // len(blocks)
        for block in blocks:
            mask[torch.tensor(block[1::2][:per_block], dtype=torch.long)] = True
        masks.append(mask)
    return masks


def compare_outputs(masked: list[torch.Tensor], pruned: list[torch.Tensor]) -> str | None:
    if len(masked) != len(pruned):
        return f"the pruned model returns {len(pruned)} tensors instead of {len(masked)}"
    for i, (a, b) in enumerate(zip(masked, pruned)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 1e-2
        err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        if err > tol * scale:
            return f"output {i} differs by {err:.3g} (relative {err / scale:.3g})"
    return None


def _trial(
    model: nn.Module,
    groups: list[UnitGroup],
    masks: list[torch.Tensor],
    inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    transposed: dict,
    memo: dict,
    finish: Callable[[nn.Module, list[UnitGroup], list[torch.Tensor]], Any],
) -> str | None:
    probe = copy.deepcopy(model, memo=dict(memo))
    probe.eval()
    with torch.no_grad():
        apply_zero_plan(zero_plan(probe, groups, masks, transposed))
        masked = [t.detach().clone() for t in output_tensors(forward(probe, inputs))]
        try:
            remove_units(probe, groups, masks, transposed)
            finish(probe, groups, masks)
            pruned = output_tensors(forward(probe, inputs))
        except Exception as exc:  # any failure of the pruned model is the finding
            return f"the pruned model fails: {type(exc).__name__}: {exc}"
    return compare_outputs(masked, pruned)


def find_inexact(
    model: nn.Module,
    groups: list[UnitGroup],
    inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    transposed: dict,
    memo: dict,
    finish: Callable[[nn.Module, list[UnitGroup], list[torch.Tensor]], Any],
) -> None:
    """Raise ``IncompatibleError`` naming a group whose masked and pruned outputs differ."""
    masks = probe_masks(groups)
    active = [i for i, m in enumerate(masks) if m.any()]

    def run(subset: list[int]) -> str | None:
        chosen = set(subset)
        return _trial(
            model,
            [groups[i] for i in chosen],
            [masks[i] for i in chosen],
            inputs,
            forward,
            transposed,
            memo,
            finish,
        )

    problem = run(active)
    if problem is None:
        return
    suspects = active
    while len(suspects) > 1:
        half = len(suspects) // 2
        first, second = suspects[:half], suspects[half:]
        found = run(first)
        if found is not None:
            suspects, problem = first, found
            continue
        found = run(second)
        if found is None:
            break  # only the combination fails; report the whole set
        suspects, problem = second, found
    named = [groups[i] for i in suspects]
    ops = sorted({_op_name(op) for g in named for op in g.ops if "ElementWise" in op or "Reshape" in op})
    roots = [g.root for g in named]
    raise IncompatibleError(
        "prune: masking and removing these units give different outputs, so slimkit cannot couple "
        f"them exactly ({problem}): {'; '.join(g.describe() for g in named[:3])}. Traced ops inside: "
        f"{', '.join(ops[:10]) or 'none'}. Add the layer to the recipe's prune.exclude, e.g. "
        f"exclude: {roots[:3]!r}."
    )
