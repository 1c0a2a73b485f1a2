"""Depth pruning (``prune.layers``): rank whole blocks by their influence on data, skip the
least influential while training, remove them at ``convert``.

Two rankings, both measured on data, never on weights:

* ``output_cosine`` (default): on calibration batches, the drop of the model output's cosine
  to its unpruned output when blocks are skipped, ``1 - cos(out_without_blocks, out)`` averaged
  over tokens (padding left out) or samples. The set of blocks that costs least is chosen:
  every set when there are few (``EXHAUSTIVE_SETS``), else greedily, one block at a time. It
  needs the batches given to ``slimkit.calibrate``.
* ``block_influence`` (ShortGPT, Men et al. 2024): ``BI = 1 - cos(block input, block output)``
  averaged over tokens, measured by forward hooks on calibration batches and on every training
  forward since the last pruning point; the blocks with the lowest BI go.

Blocks already removed stay removed. Under DDP the statistics are summed over processes and the
decision is broadcast from rank 0, so every process removes the same blocks.
``rank_blocks`` is the same ranking as a plain function (used by ``scripts/make_student.py``
and the benchmarks).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelAdapter, batch_inputs, call_model, get_adapter
from ..distributed import all_reduce_
from ..errors import ConfigError, SlimkitError, UnsupportedModelError
from ..recipe import PruneConfig
from .blocks import Block, block_module, check_removal, find_blocks, hidden_input, hidden_output, skipped
from .schedule import due_point, pruning_points, target_at_point

logger = logging.getLogger("slimkit")


def _first_output(outputs: Any) -> torch.Tensor:
    """The tensor the output cosine is taken on: ``last_hidden_state`` / logits / a tensor."""
    for key in ("last_hidden_state", "logits"):
        value = getattr(outputs, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    if isinstance(outputs, dict):
        return next(v for v in outputs.values() if isinstance(v, torch.Tensor))
    raise SlimkitError(f"prune.layers: cannot find a tensor in the model's outputs ({type(outputs).__name__})")


def _distance(a: torch.Tensor, b: torch.Tensor, dim: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sum over positions of ``1 - cos(a, b)`` along ``dim`` (valid positions only), and their count."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=dim, eps=1e-8)
    if mask is not None and tuple(mask.shape) == tuple(cos.shape):
        valid = mask != 0
        return (1.0 - cos[valid]).double().sum(), int(valid.sum())
    return (1.0 - cos).double().sum(), cos.numel()


def _mask_of(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class BlockHooks:
    """Forward hooks on the candidate blocks: skip the removed ones, measure the others (BI)."""

    def __init__(self, model: nn.Module, blocks: list[Block]) -> None:
        self.blocks = blocks
        self.gated: set[int] = set()
        self.measure = False  # collect BI on training forwards
        self.calibrating = False  # collect BI on calibration forwards
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.sums = torch.zeros(len(blocks), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(blocks), dtype=torch.float64, device=device)
        self._mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        self.handles += [model.register_forward_hook(self._clear_mask)]
        for i, block in enumerate(blocks):
            self.handles.append(block_module(model, block).register_forward_hook(self._hook(i), with_kwargs=True))

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._mask = _mask_of(kwargs)

    def _clear_mask(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._mask = None

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            x = hidden_input(args, kwargs)
            if i in self.gated:
                return skipped(output, x)
            if self.calibrating or (self.measure and module.training and torch.is_grad_enabled()):
                if self.sums.device != x.device:  # the model moved after prepare (Trainer, .to())
                    self.sums, self.counts = self.sums.to(x.device), self.counts.to(x.device)
                with torch.no_grad():
                    total, count = _distance(x, hidden_output(output), self.blocks[i].channel_dim, self._mask)
                    self.sums[i] += total
                    self.counts[i] += count
            return None

        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums and counts since the last call (summed over processes), then zeroed."""
        sums, counts = all_reduce_(self.sums.clone()), all_reduce_(self.counts.clone())
        self.sums.zero_()
        self.counts.zero_()
        return sums, counts

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _forward_batches(model: nn.Module, batches: list, forward: Callable) -> list[tuple[torch.Tensor, Any]]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for batch in batches:
        inputs = batch_inputs(batch, device, role="prune.layers")
        out.append((_first_output(forward(model, inputs)).detach(), inputs))
    return out


EXHAUSTIVE_SETS = 64  # up to this many candidate sets of blocks, every set is scored; greedy beyond


