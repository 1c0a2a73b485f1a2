"""What ``slimkit.prepare`` attaches to a model, and the protocol every method follows.

A prepared model gets:

* one child module named ``slimkit`` (:class:`SlimkitModule`) holding everything that must
  train or be checkpointed with the model: the step counter, KD projectors, pruning masks and
  importance statistics, observer state. Being a child, it moves with ``.to()``, is in the
  optimizer built from ``model.parameters()``, in ``state_dict()`` (so Trainer checkpoints and
  ``resume_from_checkpoint`` restore it) and in DDP's parameter and buffer sync. It is never
  written by ``slimkit.save_pretrained``.
* a plain attribute ``_slimkit`` holding the :class:`Controller`: the recipe, the methods,
  hooks, and (for KD) the teacher, which is deliberately *not* a submodule so that it is never
  saved, trained or wrapped by DDP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .errors import SlimkitError
from .methods import in_order, reshapes
from .model_info import ModelInfo, model_info, set_model_info
from .modules import SLIMKIT_ATTR

CONTROLLER_ATTR = "_slimkit"


class SlimkitModule(nn.Module):
    """The child module that holds slimkit's trainable and checkpointed state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        # An identity: containers such as nn.Sequential call every child in turn, this one too.
        return x


class Method:
    """One compression method attached to a model (distill, prune, quant, or one registered
    with :func:`slimkit.register_method`).

    ``prepare`` keeps parameter shapes (masks, fake-quant, hooks); ``convert`` changes the
    architecture once, after training. State that must survive a checkpoint is registered as
    parameters / buffers under ``controller.state`` (the ``slimkit`` child).

    A method that sets ``mixes_loss`` (KD) owns the loss: the forward hook hands it every
    method's terms (``replace_loss``) and ``slimkit.compute_loss`` asks it (``compute_loss``).
    """

    mixes_loss: ClassVar[bool] = False

    name: str = ""  # the recipe section; set from the registry (slimkit.register_method)

    def __init__(self, controller: Controller, config: Any, example_inputs: Any = None) -> None:
        self.controller = controller
        self.config = config
        self.example_inputs = example_inputs  # what prepare traces the model with (may be None)

    def prepare(self, model: nn.Module) -> None:
        """Attach to the model before the optimizer is built."""

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Called by the model's forward hook in training; returns loss terms (KD only)."""
        return {}

    def replace_loss(self, outputs: Any, terms: dict[str, torch.Tensor]) -> Any:
        """``mixes_loss`` methods: the forward hook's result (outputs with the mixed loss, or None)."""
        return None

    def compute_loss(
        self, outputs: Any, labels: torch.Tensor | None, task_loss: torch.Tensor | None, attention_mask: Any
    ) -> torch.Tensor:
        """``mixes_loss`` methods: the loss to backpropagate (``slimkit.compute_loss``)."""
        raise NotImplementedError

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called once after each optimizer step, with the number of steps done."""

    def takes_calibration(self) -> bool:
        """Whether ``calibrate`` has a use for calibration batches now."""
        return False

    def waits_for_calibration(self) -> bool:
        """Whether the method cannot go on without ``slimkit.calibrate`` (a training script
        calls it then, before the first step); implies ``takes_calibration``."""
        return False

    def calibrate(self, model: nn.Module, batches: list, *, allow_degenerate: bool = False) -> None:
        """Learn from calibration batches (``slimkit.calibrate``: a list, at most ``num_batches``),
        when ``takes_calibration``. ``allow_degenerate`` keeps ranges a method would refuse as
        degenerate (quantization)."""

    def nothing_to_calibrate(self) -> str:
        """Why this method has no use for calibration batches now (for the error when none has)."""
        return f"{self.name}: uses no calibration data"

    def log_values(self) -> dict[str, float]:
        """Values worth logging now (sparsity, QAT phase, ...)."""
        return {}

    def convert(self, model: nn.Module) -> nn.Module:
        """Make the change permanent (physical pruning, INT8); returns the model."""
        return model

    def remove(self, model: nn.Module) -> None:
        """Detach hooks; called after convert."""

    def detach_copy(self, copy: nn.Module) -> None:
        """Undo, on a ``copy.deepcopy`` of the prepared model, what ``prepare`` changed in its
        modules besides hooks (swapped classes, added children); see :meth:`Controller.strip_copy`."""

    def skipped_modules(self) -> list[str]:
        """Modules whose output the model no longer uses (blocks depth pruning removed and skips
        until ``convert``): other methods leave them out (a KD pair on one would train nothing
        that remains)."""
        return []


class Controller:
    """The recipe, the methods and the hooks of one prepared model."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None) -> None:
        self.adapter = adapter or get_adapter(model)
        self.methods: dict[str, Method] = {}
        self.recipe_sections: dict[str, Any] = {}
        self.state = SlimkitModule()
        self._suspended = 0
        self._hook = None
        self.last_terms: dict[str, torch.Tensor] = {}
        self.example_inputs: Any = None  # what prepare traced the model with; reused by reports
        self.baseline: dict[str, Any] | None = None  # the model measured before any method attached
        self._log_sums: dict[str, float] = {}
        self._log_count = 0
        # Put the state module on the model's device without moving the model.
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.state.to(device)
        model.add_module(SLIMKIT_ATTR, self.state)
        object.__setattr__(model, CONTROLLER_ATTR, self)
        from .distributed import sync_buffers_like_ddp

        # Under FSDP2 rank 0's buffers (BatchNorm statistics, observers) before each forward, as DDP
        self._buffer_sync = sync_buffers_like_ddp(model)

    # -- methods -----------------------------------------------------------------------------
    def add(self, method: Method, model: nn.Module) -> None:
        if method.name in self.methods:
            raise SlimkitError(
                f"{type(model).__name__} is already prepared for {method.name!r}; prepare each recipe "
                "section once (slim_callbacks / prepare with the whole recipe do this)"
            )
        self.methods[method.name] = method
        self.recipe_sections[method.name] = method.config
        method.prepare(model)
        if self._hook is None:
            self._hook = model.register_forward_hook(self._forward_hook, with_kwargs=True)

    @property
    def recipe(self) -> Any:
        from .recipe import Recipe

        return Recipe.from_sections(self.recipe_sections)

    @property
    def step(self) -> int:
        return int(self.state.step)

    @contextmanager
    def step_tensors_set_aside(self):
        """Set aside what the last forward left for its loss (tensors inside an autograd graph:
        the mixed loss, the logged terms), which ``copy.deepcopy`` cannot copy, while the model
        is copied (``slimkit.convert``'s default); put back afterwards."""
        saved = []
        for owner in (self, *self.methods.values()):
            for key, value in list(vars(owner).items()):
                if _in_graph(value):
                    saved.append((owner, key, value))
                    setattr(owner, key, type(value)() if isinstance(value, (dict, list)) else None)
        try:
            yield
        finally:
            for owner, key, value in saved:
                setattr(owner, key, value)

    # -- the forward hook ----------------------------------------------------------------------
    @contextmanager
    def suspended(self):
        """Run the model without KD (e.g. while tracing it for the pruning graph)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _forward_hook(self, model: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        if self._suspended or not model.training or not torch.is_grad_enabled():
            return None
        terms: dict[str, torch.Tensor] = {}
        for method in self.methods.values():
            terms.update(method.after_forward(model, args, kwargs, outputs))
        self.last_terms = terms
        mixer = self.loss_mixer
        return mixer.replace_loss(outputs, terms) if mixer is not None else None

    @property
    def loss_mixer(self) -> Method | None:
        """The method that owns the loss (``Method.mixes_loss``: KD), if one is attached."""
        return next((m for m in self.methods.values() if m.mixes_loss), None)

    # -- steps and logging -------------------------------------------------------------------------
    def on_step(self, model: nn.Module, step: int | None = None) -> None:
        """Advance every method's schedule to ``step`` (default: one more than the last)."""
        step = self.step + 1 if step is None else int(step)
        if step == self.step and step != 0:
            return
        self.state.step.fill_(step)
        for method in self.methods.values():
            method.on_step(model, step)

    def record(self, values: dict[str, torch.Tensor | float]) -> None:
        """Accumulate loss terms between two logging points (averaged by ``pop_log``)."""
        for key, value in values.items():
            value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self._log_sums[key] = self._log_sums.get(key, 0.0) + value
        self._log_count += 1

    def pop_log(self) -> dict[str, float]:
        """Averages of the recorded terms since the last call, plus each method's state."""
        out = {k: v / max(self._log_count, 1) for k, v in self._log_sums.items()}
        self._log_sums, self._log_count = {}, 0
        for method in self.methods.values():
            out.update(method.log_values())
        return out

    # -- convert / remove -----------------------------------------------------------------------
    def measure_baseline(self, model: nn.Module, example_inputs: Any) -> None:
        """Record the model as it is before any method attaches (for the before -> after report)."""
        from .report import measure

        if self.baseline is None and example_inputs is not None:
            self.example_inputs = example_inputs
            try:
                self.baseline = measure(model, example_inputs)
            except Exception:  # the methods' own checks explain bad example inputs best
                self.baseline = None

    def _heads(self, model: nn.Module) -> dict[str, int]:
        try:
            return {layout.name: layout.num_heads for layout in self.adapter.attention_heads(model)}
        except SlimkitError:
            return {}

    def convert(self, model: nn.Module) -> nn.Module:
        from .distributed import gather_full_model_
        from .report import count_macs, kept_layers, latency_setting, layer_widths, measure

        model = gather_full_model_(model)  # FSDP2: one whole model on every process (a collective)

        transposed = self.adapter.transposed_linear_types()
        widths, heads = layer_widths(model, transposed), self._heads(model)
        # Registry order (slimkit/methods.py); the report's widths and float MACs are measured
        # after the methods whose convert reshapes layers (pruning), before the others (INT8).
        ordered = in_order(self.methods)
        reshaping = [i for i, method in enumerate(ordered) if reshapes(method.name)]
        split = reshaping[-1] + 1 if reshaping else 0
        for method in ordered[:split]:
            model = method.convert(model)
        inputs = self.example_inputs
        macs = None
        if inputs is not None:  # MACs of the float architecture: int8 kernels are not counted
            model.eval()
            macs = count_macs(model, inputs)
        kept = {
            "channels": kept_layers(widths, layer_widths(model, transposed)),
            "heads": kept_layers(heads, self._heads(model)),
        }
        for method in ordered[split:]:
            model = method.convert(model)
        self.detach(model)
        report: dict[str, Any] = {"kept": kept}
        if inputs is not None:
            report.update(
                before=self.baseline, after=measure(model, inputs, macs=macs), latency=latency_setting(inputs)
            )
        info = model_info(model)
        report["methods"] = dict(info.method_notes)
        info.report = report
        return model

    def detach(self, model: nn.Module) -> None:
        """Remove hooks and the state module; the model keeps any changes made so far."""
        for method in self.methods.values():
            method.remove(model)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._buffer_sync.remove()
        if SLIMKIT_ATTR in model._modules:
            del model._modules[SLIMKIT_ATTR]
        if CONTROLLER_ATTR in model.__dict__:
            del model.__dict__[CONTROLLER_ATTR]
        previous = model_info(model) or ModelInfo()  # where it was loaded from; what methods noted
        set_model_info(model, ModelInfo(self.recipe, folder=previous.folder, method_notes=previous.method_notes))

    def skipped_modules(self) -> list[str]:
        """What every method says the model no longer uses (:meth:`Method.skipped_modules`)."""
        return [name for method in self.methods.values() for name in method.skipped_modules()]

    def strip_copy(self, copy: nn.Module) -> nn.Module:
        """A ``copy.deepcopy`` of this controller's prepared model made plain again, in place: no
        ``slimkit`` child, no controller, no hook whose function is slimkit's, every method's
        changes undone (:meth:`Method.detach_copy`). The copy computes as the model would
        without slimkit (its weights as they are now, pruned units only zeroed), e.g. to be
        prepared with another recipe; this controller and its model are untouched."""
        for method in in_order(self.methods):
            method.detach_copy(copy)
        copy._modules.pop(SLIMKIT_ATTR, None)
        copy.__dict__.pop(CONTROLLER_ATTR, None)
        for module in copy.modules():
            _drop_slimkit_hooks(module)
        return copy


