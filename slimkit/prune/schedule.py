"""When units are removed: the pruning points of a schedule and the target ratio at each.

* ``one_shot``: one point at ``start_step``, straight to the final ratio ``p``.
* ``iterative``: ``stages`` points, the k-th at ``start_step + k (end_step - start_step) / stages``;
  each removes ``1 - (1 - p)^(1/stages)`` of what is left, so after k stages
  ``1 - (1 - p)^(k / stages)`` is gone and the last stage (at ``end_step``) reaches ``p``.
* ``linear``, ``exponential`` and ``cubic``: a point every ``every`` steps from ``start_step``,
  plus ``end_step``, with ``x = (t - start_step) / (end_step - start_step)`` the progress at point t:

  - ``linear``: ``s_t = p x``, the same number of units at every point;
  - ``exponential``: ``s_t = 1 - (1 - p)^x``: the kept fraction decays geometrically, each
    point removing the same share of what is left (the continuous form of ``iterative``);
  - ``cubic`` (Zhu & Gupta, 2017, the polynomial schedule):
    ``s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3`` with ``s_i = 0``, ``s_f = p``,
    ``t0 = start_step`` and ``n dt = end_step - start_step``: fast early, gentle at the end,
    when fewer units are left to lose.

A step number is the number of optimizer steps done (0 = before training). Between points the
target stays at the last point's value; a unit pruned at one point stays pruned.
"""

from __future__ import annotations

from ..recipe import ScheduleConfig


def pruning_points(schedule: ScheduleConfig) -> list[int]:
    """The steps at which units are ranked and removed, ascending."""
    start = schedule.start_step
    if schedule.kind == "one_shot":
        return [start]
    end = int(schedule.end_step)
    if schedule.kind == "iterative":
        n = schedule.stages
        return sorted({start + round(k * (end - start) / n) for k in range(1, n + 1)})
    points = list(range(start, end, schedule.every))
    return [*points, end]


def target_at_point(schedule: ScheduleConfig, final: float, point: int) -> float:
    """The fraction of units removed once pruning point ``point`` is done."""
    if final <= 0.0:
        return 0.0
    start = schedule.start_step
    if point < start:
        return 0.0
    if schedule.kind == "one_shot":
        return final
    end = int(schedule.end_step)
    if point >= end:
        return final
    if schedule.kind == "iterative":
        points = pruning_points(schedule)
        done = sum(1 for p in points if p <= point)
        return 1.0 - (1.0 - final) ** (done / schedule.stages)
    progress = (point - start) / (end - start)
    if schedule.kind == "linear":
        return final * progress
    if schedule.kind == "exponential":
        return 1.0 - (1.0 - final) ** progress
    return final + (0.0 - final) * (1.0 - progress) ** 3


def target_at(schedule: ScheduleConfig, final: float, step: int) -> float:
    """The target ratio in force after ``step`` optimizer steps (that of the last point <= step)."""
    passed = [p for p in pruning_points(schedule) if p <= step]
    return target_at_point(schedule, final, passed[-1]) if passed else 0.0


def due_point(schedule: ScheduleConfig, step: int, last_done: int) -> int | None:
    """The latest pruning point in (last_done, step], if any (steps may be skipped or jump)."""
    due = [p for p in pruning_points(schedule) if last_done < p <= step]
    return due[-1] if due else None
