"""The search behind ``prune.target``: candidate removal counts per group, the greedy that meets
a cost budget with the least summed error, and the correction of the goal between measurements.

Kept apart from :mod:`.target` (which measures and decides) so that it can be read and tested
on plain numbers.
"""

from __future__ import annotations

import math

from .selection import removable
from .target_costs import CostModel
from .units import UnitGroup


def candidates(group: UnitGroup, done: int, round_to: int | None, max_ratio: float, count: int) -> list[int]:
    """Up to ``count`` removal counts for a group, ascending from what is already pruned."""
    cap = max(removable(group, int(max_ratio * group.size + 1e-9), None), done)
    values = sorted({max(removable(group, c, round_to), done) for c in range(done, cap + 1)})
    if len(values) <= count:
        return values
    picks = {round(j * (len(values) - 1) / (count - 1)) for j in range(count)}
    return [values[j] for j in sorted(picks)]


def greedy(cands: list[list[int]], errors: list[list[float]], cost: CostModel, budget: float) -> dict[int, int]:
    """Removal counts (one candidate per group) meeting ``budget`` with the least summed error."""
    idx = [0] * len(cands)
    counts = {g: c[0] for g, c in enumerate(cands)}
    current = cost.total(counts)
    while current > budget:
        best = None
        for g, options in enumerate(cands):
            for j in range(idx[g] + 1, len(options)):
                saving = -cost.delta(g, options[j], counts)
                if saving <= 0:
                    continue
                # a step saving more than is still needed is worth only what is needed: near the
                # budget, the step that meets it with the least error wins over a big overshoot
                useful = min(saving, current - budget)
                key = (max(errors[g][j] - errors[g][idx[g]], 0.0) / useful, g, j)
                best = key if best is None or key < best else best
        if best is None:
            break  # nothing left to remove: the caller compares with the budget
        _, g, j = best
        current += cost.delta(g, cands[g][j], counts)
        idx[g], counts[g] = j, cands[g][j]
    while True:  # the last steps may overshoot: give back the most error that the budget allows
        best = None
        for g, options in enumerate(cands):
            for j in range(idx[g]):
                change = cost.delta(g, options[j], counts)
                gain = errors[g][idx[g]] - errors[g][j]
                if current + change <= budget and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, g, j, change)
        if best is None:
            return counts
        _, g, j, change = best
        current += change
        idx[g], counts[g] = j, cands[g][j]


def next_aim(tried: list[tuple[float, float]], goal: float, most: float) -> float:
    """The predicted reduction to aim at next, from (predicted, measured) pairs so far: where the
    pairs bracket the goal, interpolate between the nearest two (in logs; the dense model is the
    pair (1, 1)); else rescale the nearest by goal / measured. Never above ``most``."""
    points = sorted({(1.0, 1.0), *tried})
    below = [p for p in points if p[1] <= goal]
    above = [p for p in points if p[1] > goal]
    if below and above:
        (p1, m1), (p2, m2) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if m2 > m1 and p1 > 0 and p2 > 0:
            t = (math.log(goal) - math.log(max(m1, 1e-12))) / (math.log(m2) - math.log(max(m1, 1e-12)))
            return min(max(math.exp(math.log(p1) + t * (math.log(p2) - math.log(p1))), 1.0), most)
    predicted, measured = min(tried, key=lambda p: abs(math.log(max(p[1], 1e-12) / goal)))
    return min(max(predicted * goal / max(measured, 1e-12), 1.0), most)