# torch's per-hook flags, keyed by the same handle ids as the hooks
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _drop_slimkit_hooks(module: nn.Module) -> None:
    for name in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    ):
        hooks = module.__dict__.get(name)
        if not hooks:
            continue
        for key in [k for k, fn in hooks.items() if _is_slimkit_function(fn)]:
            del hooks[key]
            for extra in _HOOK_FLAGS:
                module.__dict__.get(extra, {}).pop(key, None)


def _is_slimkit_function(fn: Any) -> bool:
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    fn = getattr(fn, "hook", fn)  # torch's wrappers of load_state_dict hooks keep the function as .hook
    home = getattr(fn, "__module__", None) or ""
    return home == "slimkit" or home.startswith("slimkit.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / accelerate / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if CONTROLLER_ATTR in model.__dict__:
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            break
    return model


def controller_of(model: nn.Module, required: bool = True) -> Controller | None:
    model = unwrap(model)
    controller = model.__dict__.get(CONTROLLER_ATTR)
    if controller is None and required:
        raise SlimkitError(
            f"{type(model).__name__} was not prepared by slimkit; call slimkit.prepare(model, recipe, ...) "
            "(or slim_callbacks for a Trainer) first"
        )
    return controller


def _in_graph(value: Any) -> bool:
    """A tensor with an autograd history, or a dict / list / tuple holding one."""
    if isinstance(value, torch.Tensor):
        return value.grad_fn is not None
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        return False
    return any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in value)
