"""The plain-loop API: ``prepare``, ``compute_loss``, ``step``, ``convert``.

    model = slimkit.prepare(model, recipe, teacher=teacher, example_inputs=x)
    optimizer = torch.optim.AdamW(model.parameters())      # after prepare: includes projectors
    for x, y in loader:
        out = model(x)
        loss = slimkit.compute_loss(model, out, labels=y)   # HF models with labels: out.loss already is it
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        slimkit.step(model)                                 # pruning / QAT schedules
    small = slimkit.convert(model)

Works the same on a model wrapped by DDP or ``accelerator.prepare``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from .controller import Controller, Method, controller_of, unwrap
from .errors import IncompatibleError, SlimkitError
from .methods import in_order, registered
from .recipe import Recipe


def prepare(
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    *,
    teacher: nn.Module | None = None,
    example_inputs: Any = None,
    measure: bool = True,
) -> nn.Module:
    """Attach the recipe's methods to ``model`` (in place) and return it.

    Shapes do not change: build the optimizer, DDP wrapper or Trainer *after* this call so
    that they see the projectors and state slimkit adds. ``example_inputs`` (a tensor, tuple
    or dict of kwargs) is used to trace the model; adapters supply one for timm and HF models.
    With ``measure`` (default) the model's parameters, MACs, size and latency on those inputs are
    recorded now, and ``convert`` measures them again for the before -> after report.
    """
    recipe = Recipe.load(recipe)
    model = unwrap(model)
    _check_sharding(model, recipe)
    from .omp import warn_once

    warn_once()  # OMP_WAIT_POLICY unset: training may be several times slower on a shared machine
    controller = controller_of(model, required=False) or Controller(model)
    if example_inputs is None:
        try:
            example_inputs = controller.adapter.example_inputs(model)
        except SlimkitError:
            example_inputs = None  # each method says what it needs, if it needs inputs at all
    if measure:
        controller.measure_baseline(model, example_inputs)
    elif controller.example_inputs is None:
        controller.example_inputs = example_inputs
    # In registry order: pruning traces the clean model, quantization hooks in next, KD probes the
    # result last (slimkit/methods.py).
    sections = recipe.sections()
    for spec in registered():
        if spec.section in sections:
            method = spec.build(controller, sections[spec.section], teacher=teacher, example_inputs=example_inputs)
            controller.add(method, model)
    from .distributed import reshard_

    reshard_(model)  # FSDP2: after slimkit's probe forwards, the optimizer must get the shards
    if teacher is not None:
        reshard_(teacher)
    return model


def _check_sharding(model: nn.Module, recipe: Recipe) -> None:
    from .distributed import is_sharded

    late = [name for name in ("prune", "quant") if getattr(recipe, name) is not None]
    if late and is_sharded(model):
        raise SlimkitError(
            f"slimkit.prepare: {type(model).__name__} is already sharded by fully_shard (FSDP2), and the "
            f"recipe's {' and '.join(late)} section{'s' if len(late) > 1 else ''} must see whole parameters to "
            "trace the model and attach masks / fake-quant modules. Call slimkit.prepare(model, recipe, ...) "
            "first and fully_shard(model) after it (distillation alone also works on a model sharded before "
            "prepare)."
        )


def compute_loss(
    model: nn.Module,
    outputs: Any,
    *,
    labels: torch.Tensor | None = None,
    task_loss: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss to backpropagate after ``outputs = model(...)``.

    With KD, this is the mixed loss of the recipe; the task loss is ``task_loss`` if given,
    else cross-entropy against ``labels`` (-100 ignored; shifted for causal LMs). Without KD it
    is the task loss itself.
    """
    controller = controller_of(model)
    mixer = controller.loss_mixer  # KD: the mixed loss of the recipe
    if mixer is not None:
        return mixer.compute_loss(outputs, labels, task_loss, attention_mask)
    if task_loss is not None:
        return task_loss
    from .adapters import get_logits, get_loss
    from .distill.losses import task_cross_entropy

    loss = get_loss(outputs)
    if loss is not None:
        return loss
    if labels is None:
        raise SlimkitError(
            f"compute_loss: the outputs of {type(unwrap(model)).__name__} carry no loss; pass labels= (the "
            "targets) or task_loss= (a loss you computed)"
        )
    causal = controller.adapter.task(unwrap(model)) == "causal_lm"
    total, count = task_cross_entropy(get_logits(outputs), labels, attention_mask, causal)
    return total / count.clamp_min(1)


def step(model: nn.Module, global_step: int | None = None) -> None:
    """Call after each ``optimizer.step()``: advances pruning / QAT schedules and re-applies
    masks. ``global_step`` defaults to one more than the last call."""
    controller_of(model).on_step(unwrap(model), global_step)


def log_values(model: nn.Module) -> dict[str, float]:
    """Averaged loss terms since the last call, and each method's state (sparsity, QAT phase)."""
    return controller_of(model).pop_log()


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Make the recipe permanent: physically remove pruned units, convert to INT8, drop KD
    hooks and projectors. Returns a model of the same class, ready for ``save_pretrained``.

    **A copy by default** (as ``torch.ao.quantization.convert``): ``model`` stays prepared, to
    keep training or to convert again later; the copy is a ``copy.deepcopy`` of the prepared
    model (the teacher and all training state copied too, for as long as the call lasts).
    ``inplace=True`` (or :func:`convert_`) converts the model given instead, the one inside a
    DDP / accelerate wrapper, and returns that same object: no second copy of a large model,
    and the model is no longer prepared (no more ``step``)."""
    model = unwrap(model)
    controller = controller_of(model)
    if not inplace:
        from .distributed import is_sharded

        if is_sharded(model):
            raise IncompatibleError(
                f"convert: {type(model).__name__} is sharded (FSDP2 fully_shard); a copy of a sharded model "
                "is not made. Convert it in place on every process: slimkit.convert_(model) "
                "(or slimkit.convert(model, inplace=True))"
            )
        with controller.step_tensors_set_aside():
            model = copy.deepcopy(model)
        controller = controller_of(model)
    return controller.convert(model)


def convert_(model: nn.Module) -> nn.Module:
    """:func:`convert` in place (the trailing underscore, as torch's in-place ops and torchao's
    ``quantize_``): the model given becomes the converted model and is returned; no copy."""
    return convert(model, inplace=True)


def methods_of(model: nn.Module) -> dict[str, Method]:
    """The methods attached to a prepared model, recipe section -> method object, in the order
    they run (``{}`` for a model that is not prepared, or already converted).

    The documented way to look inside a prepared model (``slimkit.methods_of(model)["prune"]``):
    each method object carries its ``config`` and its own introspection (e.g. the pruning
    method's ``summary()``, the KD method's ``teacher``)."""
    controller = controller_of(model, required=False)
    return {} if controller is None else {method.name: method for method in in_order(controller.methods)}
