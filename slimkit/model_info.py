"""What slimkit remembers on a model it converted or loaded: one typed object per model.

``slimkit.convert`` leaves a plain model of the user's class; ``save_pretrained`` still needs
the recipe it was made with, the before -> after report and the folder it was loaded from (whose
extra files it copies along). They live in one :class:`ModelInfo` on the model, read with
:func:`model_info` (``slimkit.model_info``), never as loose keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

_INFO_ATTR = "_slimkit_info"  # the one key in the model's __dict__ (not a submodule: not saved)


@dataclass
class ModelInfo:
    """How a converted or loaded model was made.

    * ``recipe``: the recipe it was converted with (a ``Recipe``, or its dict when loaded);
    * ``report``: the before -> after measurements (``"before"``, ``"after"``, ``"kept"``,
      ``"methods"``) that ``save_pretrained`` writes into ``config.json`` and the model card;
    * ``folder``: the folder it was loaded from, if any;
    * ``method_notes``: one line per fact the methods' ``convert`` recorded (e.g. ``"attention
      heads removed": "25.0%"``), kept across repeated conversions of the same model;
    * ``pruning``: the pruning manifest (the ``pruning`` block of ``config.json``: final shapes,
      size attributes, heads, removed layers), read and written only by
      :mod:`slimkit.prune.manifest`.
    """

    recipe: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    method_notes: dict[str, str] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None


def model_info(model: nn.Module) -> ModelInfo | None:
    """The :class:`ModelInfo` of a model slimkit converted or loaded (None for others)."""
    info = model.__dict__.get(_INFO_ATTR)
    return info if isinstance(info, ModelInfo) else None


def set_model_info(model: nn.Module, info: ModelInfo) -> ModelInfo:
    """Attach ``info`` to ``model`` (replacing any earlier one, whose pruning manifest ``info``
    keeps when it has none: the shapes a model has do not change with its recipe); returns it."""
    previous = model_info(model)
    if info.pruning is None and previous is not None:
        info.pruning = previous.pruning
    object.__setattr__(model, _INFO_ATTR, info)
    return info


def model_info_of(model: nn.Module) -> ModelInfo:
    """The model's :class:`ModelInfo`, attached empty first if it has none."""
    return model_info(model) or set_model_info(model, ModelInfo())


def add_method_notes(model: nn.Module, notes: dict[str, str]) -> None:
    """Record a method's lines for the report of the conversion under way (see ModelInfo)."""
    model_info_of(model).method_notes.update(notes)
