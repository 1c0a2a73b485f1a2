"""Data-aware pruning points: calibration, reconstruction, allocation by sensitivity.

:func:`calibrate_point` is what ``slimkit.calibrate`` does for a pruning point that waits for
data (one-shot at step 0): in eval mode, it records the inputs of every layer that reads pruned
units (and, for ``taylor`` / ``fisher``, backpropagates the loss of each batch), ranks and
selects the units, reconstructs, and recomputes BatchNorm statistics.

Reconstruction is independent or sequential:

* independent (:func:`reconstruct_point`, also used at every point of a gradual schedule during
  training): every consumer is refit on the inputs recorded before the point, towards its own
  output on them;
* sequential (``prune.sequential``, calibration only): consumers are refit one by one in the
  order the forward pass reaches them; each sees the inputs of the model pruned (and refit) so
  far, and is fit towards the dense model's output (a copy kept for the duration), so it also
  absorbs the error of the layers before it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters import call_model, get_logits, get_loss
from ..batches import split_batch
from ..errors import IncompatibleError
from ..modules import get_module
from .allocation import sensitivity_counts
from .data_aware import Consumer
from .reconstruct import recalibrate_batchnorms, refit
from .statistics import _Stop, add_batch, columns_of, new_stats

if TYPE_CHECKING:
    from .pruner import Pruner
    from .state import UnitKind

logger = logging.getLogger("slimkit")

_TARGET_SAMPLES = 8  # calibration batches prune.target may run copies on (the per-group probes: 2)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _mask_of(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _call(model: nn.Module, inputs: Any) -> Any:
    return call_model(model, inputs)


def call_on_batch(model: nn.Module, batch: Any) -> Any:
    """The model on a calibration batch's inputs (labels left out)."""
    return _call(model, split_batch(batch, _device(model))[0])


def calibration_loss(pruner: Pruner, model: nn.Module, inputs: Any, labels: Any, outputs: Any) -> torch.Tensor:
    """The loss whose gradients rank units: the KD loss when a teacher is given (mixed with the
    task loss where there are labels), else the task loss."""
    controller = pruner.controller
    distiller = controller.methods.get("distill")
    task = get_loss(outputs)
    logits = get_logits(outputs)
    mask = _mask_of(inputs)
    if task is None and labels is not None and logits is not None:
        from ..distill.losses import task_cross_entropy

        causal = controller.adapter.task(model) == "causal_lm"
        total, count = task_cross_entropy(logits, labels, mask, causal)
        task = total / count.clamp_min(1)
    if distiller is not None:
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        distiller.after_forward(model, args, kwargs, outputs)
        loss, _ = distiller.mix(logits, task, labels, mask)
        return loss
    if task is None:
        raise IncompatibleError(
            f"prune.importance '{pruner.config.importance}' ranks units by gradients of a loss, but the "
            "calibration batches carry no labels and the recipe has no teacher: pass (inputs, targets) "
            "tuples or dicts with a 'labels' entry, add a distill section with a teacher, or use "
            "importance: activation (no labels needed)"
        )
    return task


def _gather(pruner: Pruner, model: nn.Module, batches: list) -> None:
    """One pass over the batches: record consumer inputs and/or backpropagate the loss."""
    data = pruner.data
    device = _device(model)
    recorder, gradients = data.recorder, data.gradients
    if recorder is not None:
        recorder.reset()
        recorder.active = True
    weights = [w for w in gradients.weights if w.requires_grad] if gradients is not None else []
    if gradients is not None and not weights:
        raise IncompatibleError(
            f"prune.importance '{pruner.config.importance}': the weights of the pruned layers do not require "
            "gradients; unfreeze them for calibration or use importance: activation"
        )
    try:
        for batch in batches:
            inputs, labels = split_batch(batch, device)
            if gradients is None:
                with torch.no_grad():
                    _call(model, inputs)
                continue
            if isinstance(inputs, dict) and labels is not None:
                inputs = {**inputs, "labels": labels}  # HF models compute their own task loss
            with torch.enable_grad():
                outputs = _call(model, inputs)
                loss = calibration_loss(pruner, model, inputs, labels, outputs)
                torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        if recorder is not None:
            recorder.active = False
    if recorder is not None:
        recorder.all_reduce()
    if gradients is not None:
        gradients.flush(pruner.state)