def _set_cost(model: nn.Module, hooks: BlockHooks, batches: list, forward: Callable) -> Callable[[tuple], float]:
    """``cost(blocks)``: the output's mean ``1 - cos`` to its present value on ``batches`` when
    ``blocks`` are skipped as well as those already gated (summed over processes: every process
    scores the same sets in the same order)."""
    base = set(hooks.gated)
    references = _forward_batches(model, batches, forward)

    def cost(chosen: tuple[int, ...]) -> float:
        hooks.gated = base | set(chosen)
        try:
            total = torch.zeros(2, dtype=torch.float64)
            for reference, inputs in references:
                out = _first_output(forward(model, inputs))
                value, n = _distance(out, reference, 1 if out.dim() == 4 else -1, _mask_of(inputs))
                total += torch.tensor([float(value), float(n)], dtype=torch.float64)
            total = all_reduce_(total)
            return float(total[0] / total[1].clamp_min(1))
        finally:
            hooks.gated = base

    return cost


def _cheapest_set(cost: Callable[[tuple], float], candidates: list[int], count: int, alone: dict[int, float]):
    """The ``count`` candidates whose skipping together costs least: every set when there are at
    most ``EXHAUSTIVE_SETS``, else greedily (each next block the cheapest with those chosen)."""
    if count == 1:
        return [min(candidates, key=alone.get)]
    if math.comb(len(candidates), count) <= EXHAUSTIVE_SETS:
        return list(min(itertools.combinations(candidates, count), key=cost))
    chosen = [min(candidates, key=alone.get)]
    while len(chosen) < count:
        left = [c for c in candidates if c not in chosen]
        chosen.append(min(left, key=lambda c: cost((*chosen, c))))
    return chosen


@torch.no_grad()
def choose_output_cosine(
    model: nn.Module, hooks: BlockHooks, candidates: list[int], count: int, batches: list, forward: Callable
) -> tuple[list[int], dict[int, float]]:
    """The ``count`` blocks whose skipping together moves the output least on ``batches``.

    When there are at most ``EXHAUSTIVE_SETS`` sets of ``count`` candidates, every set is scored
    (MiniLM: 15 pairs of its 6 layers); beyond, blocks are chosen greedily, each next one the
    cheapest to skip together with those chosen so far. Returns the blocks (cheapest alone
    first) and each candidate's cost when skipped alone."""
    cost = _set_cost(model, hooks, batches, forward)
    alone = {c: cost((c,)) for c in candidates}
    return sorted(_cheapest_set(cost, candidates, count, alone), key=alone.get), alone


@torch.no_grad()
def removal_sets(
    model: nn.Module, hooks: BlockHooks, candidates: list[int], most: int, batches: list, forward: Callable
) -> list[tuple[list[int], float]]:
    """For 1 to ``most`` blocks, the set :func:`choose_output_cosine` would remove and what
    removing it costs (the output's ``1 - cos``): the depth options ``prune.target`` weighs."""
    cost = _set_cost(model, hooks, batches, forward)
    alone = {c: cost((c,)) for c in candidates}
    options = []
    for count in range(1, min(most, len(candidates) - 1) + 1):
        chosen = sorted(_cheapest_set(cost, candidates, count, alone), key=alone.get)
        options.append((chosen, alone[chosen[0]] if count == 1 else cost(tuple(chosen))))
    return options


class DepthState(nn.Module):
    """The checkpointed depth-pruning state (a child of the pruning state)."""

    def __init__(self, n: int, device: torch.device, planned: bool = False) -> None:
        super().__init__()
        self.register_buffer("removed", torch.zeros(n, dtype=torch.bool, device=device))
        if planned:  # prune.target: the blocks its solver chose, 1, 2, ... in removal order (0: kept)
            self.register_buffer("planned", torch.zeros(n, dtype=torch.long, device=device))
        self.register_buffer("influence", torch.zeros(n, dtype=torch.float64, device=device))
        self.register_buffer("positions", torch.zeros(n, dtype=torch.float64, device=device))
        self.register_buffer("last_point", torch.tensor(-1, dtype=torch.long, device=device))

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the depth pruning state is not callable")


def final_count(layers: float, n: int, model_name: str) -> int:
    """Blocks to remove in the end: ``layers`` itself when >= 1, else that fraction of ``n`` (rounded down)."""
    count = int(layers) if layers >= 1 else math.floor(layers * n + 1e-9)
    if count < 1:
        raise ConfigError(
            f"prune.layers: {layers} of the {n} removable blocks of {model_name} rounds down to 0 blocks; "
            f"ask for at least {1 / n:.3g} (or a count such as 1)"
        )
    if count >= n:
        raise ConfigError(
            f"prune.layers: {model_name} has {n} removable blocks; removing {count} would leave none of them. "
            f"Use at most {n - 1}."
        )
    return count


