"""What a pruning point learns from data: recorded layer inputs and loss gradients.

:class:`PointData` belongs to one :class:`~slimkit.prune.pruner.Pruner`. It owns

* a :class:`~slimkit.prune.statistics.Recorder` on every layer that reads pruned units, when
  the recipe ranks by ``activation``, reconstructs, or allocates a global ratio by measured
  sensitivity. During training it records the forwards of the ``statistics_steps`` steps
  before each pruning point; ``slimkit.calibrate`` records the calibration batches instead;
* the gradient accumulators of ``taylor`` / ``fisher`` (from every backward pass since the
  last point, or from calibration batches);

and says what a point still lacks (:meth:`PointData.lacking`), so that a point at step 0
waits for ``slimkit.calibrate`` and is refused with a clear error when none came.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleError
from ..modules import get_module
from ..recipe import PruneConfig
from . import importance
from .schedule import pruning_points
from .statistics import InputStats, Recorder, columns_of, record, without
from .units import UnitGroup


@dataclass
class Consumer:
    """A layer that reads units of some groups, and which of its input positions they are."""

    name: str
    module: nn.Module
    stats: InputStats
    members: list[tuple[int, int]]  # (group index in the flat list, member index)


class GradientStatistics:
    """Taylor / Fisher accumulators for channel and head units, folded into the state each step."""

    def __init__(self, model: nn.Module, kinds: list, transposed: dict, method: str) -> None:
        self.method = method
        self.parts = [
            (
                kind.name,
                importance.TaylorAccumulator(model, kind.groups, kind.offsets, kind.total, transposed, method),
            )
            for kind in kinds
            if kind.groups
        ]

    @property
    def weights(self) -> list[nn.Parameter]:
        return [w for _, acc in self.parts for w in acc.weights]

    def flush(self, state: nn.Module) -> None:
        for name, acc in self.parts:
            acc.flush(getattr(state, f"{name}_{self.method}"))

    def remove(self) -> None:
        for _, acc in self.parts:
            acc.remove()


class PointData:
    """Recorded inputs and gradients for the pruning points of one pruner."""

    def __init__(self, model: nn.Module, config: PruneConfig, kinds: list, transposed: dict) -> None:
        self.config = config
        self.kinds = kinds
        self.groups: list[UnitGroup] = [g for kind in kinds for g in kind.groups]
        self.recorder: Recorder | None = None
        self.consumers: dict[str, Consumer] = {}
        self.gradients: GradientStatistics | None = None
        self.calibrated = False  # slimkit.calibrate supplied this point's data
        self.samples: list = []  # a few of calibrate's batches while it prunes (prune.target probes them)
        self.transposed = transposed
        if config.records_inputs:
            readers: dict[str, list[tuple[int, int]]] = {}
            for g, group in enumerate(self.groups):
                for m, member in enumerate(group.members):
                    if member.side == "in":
                        readers.setdefault(member.module, []).append((g, m))
            modules = {name: get_module(model, name) for name in readers}
            gram = config.reconstruct or config.measures_sensitivity or config.importance == "obs"
            self.recorder = Recorder(model, modules, transposed, gram=gram)
            for name, stats in self.recorder.stats.items():
                self.consumers[name] = Consumer(name, modules[name], stats, readers[name])
        if config.gradient_based:
            self.gradients = GradientStatistics(model, kinds, transposed, config.importance)

    # -- recording windows ------------------------------------------------------------------
    def window(self, step: int, last_point: int) -> None:
        """Record the forwards of the steps ``[p - statistics_steps, p)`` before the next point p."""
        if self.recorder is None:
            return
        upcoming = [p for p in pruning_points(self.config.schedule) if p > last_point]
        self.recorder.active = bool(upcoming) and upcoming[0] - self.config.statistics_steps <= step < upcoming[0]

    def stats(self) -> dict[str, InputStats]:
        return self.recorder.stats if self.recorder is not None else {}

    def lacking(self, state: nn.Module) -> list[str]:
        """What the next point needs and was not given (empty: ready)."""
        out = []
        if self.recorder is not None and self.recorder.seen == 0:
            out.append("recorded layer inputs")
        if self.gradients is not None:
            sums = [getattr(state, f"{name}_{self.gradients.method}") for name, _ in self.gradients.parts]
            if not any(bool((s > 0).any()) for s in sums):
                out.append("gradients of a loss")
        return out

    def after_point(self) -> None:
        if self.recorder is not None:
            self.recorder.reset()
        self.calibrated = False

    def finished(self) -> None:
        """No point is left: stop recording and drop the hooks."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        if self.gradients is not None:
            self.gradients.remove()
            self.gradients = None

    # -- reconstruction ----------------------------------------------------------------------
    def removed_columns(self, consumer: Consumer, pruned: list[torch.Tensor]) -> list[int]:
        """The consumer's weight columns of every pruned unit (earlier points included)."""
        positions: set[int] = set()
        for g, m in consumer.members:
            units = pruned[g].nonzero().flatten().tolist()
            if units:
                positions.update(self.groups[g].members[m].positions(units))
        return columns_of(consumer.stats, consumer.module, sorted(positions))

    def changed_consumers(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> list[Consumer]:
        """Consumers that lost a column at this point, in recording order."""
        changed = []
        for consumer in self.consumers.values():
            if any(bool((after[g] & ~before[g]).any()) for g, _ in consumer.members):
                changed.append(consumer)
        return changed

    def record(self, model: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any]) -> dict:
        """What every consumer sees on ``batches`` alone (not added to the recorded statistics)."""
        modules = {name: c.module for name, c in self.consumers.items()}
        return record(model, modules, self.transposed, batches, forward)

    @contextmanager
    def holding_out(self, part: dict[str, InputStats]) -> Iterator[None]:
        """Inside, every consumer's statistics lack ``part``'s rows (some of the recorded batches,
        :meth:`record`-ed again): refits read only the others."""
        saved = {name: c.stats for name, c in self.consumers.items()}
        try:
            for name, consumer in self.consumers.items():
                if name in part:
                    consumer.stats = without(consumer.stats, part[name])
            yield
        finally:
            for name, consumer in self.consumers.items():
                consumer.stats = saved[name]

    def summary(self) -> dict[str, Any]:
        return {"consumers": len(self.consumers), "recording": bool(self.recorder and self.recorder.active)}


def missing_data_error(config: PruneConfig, point: int, missing: list[str]) -> IncompatibleError:
    """The refusal of a data-aware point that never got its data."""
    needs = (
        [f"importance '{config.importance}'"] if config.importance in ("activation", "obs", "taylor", "fisher") else []
    )
    needs += ["reconstruct"] if config.reconstruct else []
    return IncompatibleError(
        f"prune: {' and '.join(needs)} at step {point} need {' and '.join(missing)}, and "
        "slimkit.calibrate was not called. Call slimkit.calibrate(model, batches, num_batches=N) "
        "after prepare (batches with labels, or a teacher, for taylor / fisher), or start the schedule "
        f"later (prune.schedule.start_step >= {config.statistics_steps}) so that training forwards supply it."
    )
