"""``prune.target``: choose per-group widths that reach a budget with the least predicted loss.

At the first pruning point of a recipe with a target, :func:`solve_target`

1. lists, per group, a handful of candidate removal counts (widths that are multiples of
   ``round_to``, at most ``max_layer_ratio`` removed);
2. prices each candidate: its quality cost is the group's measured error curve (the relative
   output error of the layers that read its units, from recorded inputs: the curves of
   ``allocation: sensitivity``), weighted by how much of that error reaches the model's output
   (:func:`output_reach`: one probe per group on a few calibration batches); without recorded
   inputs, the sum of its lowest normalised scores. Its saving comes from the
   :class:`~.target_costs.CostModel` (latency measured on this machine and cached, or counted
   MACs / parameters);
3. greedily takes, among every group's further candidates, the step with the least error per
   unit of cost saved (the lower-convex-hull greedy of ``allocation``, with cost in place of
   units) until the predicted cost meets the budget, then steps groups back while it still does;
4. checks the prediction on a physically pruned copy (timed interleaved against the dense model,
   or counted), and where it misses by more than half the ``tolerance``, corrects the predicted goal
   (rescaled by goal / measured, or interpolated between earlier tries that bracket the goal)
   and solves again (``rounds`` measurements in all), keeping the closest.

With ``prune.layers`` the solver may also remove whole blocks, up to that many: for each count
``d`` from 0 it takes the ``d`` blocks whose removal moves the output least on the calibration
batches (:func:`~.depth.removal_sets`), solves the widths of the remaining groups for what is
left of the budget (the cost model then covers the layers that stay; the copies it times and
scores have the blocks physically removed), and keeps the plan whose outputs stay closest to the
dense model's (the output cosine the ``compare`` step measures) among those within tolerance.
Blocks remove what widths cannot: per-op overhead, norms, activations and attention products,
which dominate compiled INT8 transformers and small CNNs at batch 1.

A budget that even every group at its smallest candidate (and the most blocks allowed) cannot
meet is refused, naming the best reachable figure. Under DDP rank 0 decides alone (its timings)
and broadcasts the counts and blocks.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters import call_model
from ..distributed import alone, broadcast_, is_distributed, rank
from ..errors import ConfigError, IncompatibleError
from ..malloc import faults_per_call, is_steady, page_bytes
from ..modules import matches_any
from ..outputs import flat_outputs, mean_cosine
from ..recipe import TargetConfig
from .allocation import error_curve, group_readers, removal_order
from .blocks import Block, remove_blocks
from .depth import removal_sets
from .heads import set_head_counts
from .latency import LatencyTable, interleaved_ms, machine_key, torch_threads
from .metrics import count_macs, count_parameters
from .oneshot import call_on_batch, reconstruct_point
from .reconstruct import recalibrate_batchnorms
from .selection import choose, removable
from .slicing import remove_units
from .target_compare import PLANS, pick, plan_key, rank_value, uniform_plan
from .target_costs import CostModel, layers_of
from .target_int8 import Int8Copies
from .target_solver import candidates, greedy, next_aim

if TYPE_CHECKING:
    from .pruner import Pruner

logger = logging.getLogger("slimkit")

DEFAULT_ROUND_TO = 8  # channel widths with a target, unless prune.round_to says otherwise
_COUNTED_WIDTHS = 32  # candidate widths per group for macs / params targets
_REACH_SAMPLES = 2  # calibration batches each group's output-reach probe runs on
_FOLDS = 2  # compare's cross-fit: folds of the calibration samples, each scored on a refit without it
_DEPTH_SAMPLES = 4  # calibration batches the depth options are ranked on (every set: a forward each)


@dataclass
class TargetOutcome:
    """What the target asked, what the solver predicted and what the pruned copy measured.
    Reductions are dense / pruned (a speed-up, or 1 / the fraction kept)."""

    kind: str
    asked: float
    batch: int
    threads: int | None
    tokens: int | None = None  # prune.target.tokens: the sequence length timed (None: the inputs' own)
    goal: float = 0.0  # the asked reduction (latency_ms: dense latency / asked latency)
    predicted: float = 0.0
    measured: float | None = None
    dense: float = 0.0  # ms, MACs or parameters of the dense model
    pruned: float | None = None
    met: bool = False
    rounds: list[dict[str, float]] = field(default_factory=list)
    widths: dict[str, list[int]] = field(default_factory=dict)  # group root -> [dense, kept]
    output_reach: dict[str, float] = field(default_factory=dict)  # group root -> weight of its error curve
    picked: str = "solver"  # prune.target.compare: the plan kept
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan -> cosine, held_out (and reduction)
    layers_measured: int = 0
    layers_cached: int = 0
    int8: bool = False  # prune.target.int8: measured = the pruned INT8 model against the dense FP32 one
    int8_dense: float | None = None  # int8: the dense model's INT8 copy against its FP32 self
    layers: list[str] = field(default_factory=list)  # prune.layers: the blocks removed, in removal order
    depth: list[dict[str, Any]] = field(default_factory=list)  # prune.layers: each block count tried
    # timed targets: the dense model's minor page faults per forward at `batch` (None: not
    # counted), and whether slimkit.steady_malloc was applied (see slimkit/malloc.py)
    page_faults: float | None = None
    steady_malloc: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        unit = {"speedup": "x", "latency_ms": " ms", "macs": " of MACs", "params": " of parameters"}[self.kind]
        got = "not measured" if self.measured is None else _figure(self.kind, self.measured, self.dense)
        return (
            f"target {self.asked:g}{unit}{' (INT8 vs the dense FP32 model)' if self.int8 else ''}: "
            f"measured {got} (predicted {_figure(self.kind, self.predicted, self.dense)}"
            + (
                f", batch {self.batch}{f' x {self.tokens} tokens' if self.tokens else ''}, {self.threads} threads"
                if self.kind in ("speedup", "latency_ms")
                else ""
            )
            + f"; {'within' if self.met else 'outside'} tolerance"
            + (f"; {len(self.layers)} block(s) removed: {', '.join(self.layers)}" if self.layers else "")
            + (
                f"; timed with the default allocator, {self.page_faults * page_bytes() / 2**20:.0f} MB of page "
                "faults per dense forward (see slimkit.steady_malloc)"
                if _many_faults(self.page_faults) and not self.steady_malloc
                else ""
            )
            + ")"
        )


def restored_outcome(pruner: Pruner) -> TargetOutcome:
    """The outcome of a solve restored from a checkpoint: what was asked and the widths chosen
    (the figures measured then are not part of the checkpoint)."""
    target = pruner.config.target
    groups = pruner.channels.groups + pruner.heads.groups
    outcome = TargetOutcome(target.kind, target.value, target.batch, target.threads, target.tokens, int8=target.int8)
    counts = pruner.state.target_counts.tolist()
    outcome.widths = {g.root: [g.size, g.size - int(c)] for g, c in zip(groups, counts)}
    if pruner.depth is not None:
        outcome.layers = [pruner.depth.blocks[i].name for i in pruner.depth.planned_order()]
    return outcome


def _figure(kind: str, reduction: float, dense: float) -> str:
    if reduction <= 0:
        return "unknown (restored from a checkpoint)"
    if kind == "speedup":
        return f"{reduction:.2f}x"
    if kind == "latency_ms":
        return f"{dense / reduction:.2f} ms"
    return f"{1.0 / reduction:.3f}"


def _map_tensors(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of ``inputs`` (a tensor, or dicts / tuples / lists of them)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: _map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map_tensors(v, fn) for v in inputs)
    return inputs


def _tiled(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` repeated along ``dim`` and cut to ``size`` there."""
    reps = [1] * tensor.dim()
    reps[dim] = -(-size // tensor.shape[dim])
    return tensor.repeat(*reps).narrow(dim, 0, size)


def rebatched(inputs: Any, batch: int) -> Any:
    """``inputs`` (a tensor, a tuple or a dict of tensors) with ``batch`` rows (tiled / cut)."""
    return _map_tensors(inputs, lambda t: _tiled(t, 0, batch) if t.dim() > 0 else t)


def with_tokens(inputs: Any, tokens: int | None) -> Any:
    """``inputs`` with every 2-D integer tensor (token ids, attention masks) tiled or cut to
    ``tokens`` along dim 1 (``prune.target.tokens``: time at the length that will be served)."""
    if tokens is None:
        return inputs
    found = []

    def resize(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 2 or tensor.is_floating_point():
            return tensor
        found.append(tensor)
        return _tiled(tensor, 1, tokens)

    out = _map_tensors(inputs, resize)
    if not found:
        raise ConfigError(
            f"prune.target.tokens {tokens}: the example inputs hold no token tensor (a 2-D integer tensor such as "
            "input_ids) to set the length of; drop tokens for this model"
        )
    return out


def _error_curves(
    pruner: Pruner, model: nn.Module, measure: _Measure, scores, pruned, cands, outcome: TargetOutcome
) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per group, the quality cost of each candidate count (see the module docstring), and the
    readers' curves before the output-reach weighting (None without recorded inputs)."""
    from .oneshot import removed_columns_of

    data = pruner.data
    groups = pruner.channels.groups + pruner.heads.groups
    if data is not None and data.recorder is not None and data.recorder.seen > 0:
        # the readers and their curves do not depend on the blocks a depth option removes: made once
        memo = measure.curves
        if "readers" not in memo:
            consumers = list(data.consumers.values())
            memo["readers"] = group_readers(consumers, pruner.config.damping, pruner.config.reconstruct)
            memo["plain"] = group_readers(consumers, pruner.config.damping, False)
            memo["orders"] = [removal_order(scores[g], pruned[g]) for g in range(len(groups))]
        readers, plain, orders = memo["readers"], memo["plain"], memo["orders"]
        if all(g in readers for g in range(len(groups))):
            columns = removed_columns_of(pruner)

            def curve(g: int) -> list[float]:
                key = (g, tuple(cands[g]))
                if key not in memo:
                    memo[key] = error_curve(readers[g], g, orders[g], pruned[g], cands[g], columns)
                return memo[key]

            curves = [curve(g) for g in range(len(groups))]
            local = lambda g, count: error_curve(plain[g], g, orders[g], pruned[g], [count], columns)[0]  # noqa: E731
            probed = data.samples[:_REACH_SAMPLES] or [pruner.example_inputs]
            base = measure.probe({g: c[0] for g, c in enumerate(cands)}) if measure.blocks else model
            reach = output_reach(base, measure, cands, local, probed)
            outcome.output_reach = {g.root: round(r, 6) for g, r in zip(groups, reach)}
            return [[reach[g] * e for e in curve] for g, curve in enumerate(curves)], curves
    logger.warning(
        "prune.target: no recorded inputs for every group (call slimkit.calibrate first); weighing "
        "quality by normalised scores instead of measured output errors"
    )
    curves = []
    for g, group in enumerate(groups):
        order = removal_order(scores[g], pruned[g])
        values = scores[g][order].double()
        values = values / (values.mean() if len(values) and values.mean() > 0 else 1.0)
        done = int(pruned[g].sum())
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)]) / group.size
        curves.append([float(cum[min(c - done, len(cum) - 1)]) for c in cands[g]])
    return curves, None