class DepthPruning:
    """``prune.layers`` for one prepared model: the blocks, their hooks, state and decisions."""

    def __init__(self, model: nn.Module, config: PruneConfig, adapter: ModelAdapter, blocks: list[Block], stacks):
        self.config = config
        self.adapter = adapter
        self.blocks, self.stacks = blocks, stacks
        self.most = final_count(config.layers, len(blocks), type(model).__name__)
        # with a target the solver chooses how many (0 to `most`) and which: see plan()
        self.targeted = config.target is not None
        self.count = 0 if self.targeted else self.most
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.state = DepthState(len(blocks), device, planned=self.targeted)
        self.state.register_load_state_dict_post_hook(lambda module, keys: self.refresh())
        self.hooks = BlockHooks(model, blocks)
        self.hooks.measure = True
        self.batches: list = []  # the calibration batches (output_cosine ranks on them)
        self._warned = False

    # -- decisions ---------------------------------------------------------------------------
    def plan(self, order: list[int]) -> None:
        """``prune.target``: remove these blocks (indices, in this order) over the schedule."""
        planned = torch.zeros_like(self.state.planned)
        for position, index in enumerate(order, start=1):
            planned[index] = position
        self.state.planned.copy_(planned)
        self.count = len(order)

    def planned_order(self) -> list[int]:
        """The blocks the target's solver chose, in removal order (empty without a target)."""
        if not self.targeted:
            return []
        positions = self.state.planned.tolist()
        return sorted((i for i, p in enumerate(positions) if p > 0), key=lambda i: positions[i])

    def refresh(self) -> None:
        """Gate exactly the blocks the state says are removed (after a checkpoint is loaded)."""
        if self.targeted:
            self.count = len(self.planned_order())
        self.hooks.gated = {i for i, r in enumerate(self.state.removed.tolist()) if r}
        if int(self.state.last_point) >= pruning_points(self.config.schedule)[-1]:
            self.hooks.measure = False

    def target(self, point: int) -> int:
        fraction = target_at_point(self.config.schedule, self.count / len(self.blocks), point)
        return min(self.count, math.floor(fraction * len(self.blocks) + 1e-9))

    def fold(self) -> None:
        """Move the hooks' pending BI sums into the checkpointed state (summed over processes)."""
        sums, counts = self.hooks.take()
        self.state.influence += sums.to(self.state.influence.device)
        self.state.positions += counts.to(self.state.positions.device)

    def advance(self, model: nn.Module, step: int, forward: Callable = call_model) -> list[torch.Tensor]:
        """Remove more blocks if a pruning point is due and there is data to rank them; returns
        the state tensors that changed (for the broadcast from rank 0)."""
        point = due_point(self.config.schedule, step, int(self.state.last_point))
        if point is None:
            return []
        removed = self.state.removed
        new = self.target(point) - int(removed.sum())
        if new > 0:
            chosen = self._choose(model, new, forward)
            if chosen is None:
                return []  # no data seen yet: decide at the next step (or at calibrate)
            removed[torch.tensor(chosen, dtype=torch.long)] = True
            logger.info("prune.layers: removing %s at step %d", [self.blocks[i].name for i in chosen], point)
        self.state.influence.zero_()
        self.state.positions.zero_()
        self.state.last_point.fill_(point)
        self.refresh()
        return [removed]

    def _choose(self, model: nn.Module, new: int, forward: Callable) -> list[int] | None:
        candidates = [i for i, r in enumerate(self.state.removed.tolist()) if not r]
        if self.targeted:  # the solver's choice, ranked when it chose (prune.target)
            return [i for i in self.planned_order() if i in candidates][:new]
        seen = bool((self.state.positions[candidates] > 0).all())
        if self.config.layer_importance == "output_cosine" and self.batches:
            return self._with_model_state(
                model, lambda: choose_output_cosine(model, self.hooks, candidates, new, self.batches, forward)[0]
            )
        if not seen:
            return None  # wait for data: slimkit.calibrate, or the next training step's batches
        if self.config.layer_importance == "output_cosine" and not self._warned:
            logger.warning(
                "prune.layers: output_cosine ranks blocks on calibration batches and none were given "
                "(slimkit.calibrate(model, batches)); ranking by block_influence on the training batches seen"
            )
            self._warned = True
        influence = (self.state.influence / self.state.positions.clamp_min(1)).tolist()
        return sorted(candidates, key=lambda i: influence[i])[:new]

    def _with_model_state(self, model: nn.Module, fn: Callable) -> Any:
        was_training = model.training
        model.eval()
        try:
            return fn()
        finally:
            model.train(was_training)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: list, forward: Callable = call_model) -> None:
        """Measure BI on ``batches`` and keep them for ``output_cosine``."""
        self.batches = list(batches)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.hooks.calibrating = True
        try:
            self._with_model_state(
                model, lambda: [forward(model, batch_inputs(b, device, role="calibrate")) for b in self.batches]
            )
        finally:
            self.hooks.calibrating = False
        self.fold()

    # -- reporting / convert -----------------------------------------------------------------
    def removed_blocks(self) -> list[Block]:
        return [b for b, r in zip(self.blocks, self.state.removed.tolist()) if r]

    def log_values(self) -> dict[str, float]:
        return {"prune/layers": float(self.state.removed.float().mean())}

    def remove(self) -> None:
        self.hooks.remove()


