"""The method registry: every compression method, registered once, read by everything else.

One call (after peft's ``register_peft_method``) tells slimkit all it needs of a method:

    slimkit.register_method(
        "lowrank",                    # the recipe section: recipe.yaml's ``lowrank:``
        config=LowRankConfig,         # a slimkit Config dataclass that validates the section
        method=LowRank,               # a slimkit.Method subclass: prepare / on_step / convert ...
        order=150,                    # where it runs among the others (see ORDER below)
        block=slimkit.HubBlock("low_rank", describe=..., rebuild=...),  # what save/load records
    )

``slimkit.prepare`` attaches the recipe's methods in ``order``; ``slimkit.calibrate`` and
``slimkit.convert`` run them in that order; ``save_pretrained`` writes (and ``from_pretrained``
replays) their hub blocks in that order; ``slim_callbacks`` makes one Trainer callback per
section; ``slimkit info`` checks and summarises each block. None of them keeps its own list.

The built-in methods are registered at the bottom of this module by *reference*
(``"slimkit.prune:Pruner"``), resolved on first use: this module imports only the recipe
module, so ``hub`` can read the registry without importing the method packages, and the method
packages never import ``hub`` (no import cycle; ``import slimkit`` stays light).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import SlimkitError
from .recipe import DistillConfig, PruneConfig, QuantConfig, register_section

# A reference to a class or function: the object itself, or "package.module:attribute".
Ref = Any

# The built-in order: pruning changes the float architecture first (quantization then observes and
# converts the pruned layers), distillation goes last (its hooks probe the result; convert drops them).
ORDER = {"prune": 100, "quant": 200, "distill": 300}


def resolve(ref: Ref) -> Any:
    """The object a :data:`Ref` names (imported on first use when given as a string)."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class HubBlock:
    """What a method records in a saved folder's ``config.json`` (``slimkit.<name>``).

    * ``describe(model) -> dict | None``: the JSON-able record of what the method changed in a
      converted model (None: nothing to record).
    * ``rebuild(fresh_model, block) -> model``: redo that change on a freshly built base model,
      on the meta device (create tensors on the device of those replaced); raise ``FormatError``
      on a malformed block. Blocks are replayed in method order.
    * ``check(model, weights_file)`` (optional): the loaded values are sound (e.g. INT8 scales
      finite and positive), else ``FormatError`` naming the tensor.
    * ``validate(block)`` (optional): type-check the JSON alone (``slimkit info`` reads folders
      without building the model); raise ``FormatError``.
    * ``summary(block) -> str`` (optional): one line for ``slimkit info``.
    """

    name: str
    describe: Ref
    rebuild: Ref
    check: Ref | None = None
    validate: Ref | None = None
    summary: Ref | None = None

    def call(self, what: str, *args: Any) -> Any:
        """Call one of the hooks (None when the block does not define it)."""
        ref = getattr(self, what)
        return None if ref is None else resolve(ref)(*args)


