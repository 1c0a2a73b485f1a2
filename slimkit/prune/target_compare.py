"""``prune.target.compare``: the solver's widths checked against the widths a user would try
instead, by pruning each on a copy and measuring what reaches the model's output.

The solver ranks plans by predicted error (each group's curve, weighed by one probe of its reach),
and the prediction can rank them wrongly: at the same speed, uniform widths kept more quality on
MobileNetV3 (output cosine 0.664 against 0.601 at 2x, batch 1) and on the digits CNN (99.6%
against 98.8% accuracy at half the MACs). With calibration batches at hand the solver therefore
also builds, at the predicted cost of its own plan,

* ``uniform``: one fraction removed from every group (the smallest whose widths meet the cost),
  each group at its first candidate width removing at least that fraction,
* ``fraction``: the same at the exact fraction, each group rounded as ``channels: f`` rounds it
  (on a timed grid of 6 widths per group the candidates overshoot a fraction by up to a fifth of
  the group; on a fine grid the two differ only in the direction of rounding, and either can
  keep more),
* ``local``: its own greedy on the unweighted curves (the readers' errors alone),

prunes each on a copy the way the point will (consumers refit on the recorded inputs when
``prune.reconstruct``, units physically removed, BatchNorm statistics recomputed:
``_score_plans`` in :mod:`.target`, which measures), and keeps the plan whose outputs stay
closest to the dense model's (mean cosine). With a refit the plans are ranked on batches it did
not see (two folds of the calibration samples, each scored on a copy refit and recounted without
it), since a refit scored on its own rows favours the plan that fits them best, not the one that
keeps the most (a timm resnet calibrated on 12 noise images: the kept plan 0.895 on them, 0.72
cross-fitted, 0.63 on new images). The copy scored on every sample (``cosine``, reported beside
``held_out``) matches the point exactly with independent refits and up to 8 calibration batches
(tested to 1e-4); with ``prune.sequential``, or more batches for the BatchNorm recount, it
approximates it. A plan other than the solver's is kept only if its measured reduction is within
the target's tolerance, or misses it by no more than the solver's plan did. This module holds
the plain-number parts, testable on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .target_costs import CostModel

Plan = dict[int, int]  # group index -> removal count
PLANS = ("solver", "uniform", "fraction", "local")  # the plans compared, by name


def uniform_plan(
    sizes: list[int],
    cands: list[list[int]],
    cost: CostModel,
    budget: float,
    snap: Callable[[int, int], int] | None = None,
) -> Plan:
    """The smallest common fraction removed from every group whose predicted cost meets
    ``budget``; where even every group at its last candidate does not, that plan.

    ``snap(g, count)``: what group ``g`` removes when asked for ``count`` (its rounding, within
    its first and last candidate): each group then loses the fraction as ``channels: f`` /
    ``heads: f`` would prune it (the count floored, then the kept width rounded up), priced
    between the timed widths (``cost.interpolating``).
    Without it each group takes its first candidate removing at least the fraction, which on a
    timed grid of 6 widths overshoots by up to a fifth of the group (all-MiniLM-L6-v2 at 3x,
    batch 1: token cosine 0.66 on the calibration batches, where ``channels: 0.79`` at about the
    same measured speed kept 0.76)."""

    def plan(fraction: float) -> Plan:
        if snap is not None:
            return {g: snap(g, int(fraction * sizes[g] + 1e-9)) for g in range(len(cands))}
        return {
            g: next((c for c in options if c >= fraction * sizes[g] - 1e-9), options[-1])
            for g, options in enumerate(cands)
        }

    with cost.interpolating():
        low, high = 0.0, 1.0
        if cost.total(plan(high)) > budget:
            return plan(high)
        for _ in range(40):  # the cost falls as the fraction grows: bisect on it
            middle = 0.5 * (low + high)
            if cost.total(plan(middle)) <= budget:
                high = middle
            else:
                low = middle
    return plan(high)


def plan_key(plan: Plan) -> tuple[int, ...]:
    """The removal counts in group order: equal plans share a key."""
    return tuple(plan[g] for g in sorted(plan))


def rank_value(entry: dict[str, Any]) -> float:
    """What plans are ranked by: the cross-fitted cosine where one was measured, else the cosine
    on the calibration batches (no refit: nothing was fit to them)."""
    return entry["held_out"] if "held_out" in entry else entry["cosine"]


def pick(
    plans: dict[str, Plan],
    quality: Callable[[Plan], dict[str, float]],
    reduction: Callable[[Plan], float],
    goal: float,
    tolerance: float,
    solver_miss: float,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The name of the plan to keep (``"solver"`` unless another is better) and what was
    measured of each.

    Every distinct plan's quality is measured (a plan equal to an earlier one shares its entry):
    ``quality(plan)`` gives its ``cosine`` and, where measured, ``held_out`` (ranked by
    :func:`rank_value`). Going down from the best, a plan other than the solver's is timed (or
    counted) and kept if its reduction misses ``goal`` by at most ``tolerance``, or by no more
    than the solver's did (``solver_miss``); the solver's plan is kept when it is reached first."""
    seen: dict[tuple[int, ...], str] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, counts in plans.items():
        key = plan_key(counts)
        if key in seen:
            report[name] = {"same_as": seen[key]}
            continue
        seen[key] = name
        report[name] = {k: round(float(v), 6) for k, v in quality(counts).items()}
    ranked = sorted((n for n in report if "cosine" in report[n]), key=lambda n: -rank_value(report[n]))
    for name in ranked:
        if name == "solver":
            break
        measured = reduction(plans[name])
        miss = abs(measured / goal - 1.0)
        report[name].update(measured=round(measured, 4), miss=round(miss, 4))
        if miss <= max(tolerance, solver_miss):
            return name, report
    return "solver", report