def output_reach(model: nn.Module, measure: _Measure, cands, local, batches: list) -> list[float]:
    """Per group, how much of its readers' output error reaches the model's output (``model``: the
    model the probes are compared with, the dense one or, with blocks removed, that model).

    The curves above are relative errors of each group's own readers: comparable along one
    group, not across groups. An FFN's error is diluted by the residual stream it is added to,
    an early stage's grows through the layers after it; weighing them alike cut every FFN of
    MiniLM to its floor at 2x where uniform widths kept more quality. So each group is probed
    once, alone, at its middle candidate, physically cut without refit: the drop of the output
    cosine on a few calibration batches, divided by the readers' relative error at that count
    without refit (both about linear in the squared error there), rescales its curve."""
    batches = [b for b in batches if b is not None]
    if not batches:
        return [1.0] * len(cands)
    reference = measure.outputs(model, batches)
    base = {g: c[0] for g, c in enumerate(cands)}
    reach = []
    for g, options in enumerate(cands):
        count = options[len(options) // 2]
        error = local(g, count) if count > options[0] else 0.0
        if error <= 0.0:
            reach.append(None)
            continue
        net = measure.probe({**base, g: count})
        drop = 1.0 - mean_cosine(measure.outputs(net, batches), reference)
        del net
        reach.append(max(drop, 0.0) / error)
    known = sorted(r for r in reach if r is not None and r > 0)
    median = known[len(known) // 2] if known else 1.0  # groups without a probe weigh as the typical one
    floor = median * 1e-3 if known else 1.0  # a probe within noise is cheap, not free
    return [median if r is None else max(r, floor) for r in reach]


class _Measure:
    """The physically pruned copy's reduction: timed against the dense model, or counted.

    Every copy has ``blocks`` removed too (:meth:`remove_blocks`: a depth option of the solver).
    ``factor`` is the *base* model's reduction (dense / base), where the base is the dense model
    with those blocks removed and, with ``int8`` (:mod:`.target_int8`), made INT8 (the copies
    timed are then INT8 and the dense model a plain FP32 copy). Timed, the base copy runs
    interleaved with every measurement and ``factor`` follows the last timing; the solver aims
    in units of the base model (pruned / base is 1 with nothing pruned, as its correction assumes).
    """

    def __init__(
        self, pruner: Pruner, model: nn.Module, inputs: Any, kind: str, scores, pruned, int8: Int8Copies | None = None
    ) -> None:
        self.pruner, self.model, self.inputs, self.kind = pruner, model, inputs, kind
        self.scores, self.pruned, self.int8 = scores, pruned, int8
        self.memo = {id(pruner.controller): pruner.controller}
        recorder = pruner.data.recorder if pruner.data is not None else None
        if recorder is not None:  # copies share it (its hooks skip them): its Gram matrices are not copied
            self.memo[id(recorder)] = recorder
        self.blocks: list[Block] = []
        self.curves: dict = {}  # _error_curves' readers and curves, reused across depth options
        self.dense_copy = self.base_copy = None
        self.factor = 1.0
        self._dense_outputs: tuple[int, list] | None = None  # (id of the samples, the outputs)
        if kind == "latency":
            self.dense_copy = self._copy().eval()
            if int8 is not None:
                self.dense_copy = pruner.controller.strip_copy(self.dense_copy)
                self.base_copy = self.dense_int8 = int8.convert(self._copy())
        self.dense = self._value(model if kind != "latency" else self.dense_copy)
        self.last_dense = self.dense
        self.base = self.dense  # the base model's float latency / count (the cost model's dense figure)

    def _copy(self) -> nn.Module:
        return copy.deepcopy(self.model, dict(self.memo))

    def dense_outputs(self, samples: list) -> list:
        """The dense model's outputs on ``samples``, what plans are scored against: computed once
        for every compare and depth option of the solve."""
        if self._dense_outputs is None or self._dense_outputs[0] != id(samples):
            with torch.no_grad():  # kept for the whole solve: no autograd graph with it
                self._dense_outputs = (id(samples), self.outputs(self.model, samples))
        return self._dense_outputs[1]

    def outputs(self, net: nn.Module, batches: list) -> list:
        """``net``'s outputs on ``batches`` as every copy is judged: rows per real token, or per
        sentence with ``prune.target.pool: mean``."""
        return flat_outputs(net, batches, "prune.target", self.pruner.config.target.pool)

    def remove_blocks(self, blocks: list[Block]) -> None:
        """From now on every copy has ``blocks`` removed; measures the base model (see the class)."""
        self.blocks = list(blocks)
        base = {g: int(p.sum()) for g, p in enumerate(self.pruned)}
        if self.kind != "latency":
            self.base = self._value(self.probe(base))
            self.factor = self.dense / max(self.base, 1e-12)
            return
        plain = self.probe(base)
        if self.int8 is not None:
            plain = self.pruner.controller.strip_copy(plain)
            self.base_copy = self.int8.convert(self.probe(base)) if self.blocks else self.dense_int8
        else:
            self.base_copy = plain if self.blocks else None
            self.factor = 1.0
        if self.blocks:  # the float base, in units of the first dense timing (the cost model's)
            value = self._value(plain, self.dense_copy)
            self.base = value * self.dense / max(self.last_dense, 1e-12)
        else:
            self.base = self.dense

    def _value(self, net: nn.Module, against: nn.Module | None = None) -> float:
        if self.kind == "macs":
            return float(count_macs(net, self.inputs))
        if self.kind == "params":
            return float(count_parameters(net))
        models = {"dense": self.dense_copy} if against is None else {"dense": against, "pruned": net}
        if against is not None and self.base_copy is not None and self.base_copy is not net:
            models["base"] = self.base_copy
        times = interleaved_ms(models, self.inputs)
        self.last_dense = times["dense"]
        if "base" in times:
            self.factor = times["dense"] / max(times["base"], 1e-12)
        elif against is not None and net is self.base_copy:
            self.factor = times["dense"] / max(times["pruned"], 1e-12)
        return times.get("pruned", times["dense"])

    def masks(self, counts: dict[int, int]) -> list[torch.Tensor]:
        """The pruned mask of every group at these counts (the lowest-scored units)."""
        groups = self.pruner.channels.groups + self.pruner.heads.groups
        return [choose(g, s, p, counts[i]) for i, (g, s, p) in enumerate(zip(groups, self.scores, self.pruned))]

    def probe(self, counts: dict[int, int], refit: bool = False) -> nn.Module:
        """A copy of the model physically pruned to ``counts`` (and without ``blocks``); ``refit``:
        its consumers refit first, as the pruning point refits them (``prune.reconstruct``)."""
        pruner = self.pruner
        groups = pruner.channels.groups + pruner.heads.groups
        masks = self.masks(counts)
        net = self._copy()
        if refit:
            reconstruct_point(pruner, pruner._pruned(), masks, into=net)
        remove_units(net, groups, masks, pruner.transposed)
        set_head_counts(net, pruner.controller.adapter, groups, masks)
        if self.blocks:
            remove_blocks(net, pruner.depth.stacks, set(self.blocks), pruner.controller.adapter)
        return net.eval()

    def reduction(self, counts: dict[int, int], int8: bool = True) -> tuple[float, float]:
        """(dense / pruned, pruned) for these counts; with ``prune.target.int8`` the pruned copy
        is timed as INT8 unless ``int8`` is False (then as the plain float copy)."""
        net = self.probe(counts)
        if self.int8 is not None:
            net = self.int8.convert(net) if int8 else self.pruner.controller.strip_copy(net)
        value = self._value(net, self.dense_copy)
        dense = self.last_dense if self.kind == "latency" else self.dense
        return dense / max(value, 1e-12), value


def solve_target(
    pruner: Pruner, model: nn.Module, scores: list, pruned: list
) -> tuple[list[int], list[int], TargetOutcome]:
    """Removal counts per group (channels, then heads) for ``prune.target``, and the blocks to
    remove (indices into ``pruner.depth.blocks``, in removal order), on rank 0, broadcast."""
    target: TargetConfig = pruner.config.target
    groups = pruner.channels.groups + pruner.heads.groups
    n_blocks = len(pruner.depth.blocks) if pruner.depth is not None else 0
    threads = target.threads or torch.get_num_threads()
    outcome = TargetOutcome(target.kind, target.value, target.batch, threads, target.tokens, int8=target.int8)
    # [refused, met, goal, predicted, measured, dense, pruned, picked, counts..., block positions...]:
    # every process reports rank 0's (what compare measured of each plan stays in rank 0's summary)
    status = torch.zeros(8 + len(groups) + n_blocks, dtype=torch.float64)
    error = None
    if not is_distributed() or rank() == 0:
        try:
            counts, blocks = _solve(pruner, model, scores, pruned, outcome)
            figures = [outcome.met, outcome.goal, outcome.predicted, outcome.measured, outcome.dense, outcome.pruned]
            status[1:7] = torch.tensor([float(v) for v in figures], dtype=torch.float64)
            status[7] = PLANS.index(outcome.picked)
            status[8 : 8 + len(groups)] = torch.tensor([counts[g] for g in range(len(groups))], dtype=torch.float64)
            for position, index in enumerate(blocks, start=1):
                status[8 + len(groups) + index] = position
        except Exception as exc:  # the other processes wait on the broadcast: tell them, then raise
            error, status[0] = exc, 1.0
    broadcast_([status])
    if error is not None:
        raise error
    if status[0] > 0:
        raise IncompatibleError("prune.target: rank 0 refused the target or failed choosing widths (see its log)")
    met, outcome.goal, outcome.predicted, outcome.measured, outcome.dense, outcome.pruned = status[1:7].tolist()
    outcome.met, outcome.picked = bool(met), PLANS[int(status[7])]
    chosen = [int(v) for v in status[8 : 8 + len(groups)].tolist()]
    outcome.widths = {g.root: [g.size, g.size - c] for g, c in zip(groups, chosen)}
    positions = status[8 + len(groups) :].tolist()
    blocks = sorted((i for i, p in enumerate(positions) if p > 0), key=lambda i: positions[i])
    outcome.layers = [pruner.depth.blocks[i].name for i in blocks]
    return chosen, blocks, outcome


def _group_kinds(pruner: Pruner) -> list:
    """The kind (channels or heads) of every group, in the solver's group order."""
    return [pruner.channels] * len(pruner.channels.groups) + [pruner.heads] * len(pruner.heads.groups)


def _solve(
    pruner: Pruner, model: nn.Module, scores: list, pruned: list, outcome: TargetOutcome
) -> tuple[dict[int, int], list[int]]:
    cfg, target = pruner.config, pruner.config.target
    groups = pruner.channels.groups + pruner.heads.groups
    kinds = _group_kinds(pruner)
    inputs = with_tokens(rebatched(pruner._inputs(model), target.batch), target.tokens)
    kind = "latency" if target.timed else target.kind
    was_training = model.training
    recorder = pruner.data.recorder if pruner.data is not None else None
    recording = recorder is not None and recorder.active
    if recording:
        recorder.active = False  # the forwards below are no training data
    model.eval()
    try:
        with pruner.controller.suspended(), torch_threads(target.threads if target.timed else None):
            # counting is free: counted targets see finer steps than timed ones (each width timed)
            per_group = target.widths if target.timed else max(target.widths, _COUNTED_WIDTHS)
            cands = [
                candidates(g, int(p.sum()), k.round_to, cfg.max_layer_ratio, per_group)
                for g, p, k in zip(groups, pruned, kinds)
            ]
            samples = pruner.data.samples if pruner.data is not None else []
            options = _depth_options(pruner, model, samples)  # before any copy: they would carry the gates
            int8 = Int8Copies(pruner, samples) if target.int8 else None
            measure = _Measure(pruner, model, inputs, kind, scores, pruned, int8)
            if kind == "latency":
                _check_page_faults(measure, outcome)
            table = None
            if kind == "latency":
                table = LatencyTable(machine_key(torch.get_num_threads(), target.batch), target.cache)
            layers = layers_of(model, groups, inputs, pruner.transposed)
            if not options:
                return _solve_widths(pruner, model, measure, cands, layers, table, samples, outcome), []
            return _solve_depth(pruner, model, measure, cands, layers, table, samples, options, outcome)
    finally:
        model.train(was_training)
        if recording:
            recorder.active = True


_FAULTS_WARN_MB = 100  # page faults per dense forward worth a warning, in MB of pages


def _many_faults(faults: float | None) -> bool:
    return faults is not None and faults * page_bytes() > _FAULTS_WARN_MB * 2**20


def _check_page_faults(measure: _Measure, outcome: TargetOutcome) -> None:
    """Count the dense model's page faults per forward at the timed batch; warn where they are
    many and the allocator was left as it is: those timings partly measure glibc handing the
    activations back and forth, and vary with what the process freed before (slimkit/malloc.py)."""
    with torch.inference_mode():
        # the dense copy was just timed (_Measure warms it up and runs it 5+ rounds): no warm-up
        outcome.page_faults = faults_per_call(lambda: call_model(measure.dense_copy, measure.inputs), calls=2, warmup=0)
    outcome.steady_malloc = is_steady()
    if _many_faults(outcome.page_faults) and not outcome.steady_malloc:
        logger.warning(
            "prune.target: the dense model takes %d minor page faults (%d MB) per forward at batch %d: the "
            "allocator maps its large activations anew on every call, so the timings include that and can vary "
            "with what the process freed before. Call slimkit.steady_malloc() "
            "before slimkit.prepare, or start Python with MALLOC_MMAP_THRESHOLD_=1073741824 "
            "MALLOC_TRIM_THRESHOLD_=2147483648 (or jemalloc / tcmalloc preloaded), and serve the model the same way",
            outcome.page_faults, outcome.page_faults * page_bytes() / 2**20, outcome.batch,
        )  # fmt: skip


def _solve_widths(pruner: Pruner, model, measure: _Measure, cands, layers, table, samples, outcome) -> dict[int, int]:
    """The widths for the target, with ``measure.blocks`` removed (none: the plain solve)."""
    target = pruner.config.target
    errors, local = _error_curves(pruner, model, measure, measure.scores, measure.pruned, cands, outcome)
    cost = CostModel(measure.kind, layers, measure.base, table)
    cost.prime(cands)
    if table is not None:
        table.save()
        outcome.layers_measured, outcome.layers_cached = table.measured, table.reused
    counts = _rounds(target, cost, cands, errors, measure, outcome, pruner)
    if target.compare and local is not None and samples:
        counts = _compare(pruner, model, measure, cost, cands, local, counts, samples, outcome)
    return counts


def _depth_options(pruner: Pruner, model: nn.Module, samples: list) -> list[tuple[list[int], float]]:
    """``prune.layers`` with a target: for 1 to ``layers`` blocks, the blocks whose removal costs
    the output least on the calibration batches, and that cost; [] without depth pruning."""
    depth = pruner.depth
    if depth is None:
        return []
    if not samples:
        raise IncompatibleError(
            "prune.layers with prune.target ranks blocks on calibration batches and weighs each choice on "
            "them, and none were given: call slimkit.calibrate(model, batches) after prepare (with a "
            "schedule starting at step 0), or drop prune.layers"
        )
    candidates = [i for i, r in enumerate(depth.state.removed.tolist()) if not r]
    with alone():  # rank 0 decides alone: no collective the other processes would have to join
        return removal_sets(model, depth.hooks, candidates, depth.most, samples[:_DEPTH_SAMPLES], call_model)


def _solve_depth(
    pruner: Pruner, model, measure: _Measure, cands, layers, table, samples, options, outcome: TargetOutcome
) -> tuple[dict[int, int], list[int]]:
    """Solve the widths once per depth option (0 blocks first) and keep the best plan: the
    highest output cosine on the calibration batches among those within tolerance, else the
    closest to the goal. Updates ``outcome`` with the chosen option's figures."""
    groups = pruner.channels.groups + pruner.heads.groups
    depth = pruner.depth
    tried = []  # (miss, -cosine, counts, blocks, sub-outcome)
    refusals = []
    for order, depth_cost in [([], 0.0), *options]:
        blocks = [depth.blocks[i] for i in order]
        names = [b.name for b in blocks]
        sub = TargetOutcome(outcome.kind, outcome.asked, outcome.batch, outcome.threads, outcome.tokens)
        sub.int8, sub.layers = outcome.int8, names
        measure.remove_blocks(blocks)
        # a group whose layers all go with the blocks is not pruned; nor are removed layers costed
        inside = {g for g, group in enumerate(groups) if all(matches_any(m.module, names) for m in group.members)}
        options_d = [[c[0]] if g in inside else c for g, c in enumerate(cands)]
        layers_d = [layer for layer in layers if not matches_any(layer.name, names)]
        entry: dict[str, Any] = {"layers": names, "depth_cost": round(depth_cost, 6)}
        try:
            counts = _solve_widths(pruner, model, measure, options_d, layers_d, table, samples, sub)
        except IncompatibleError as exc:
            refusals.append((getattr(exc, "reached", 0.0), exc))
            outcome.depth.append({**entry, "refused": str(exc)})
            logger.info("prune.target: with %d block(s) removed: refused (%s)", len(blocks), exc)
            continue
        cosine = _picked_cosine(sub)
        if cosine is None:
            cosine = rank_value(_score_plans(pruner, measure, model, [counts], samples)[0])
        entry.update(measured=round(float(sub.measured or 0.0), 4), met=sub.met, cosine=round(cosine, 6))
        entry["widths"] = {g.root: [g.size, g.size - counts[i]] for i, g in enumerate(groups) if counts[i]}
        outcome.depth.append(entry)
        logger.info("prune.target: with %d block(s) removed: %s", len(blocks), entry)
        miss = abs((sub.measured or 0.0) / sub.goal - 1.0) if sub.goal else 1.0
        tried.append((0.0 if sub.met else miss, -cosine, counts, order, sub))
    if not tried:
        reached, exc = max(refusals, key=lambda r: r[0])
        raise exc
    _, _, counts, order, best = min(tried, key=lambda t: (t[0], t[1]))
    for name in (
        "goal", "predicted", "measured", "dense", "pruned", "met", "rounds", "output_reach",
        "picked", "compared", "layers_measured", "layers_cached", "int8_dense", "layers",
    ):  # fmt: skip
        setattr(outcome, name, getattr(best, name))
    return counts, order


def _picked_cosine(outcome: TargetOutcome) -> float | None:
    """What ``compare`` ranked the plan it kept by (None: compare did not run)."""
    entry = outcome.compared.get(outcome.picked)
    while entry is not None and "same_as" in entry:
        entry = outcome.compared.get(entry["same_as"])
    return None if entry is None else rank_value(entry)


def _pruned_outputs(measure: _Measure, net: nn.Module, recount: list, batches: list, refitting: bool) -> list:
    if refitting:  # rank 0 alone: the statistics are not reduced across processes here
        recalibrate_batchnorms(net, recount, call_on_batch, reduce=False)
    return measure.outputs(net, batches)


def _score_plans(pruner: Pruner, measure: _Measure, model: nn.Module, plans: list, samples: list) -> list[dict]:
    """Output cosine to the dense model (:meth:`_Measure.dense_outputs`) of copies pruned to
    ``plans`` the way the point prunes them (consumers refit, units removed, BatchNorm statistics
    recounted), one dict per plan.

    ``cosine``: the copy the point builds, on the calibration ``samples`` its refit and recount
    have seen. ``held_out`` (with a refit and at least two sample batches): cross-fitted on two
    folds of the samples: each fold scored on a copy refit without that fold's rows (the
    recorded statistics are sums: :meth:`PointData.holding_out`) and recounted on the other
    fold. A refit that fits the calibration rows rather than the data they stand for shows
    there: on a timm resnet calibrated on 3 batches of 4 noise images, the kept plan scored 0.895
    on them, 0.72 cross-fitted, and the converted model 0.63 on new images."""
    refitting = pruner.config.reconstruct and pruner.data is not None
    reference = measure.dense_outputs(samples)
    with torch.no_grad():
        scores = []
        for plan in plans:
            net = measure.probe(plan, refit=refitting)
            cosine = mean_cosine(_pruned_outputs(measure, net, samples, samples, refitting), reference)
            scores.append({"cosine": cosine})
            del net
        if not refitting or len(samples) < _FOLDS:
            return scores
        outputs: list[list] = [[] for _ in plans]
        references: list = []
        for fold in range(_FOLDS):  # fold outermost: one fold's statistics held at a time
            scored = samples[fold::_FOLDS]
            rest = [b for i, b in enumerate(samples) if i % _FOLDS != fold]
            references += [r for i, r in enumerate(reference) if i % _FOLDS == fold]
            with pruner.data.holding_out(pruner.data.record(model, scored, call_on_batch)):
                for p, plan in enumerate(plans):
                    outputs[p] += _pruned_outputs(measure, measure.probe(plan, refit=True), rest, scored, True)
        for entry, out in zip(scores, outputs):
            entry["held_out"] = mean_cosine(out, references)
    return scores


def _compare(pruner: Pruner, model, measure: _Measure, cost, cands, local, counts, samples, outcome) -> dict[int, int]:
    """``prune.target.compare`` (see :mod:`.target_compare`): the solver's plan against uniform
    widths and the unweighted curves' plan at its predicted cost; updates ``outcome``."""
    groups = pruner.channels.groups + pruner.heads.groups
    kinds = _group_kinds(pruner)

    def snap(g: int, count: int) -> int:  # as `channels: f` rounds it, within the group's candidates
        return min(max(removable(groups[g], count, kinds[g].round_to), cands[g][0]), cands[g][-1])

    budget = cost.total(counts)
    plans = {
        "solver": counts,
        "uniform": uniform_plan([g.size for g in groups], cands, cost, budget),
        "fraction": uniform_plan([g.size for g in groups], cands, cost, budget, snap),
        "local": greedy(cands, local, cost, budget),
    }
    distinct = list({plan_key(p): p for p in plans.values()}.values())
    scored = dict(zip(map(plan_key, distinct), _score_plans(pruner, measure, model, distinct, samples)))
    measured: dict[int, tuple[float, float]] = {}  # id(plan) -> (reduction, pruned value)

    def reduction(plan: dict[int, int]) -> float:
        measured[id(plan)] = measure.reduction(plan)
        return measured[id(plan)][0]

    solver_miss = abs(outcome.measured / outcome.goal - 1.0)
    quality = lambda plan: scored[plan_key(plan)]  # noqa: E731
    name, outcome.compared = pick(plans, quality, reduction, outcome.goal, pruner.config.target.tolerance, solver_miss)
    outcome.picked = name
    logger.info("prune.target.compare: kept the %s plan (%s)", name, outcome.compared)
    if name != "solver":
        chosen = plans[name]
        dense_pred = cost.total({g: c[0] for g, c in enumerate(cands)})
        outcome.predicted = dense_pred / max(cost.total(chosen), 1e-12) * measure.factor
        outcome.measured, outcome.pruned = measured[id(chosen)]
        outcome.met = abs(outcome.measured / outcome.goal - 1.0) <= pruner.config.target.tolerance
        return chosen
    return counts


def _unreachable(pruner: Pruner, target: TargetConfig, reached: float, measure: _Measure) -> IncompatibleError:
    """The refusal of a target every group at its smallest width misses; ``reached`` attached."""
    cfg = pruner.config
    blocks = f", {len(measure.blocks)} block(s) removed" if measure.blocks else ""
    more = " or prune.layers (let whole blocks go too)" if pruner.depth is None else ""
    exc = IncompatibleError(
        f"prune.target.{target.kind} {target.value:g} cannot be met: the best reachable is about "
        f"{_figure(target.kind, reached, measure.dense)}{' as INT8' if measure.int8 is not None else ''} "
        f"(every prunable layer at its smallest width{blocks}: "
        f"prune.max_layer_ratio {cfg.max_layer_ratio}, round_to {pruner.channels.round_to}"
        + (
            f", batch {target.batch}{f' x {target.tokens} tokens' if target.tokens else ''}, "
            f"{torch.get_num_threads()} threads"
            if target.timed
            else ""
        )
        + f"). Ask for less, or raise prune.max_layer_ratio{more}"
    )
    exc.reached = reached
    return exc


def _rounds(target, cost, cands, errors, measure: _Measure, outcome: TargetOutcome, pruner: Pruner) -> dict[int, int]:
    dense_pred = cost.total({g: c[0] for g, c in enumerate(cands)})
    goal = target.value if target.kind == "speedup" else 0.0
    if target.kind == "latency_ms":
        goal = measure.dense / target.value
    elif target.kind in ("macs", "params"):
        goal = 1.0 / target.value
    outcome.goal, outcome.dense = goal, measure.dense
    most = {g: c[-1] for g, c in enumerate(cands)}
    reached = None
    if measure.kind == "latency":  # the smallest model, timed: the best reachable, and the fixed overhead
        reached, _ = measure.reduction(most, int8=False)
        cost.calibrate(most, measure.dense / reached)  # the cost model is float: calibrated in float
        dense_pred = cost.total({g: c[0] for g, c in enumerate(cands)})
        if measure.int8 is not None:
            reached, _ = measure.reduction(most)
            outcome.int8_dense = measure.factor
    best_pred = dense_pred / max(cost.total(most), 1e-12)
    if reached is not None:  # timed: the smallest copy's measured figure bounds what can be aimed at
        # (layers timed alone on a busy machine once predicted the smallest widths slower than the
        # dense model, and the correction then aimed below 1x)
        best_pred = max(best_pred, reached / measure.factor)
    # int8: the float prediction says little about INT8 (per-op overhead weighs more there); the
    # smallest INT8 copy was timed, so it decides. best_pred is in units of the base model
    if best_pred * measure.factor < goal or measure.int8 is not None:
        if reached is None:
            reached, _ = measure.reduction(most)
        if reached < goal * (1.0 - target.tolerance):
            raise _unreachable(pruner, target, reached, measure)
    # the solver aims in units of the base model (measured / factor): the dense INT8 model with
    # int8 (see .target_int8), the model without the blocks of a depth option
    aim = goal / measure.factor
    history: list[tuple[float, dict[int, int], float, float, float, float]] = []
    counts = greedy(cands, errors, cost, dense_pred / aim)
    for r in range(max(target.rounds, 1)):
        predicted = dense_pred / max(cost.total(counts), 1e-12)
        reached, value = measure.reduction(counts)
        miss = abs(reached / goal - 1.0)
        history.append((miss, counts, predicted, reached, value, measure.factor))
        outcome.rounds.append({"aim": aim, "predicted": predicted, "measured": reached})
        if measure.int8 is not None:
            outcome.rounds[-1]["int8_dense"] = measure.factor
        logger.info(
            "prune.target round %d: aimed at %.3g, predicted %.3g, measured %.3g (goal %.3g)",
            r + 1, aim, predicted, reached, goal,
        )  # fmt: skip
        # aim at the middle of the band: at batch 1 a second timing of the same widths can differ
        # by 10-15%, so a copy measured near the band's edge is solved again (the closest is kept)
        if miss <= target.tolerance / 2 or r + 1 >= target.rounds:
            break
        aim = next_aim([(h[2], h[3] / h[5]) for h in history], goal / measure.factor, best_pred)
        new = greedy(cands, errors, cost, dense_pred / aim)
        if new == counts:
            break
        counts = new
    miss, counts, predicted, reached, value, factor = min(history, key=lambda h: h[0])
    outcome.predicted, outcome.measured, outcome.pruned = predicted * factor, reached, value
    outcome.met = miss <= target.tolerance
    if not outcome.met:
        logger.warning("prune.target: %s", outcome.describe())
    return counts
