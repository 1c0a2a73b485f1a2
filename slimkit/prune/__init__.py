"""Structured pruning (channels, MLP neurons, attention heads) and unstructured / N:M masks.

    recipe = slimkit.Recipe.from_dict({"prune": {"channels": 0.5, "heads": 0.25,
                                                 "schedule": {"kind": "cubic", "end_step": 1000}}})
    model = slimkit.prepare(model, recipe)     # masks: shapes unchanged while training
    ...                                        # train; slimkit.step(model) after optimizer.step()
    small = slimkit.convert(model)             # units physically removed from every coupled layer

This package imports torch only; Torch-Pruning's dependency graph is imported when a model
is prepared for channel pruning. The ``pruning`` block of saved folders is
registered in slimkit/methods.py (by reference: this package never imports ``slimkit.hub``).
"""

from __future__ import annotations

from .depth import block_scores, rank_blocks
from .metrics import count_macs, count_parameters
from .pruner import Pruner
from .schedule import pruning_points, target_at, target_at_point
from .units import Member, UnitGroup


def summary(model) -> dict:
    """What pruning has done to a prepared model so far: units pruned / prunable per kind
    (``channels``, ``heads``), ``layers`` (the blocks removed and the removable ones), the
    channel groups left whole with the reason (``skipped``), and with ``prune.target`` what was
    asked, predicted and measured and the width chosen per group (``target``)."""
    from ..controller import controller_of, unwrap

    pruner = controller_of(unwrap(model)).methods.get("prune")
    if pruner is None:
        from ..errors import SlimkitError

        raise SlimkitError(f"{type(unwrap(model)).__name__} was prepared without a 'prune' recipe section")
    return pruner.summary()


__all__ = [
    "Member",
    "Pruner",
    "block_scores",
    "UnitGroup",
    "count_macs",
    "count_parameters",
    "rank_blocks",
    "summary",
    "pruning_points",
    "target_at",
    "target_at_point",
]