@dataclass(frozen=True)
class MethodSpec:
    """One registered method (see :func:`register_method`)."""

    section: str
    config: type
    method: Ref
    order: int
    block: HubBlock | None = None
    takes_teacher: bool = False
    reshapes: bool = False

    def method_class(self) -> type:
        return resolve(self.method)

    def build(self, controller: Any, config: Any, *, teacher: Any = None, example_inputs: Any = None) -> Any:
        """The method object for one prepared model (``Method(controller, config, ...)``)."""
        kwargs = {"teacher": teacher} if self.takes_teacher else {}
        method = self.method_class()(controller, config, example_inputs=example_inputs, **kwargs)
        method.name = self.section  # the controller's key: one method per recipe section
        return method


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    section: str,
    *,
    config: type,
    method: Ref,
    order: int,
    block: HubBlock | None = None,
    takes_teacher: bool = False,
    reshapes: bool = False,
) -> MethodSpec:
    """Register a compression method under the recipe section ``section``; returns its spec.

    ``config``: a :class:`slimkit._config.Config` dataclass (``Recipe.from_dict`` reads the
    section with it); ``method``: a :class:`slimkit.controller.Method` subclass, built as
    ``method(controller, config, example_inputs=..., [teacher=...])``; ``order``: its place among
    the methods (prepare, calibrate, convert and the hub blocks' replay all follow it: built-ins
    are prune 100, quant 200, distill 300); ``block``: its :class:`HubBlock`, if convert changes
    the architecture in a way a saved folder must record; ``takes_teacher``: the method gets the
    ``teacher=`` of ``prepare``; ``reshapes``: convert changes float layer shapes (the before ->
    after report measures widths and MACs after the reshaping methods, before the others).
    Registering a section twice is an error unless it is the same spec again."""
    if not isinstance(section, str) or not section.isidentifier():
        raise SlimkitError(f"register_method: section {section!r} must be a Python identifier (a recipe key)")
    spec = MethodSpec(section, config, method, int(order), block, takes_teacher, reshapes)
    known = _METHODS.get(section)
    if known is not None and known != spec:
        raise SlimkitError(f"register_method: the section {section!r} is already registered ({known.method!r})")
    if block is not None:
        clash = next((s for s in _METHODS.values() if s.block and s.block.name == block.name and s != known), None)
        if clash is not None:
            raise SlimkitError(f"register_method: hub block {block.name!r} already belongs to {clash.section!r}")
    register_section(section, config)
    _METHODS[section] = spec
    return spec


def unregister_method(section: str) -> None:
    """Forget a method registered by :func:`register_method` (built-ins cannot be removed)."""
    if section in ORDER:
        raise SlimkitError(f"unregister_method: {section!r} is a built-in method")
    _METHODS.pop(section, None)
    register_section(section, None)


def registered() -> list[MethodSpec]:
    """Every registered method, in order."""
    return sorted(_METHODS.values(), key=lambda spec: (spec.order, spec.section))


registered_methods = registered  # the public name (slimkit.registered_methods)


def method_spec(section: str) -> MethodSpec:
    try:
        return _METHODS[section]
    except KeyError:
        raise SlimkitError(
            f"no method is registered for the recipe section {section!r}; "
            f"registered: {', '.join(s.section for s in registered())}"
        ) from None


def hub_blocks() -> list[HubBlock]:
    """The hub blocks of every registered method, in replay order."""
    return [spec.block for spec in registered() if spec.block is not None]


def in_order(methods: dict[str, Any]) -> list[Any]:
    """A controller's methods (section -> method) in registry order."""
    ranks = {spec.section: i for i, spec in enumerate(registered())}
    return [methods[name] for name in sorted(methods, key=lambda n: ranks.get(n, len(ranks)))]


def reshapes(section: str) -> bool:
    """Whether the method of ``section`` reshapes float layers in convert (False if unregistered)."""
    spec = _METHODS.get(section)
    return spec is not None and spec.reshapes


def _builtin(section: str, config: type, method: str, **kwargs: Any) -> None:
    register_method(section, config=config, method=method, order=ORDER[section], **kwargs)


_builtin(
    "prune",
    PruneConfig,
    "slimkit.prune.pruner:Pruner",
    reshapes=True,
    block=HubBlock(
        "pruning",
        describe="slimkit.prune.manifest:describe",
        rebuild="slimkit.prune.manifest:rebuild",
        validate="slimkit.prune.manifest:validate",
        summary="slimkit.prune.manifest:summary",
    ),
)
_builtin(
    "quant",
    QuantConfig,
    "slimkit.quant.quantizer:Quantizer",
    block=HubBlock(
        "quantization",
        describe="slimkit.quant.hub_block:describe",
        rebuild="slimkit.quant.hub_block:rebuild",
        check="slimkit.quant.hub_checks:check_loaded",
        validate="slimkit.quant.hub_block:validate",
        summary="slimkit.quant.hub_block:summary",
    ),
)
_builtin("distill", DistillConfig, "slimkit.distill.distiller:Distiller", takes_teacher=True)