def setup_depth(model: nn.Module, config: PruneConfig, adapter: ModelAdapter, inputs: Any, memo: dict) -> DepthPruning:
    """``prune.layers`` at prepare: the removable blocks (``exclude`` names blocks to keep),
    checked on copies of the model (skipping a block == removing it) when ``verify``, hooked."""
    from .graph import output_tensors
    from .verify import compare_outputs

    def excluded(name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in config.exclude)

    blocks, stacks = find_blocks(model, adapter, inputs, call_model, excluded)
    if blocks and config.verify:
        check_removal(
            model, blocks, stacks, adapter, inputs, call_model, memo, compare=compare_outputs, outputs=output_tensors
        )
    if len(blocks) < 2:
        raise UnsupportedModelError(
            f"prune.layers: {type(model).__name__} has {len(blocks)} removable block(s) "
            f"({[b.name for b in blocks]}); depth pruning needs at least 2 (one always stays). Set prune.layers: 0."
        )
    return DepthPruning(model, config, adapter, blocks, stacks)


def rank_blocks(
    model: nn.Module,
    batches: list,
    count: int,
    importance: str = "output_cosine",
    forward: Callable = call_model,
) -> list[str]:
    """The ``count`` blocks of ``model`` to remove first, by ``importance`` measured on ``batches``
    (the ranking ``prune.layers`` uses), as module names; the model is left unchanged."""
    return _rank(model, batches, count, importance, forward)[0]


def block_scores(
    model: nn.Module, batches: list, importance: str = "output_cosine", forward: Callable = call_model
) -> dict[str, float]:
    """Every removable block's cost on ``batches``: the output's ``1 - cos`` when it alone is
    skipped (``output_cosine``), or its block influence (``block_influence``); low = removable."""
    return _rank(model, batches, 1, importance, forward, check_count=False)[1]


def _rank(
    model: nn.Module, batches: list, count: int, importance: str, forward: Callable, check_count: bool = True
) -> tuple[list[str], dict[str, float]]:
    if not batches:
        raise SlimkitError("rank_blocks: give at least one batch of data to rank the blocks on")
    adapter = get_adapter(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = batch_inputs(batches[0], device, role="rank_blocks")
    blocks, _ = find_blocks(model, adapter, example, forward, lambda name: False)
    if check_count:
        final_count(count, len(blocks), type(model).__name__)
    hooks = BlockHooks(model, blocks)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if importance == "output_cosine":
                chosen, first = choose_output_cosine(model, hooks, list(range(len(blocks))), count, batches, forward)
                scores = [first[i] for i in range(len(blocks))]
            elif importance == "block_influence":
                hooks.calibrating = True
                for batch in batches:
                    forward(model, batch_inputs(batch, device, role="rank_blocks"))
                scores = (hooks.sums / hooks.counts.clamp_min(1)).tolist()
                chosen = sorted(range(len(blocks)), key=lambda i: scores[i])[:count]
            else:
                raise ConfigError(
                    f"rank_blocks: importance must be 'output_cosine' or 'block_influence', got {importance!r}"
                )
    finally:
        hooks.remove()
        model.train(was_training)
    return [blocks[i].name for i in chosen], {b.name: float(v) for b, v in zip(blocks, scores)}