def calibrate_point(pruner: Pruner, model: nn.Module, batches: list, point: int) -> None:
    """Gather the statistics of ``point`` from calibration batches, prune, reconstruct."""
    cfg = pruner.config
    was_training = model.training
    model.eval()
    try:
        with pruner.controller.suspended():
            _gather(pruner, model, batches)
            pruner.data.calibrated = True
            pruner.data.samples = list(batches[:_TARGET_SAMPLES])
            sequential = cfg.reconstruct and cfg.sequential
            reference = _reference_copy(model, pruner) if sequential else None
            before = [p.clone() for p in pruner._pruned()]
            order = list(pruner.data.recorder.order) if pruner.data.recorder is not None else []
            calls = {n: s.calls // max(len(batches), 1) for n, s in pruner.data.stats().items()}
            pruner._point(model, point, reconstruct=cfg.reconstruct and not sequential)
            if reference is not None:
                pruner.apply_masks(model)
                after = pruner._pruned()
                refitted = _sequential(pruner, model, reference, batches, before, after, order, calls)
                pruner._broadcast_refit(refitted)
                del reference
            if cfg.reconstruct:
                pruner.apply_masks(model)
                recalibrate_batchnorms(model, batches, call_on_batch)
    finally:
        if pruner.data is not None:
            pruner.data.samples = []  # the user's batches are not kept past the call
        model.train(was_training)


def _reference_copy(model: nn.Module, pruner: Pruner) -> nn.Module:
    """The dense model as it is now, for the sequential targets (never trained, never saved)."""
    memo = {id(pruner.controller): pruner.controller}
    reference = copy.deepcopy(model, memo)
    reference.eval()
    return reference


def reconstruct_point(
    pruner: Pruner, before: list[torch.Tensor], after: list[torch.Tensor], into: nn.Module | None = None
) -> list[nn.Module]:
    """Independent refits of every consumer that lost columns; returns the refit modules.
    ``into``: a copy of the model whose same-named layers are refit instead (prune.target's
    plans), from the statistics recorded on the model."""
    data = pruner.data
    done = []
    for consumer in data.changed_consumers(before, after):
        if consumer.stats.gram is None or consumer.stats.count == 0:
            logger.info("prune.reconstruct: %s is left as is (no recorded inputs it can refit with)", consumer.name)
            continue
        module = consumer.module if into is None else get_module(into, consumer.name)
        error = refit(module, consumer.stats, data.removed_columns(consumer, after), pruner.config.damping)
        logger.debug("prune.reconstruct: %s refit, relative output error %.4g", consumer.name, error)
        done.append(module)
    return done


def _sequential(
    pruner: Pruner,
    model: nn.Module,
    reference: nn.Module,
    batches: list,
    before: list[torch.Tensor],
    after: list[torch.Tensor],
    order: list[str],
    calls: dict[str, int],
) -> list[nn.Module]:
    data = pruner.data
    changed = {c.name: c for c in data.changed_consumers(before, after)}
    names = [n for n in order if n in changed] + [n for n in changed if n not in order]
    done = []
    for name in names:
        consumer = changed[name]
        if consumer.stats.layout != "conv2d" and consumer.stats.layout not in ("linear", "transposed"):
            logger.info("prune.reconstruct: %s is left as is (slimkit cannot unfold its inputs)", name)
            continue
        twin = get_module(reference, name)
        stats = _paired_stats(consumer, twin, model, reference, batches, calls.get(name, 0))
        if stats.count == 0:
            continue
        refit(consumer.module, stats, data.removed_columns(consumer, after), pruner.config.damping, source=twin)
        done.append(consumer.module)
    return done


def _paired_stats(
    consumer: Consumer, twin: nn.Module, model: nn.Module, reference: nn.Module, batches: list, calls: int
):
    """Gram and cross statistics of one consumer: its inputs in the pruned model, paired call by
    call with its inputs in the dense reference; both forwards stop once it has been reached."""
    from .statistics import all_reduce_sum

    stats = new_stats(consumer.module, consumer.stats.layout)
    pending: list[torch.Tensor] = []
    seen = [0]
    mask: list[torch.Tensor | None] = [None]

    def reference_hook(module: nn.Module, args: tuple) -> None:
        pending.append(args[0].detach())
        if calls and len(pending) >= calls:
            raise _Stop

    def live_hook(module: nn.Module, args: tuple) -> None:
        if seen[0] < len(pending):
            add_batch(module, stats, args[0], mask[0], gram=True, reference=pending[seen[0]])
        seen[0] += 1
        if calls and seen[0] >= calls:
            raise _Stop

    handles = [twin.register_forward_pre_hook(reference_hook), consumer.module.register_forward_pre_hook(live_hook)]
    device = _device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, _ = split_batch(batch, device)
                mask[0] = _mask_of(inputs)
                pending.clear()
                seen[0] = 0
                for net in (reference, model):
                    with contextlib.suppress(_Stop):
                        _call(net, inputs)
    finally:
        for handle in handles:
            handle.remove()
    counts = torch.tensor([float(stats.count), float(stats.sq_count)], dtype=torch.float64)
    counts = all_reduce_sum(counts)
    stats.count, stats.sq_count = int(counts[0]), int(counts[1])
    for attr in ("gram", "cross"):
        value = getattr(stats, attr)
        setattr(stats, attr, all_reduce_sum(value if value is not None else stats.zeros(attr, torch.device("cpu"))))
    return stats


def removed_columns_of(pruner: Pruner):
    """``f(consumer, group id, mask)``: the input columns a consumer loses when group ``gid``
    has ``mask`` pruned and every other group what it has pruned now."""
    data = pruner.data
    current = pruner._pruned()

    def removed_columns(consumer: Consumer, gid: int, mask: torch.Tensor) -> list[int]:
        masks = list(current)
        masks[gid] = mask
        positions: set[int] = set()
        for g, m in consumer.members:
            units = masks[g].nonzero().flatten().tolist()
            if units:
                positions.update(data.groups[g].members[m].positions(units))
        return columns_of(consumer.stats, consumer.module, sorted(positions))

    return removed_columns


def sensitivity_allocation(
    pruner: Pruner, kind: UnitKind, scores: list[torch.Tensor], pruned: list[torch.Tensor], target: float
) -> list[int] | None:
    """Units per group of one kind by measured sensitivity (allocation.py); None without data."""
    data = pruner.data
    if data is None or data.recorder is None or data.recorder.seen == 0:
        return None
    flat_offset = 0 if kind is pruner.channels else len(pruner.channels.groups)
    group_ids = [flat_offset + i for i in range(len(kind.groups))]
    removed_columns = removed_columns_of(pruner)
    consumers = [c for c in data.consumers.values() if any(g in group_ids for g, _ in c.members)]
    counts = sensitivity_counts(
        kind.groups,
        group_ids,
        scores,
        pruned,
        target,
        consumers,
        removed_columns,
        damping=pruner.config.damping,
        refit=pruner.config.reconstruct,
        max_layer_ratio=pruner.config.max_layer_ratio,
    )
    if counts is None:
        return None
    from .selection import removable

    return [max(removable(g, c, kind.round_to), int(p.sum())) for g, c, p in zip(kind.groups, counts, pruned)]
