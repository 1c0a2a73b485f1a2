"""Hugging Face ``transformers.Trainer`` integration: callbacks only, no Trainer subclass.

    from slimkit.plugins.hf import slim_callbacks
    callbacks = slim_callbacks(model, recipe, teacher=teacher)   # before the Trainer is built
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.train()

A ``TrainerCallback`` can neither change the loss nor add parameters to an optimizer that
already exists, so the callbacks *prepare the model when they are made*: the KD forward hook
writes the mixed loss into ``outputs.loss`` (which the Trainer backpropagates and logs),
projectors and slimkit's state live in a child module (so they are in the optimizer and in
every checkpoint, and ``resume_from_checkpoint`` restores them), and the teacher is held by
the method, never by the model. The callbacks then advance the pruning / QAT schedules after
each optimizer step and add the KD terms, sparsity and QAT state to the Trainer's logs.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch import nn
from transformers import DefaultFlowCallback, TrainerCallback

import slimkit
from slimkit.controller import controller_of, unwrap
from slimkit.errors import SlimkitError
from slimkit.methods import method_spec, registered
from slimkit.recipe import Recipe

from . import hf_adapters  # noqa: F401  (registers the HF adapter)
from .parallelism import check_trainer_args

# model -> (the logs dict of the last log event, the values popped for it): the callbacks of one
# model add the same values to one log event. Weak: a model's entry goes with the model.
_LOGGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _average_across_processes(values: dict[str, float]) -> dict[str, float]:
    if not values or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


class SlimCallback(TrainerCallback):
    """Base of the slimkit callbacks: prepares one recipe section and drives the model's methods.

    The three built-in sections have named subclasses; the section of a method registered with
    ``slimkit.register_method`` gets a plain ``SlimCallback(model, config, section="name")``
    (``slim_callbacks`` makes it)."""

    section: str = ""

    def __init__(
        self,
        model: nn.Module,
        config: Any = None,
        *,
        teacher: nn.Module | None = None,
        example_inputs: Any = None,
        section: str | None = None,
    ) -> None:
        if section is not None:
            self.section = section
        spec = method_spec(self.section)  # a SlimkitError naming the registered sections
        model = unwrap(model)
        if self.section not in slimkit.methods_of(model):
            if config is None:
                raise SlimkitError(f"{type(self).__name__} needs the recipe's {self.section!r} section")
            if isinstance(config, dict):
                config = spec.config.from_dict(config)
            recipe = Recipe.from_sections({self.section: config})
            slimkit.prepare(model, recipe, teacher=teacher, example_inputs=example_inputs)
        self.model = model
        self.controller = controller_of(model)

    # Report integrations (TensorBoard, W&B, ...) are called before user callbacks; move the
    # slimkit callbacks ahead of them so that the values added in on_log reach every target.
    # A callback is not handed the Trainer or its CallbackHandler, so the handler's list is found
    # as the list that holds this callback and transformers' DefaultFlowCallback (always first).
    def on_init_end(self, args, state, control, **kwargs):
        check_trainer_args(args)
        for callbacks in gc.get_referrers(self):
            if isinstance(callbacks, list) and any(isinstance(c, DefaultFlowCallback) for c in callbacks):
                ours = [c for c in callbacks if isinstance(c, SlimCallback)]
                others = [c for c in callbacks if not isinstance(c, SlimCallback)]
                first_report = next(
                    (i for i, c in enumerate(others) if type(c).__module__.startswith("transformers.integrations")),
                    len(others),
                )
                callbacks[:] = others[:first_report] + ours + others[first_report:]

    def on_train_begin(self, args, state, control, **kwargs):
        check_trainer_args(args)  # FSDP on CPU, FSDP1 and DeepSpeed: refused (plugins/parallelism.py)
        # A schedule that cannot finish in this run is refused now, not discovered at convert
        # after the whole run (state.max_steps is set before on_train_begin).
        if getattr(state, "max_steps", 0) and state.max_steps > 0:
            self.controller.recipe.check_fits(state.max_steps, "max_steps (the Trainer's TrainingArguments)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        slimkit.step(model if model is not None else self.model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training-step logs only (not eval, not the final summary)
            return
        # One pop per log event, shared by all slimkit callbacks of this model.
        cached = _LOGGED.get(self.model)
        if cached is None or cached[0] is not logs:
            cached = (logs, _average_across_processes(slimkit.log_values(self.model)))
            _LOGGED[self.model] = cached
        values = cached[1]
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


class DistillationCallback(SlimCallback):
    """Knowledge distillation on a stock Trainer (the model's loss becomes the KD mix)."""

    section = "distill"


class PruningCallback(SlimCallback):
    """Scheduled pruning on a stock Trainer; logs the current sparsity."""

    section = "prune"


class QATCallback(SlimCallback):
    """Quantization-aware training on a stock Trainer; logs the QAT phase."""

    section = "quant"


def _callback_for(section: str, model: nn.Module) -> SlimCallback:
    named = {cls.section: cls for cls in (DistillationCallback, PruningCallback, QATCallback)}
    return named[section](model) if section in named else SlimCallback(model, section=section)


def slim_callbacks(
    model: nn.Module,
    recipe: Recipe | dict | str,
    *,
    teacher: nn.Module | None = None,
    example_inputs: Any = None,
) -> list[SlimCallback]:
    """Prepare ``model`` for the whole recipe now and return one callback per section.

    Call it before building the Trainer, so that the optimizer the Trainer creates holds the
    projectors (and any other parameters slimkit adds).
    """
    recipe = Recipe.load(recipe)
    slimkit.prepare(model, recipe, teacher=teacher, example_inputs=example_inputs)
    sections = recipe.sections()
    return [_callback_for(spec.section, model) for spec in registered() if spec.section in sections]


__all__ = [
    "DistillationCallback",
    "PruningCallback",
    "QATCallback",
    "SlimCallback",
    "layer_subset_student",
    "slim_callbacks",
]


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer layers (as many entries as config.num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise SlimkitError(
        f"{type(model).__name__}: no ModuleList of config.num_hidden_layers={n} layers was found; "
        "build the student by hand"
    )


def layer_subset_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A student with the teacher's config, ``len(layers)`` layers, and the teacher's weights for
    the embeddings, the heads and the kept layers (DistilBERT-style initialisation)."""
    import copy

    name, teacher_layers = _layer_list(teacher)
    bad = [i for i in layers if not 0 <= i < len(teacher_layers)]
    if bad or not layers:
        raise SlimkitError(f"layers {layers}: the teacher has layers 0..{len(teacher_layers) - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    for attr in ("layer_types",):  # per-layer lists (e.g. attention types) follow the kept layers
        if isinstance(getattr(config, attr, None), list):
            setattr(config, attr, [getattr(config, attr)[i] for i in layers])
    student = type(teacher)(config)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(name + ".")}
    for new, old in enumerate(layers):
        prefix = f"{name}.{old}."
        state.update(
            {f"{name}.{new}.{k[len(prefix) :]}": v for k, v in teacher.state_dict().items() if k.startswith(prefix)}
        )
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith(tuple(getattr(student, "_tied_weights_keys", None) or ()))]:
        raise SlimkitError(f"could not copy the teacher's weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return student.eval()
