"""Adapter registry: which family a model belongs to.

The timm and transformers adapters register themselves when ``slimkit.plugins.timm`` /
``slimkit.plugins.hf`` are imported; ``get_adapter`` imports the right plugin on demand by
looking at the model class's module, so ``import slimkit`` never imports those libraries.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import (
    BlockStack,
    HeadLayout,
    ModelAdapter,
    Task,
    TorchAdapter,
    batch_inputs,
    call_model,
    get_logits,
    get_loss,
)

_ADAPTERS: list[type[ModelAdapter]] = []

# Which plugin knows models defined in which top-level package.
_PLUGIN_FOR_PACKAGE = {"timm": "slimkit.plugins.timm", "transformers": "slimkit.plugins.hf_adapters"}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` known to ``get_adapter`` (newest first)."""
    if cls not in _ADAPTERS:
        _ADAPTERS.insert(0, cls)
    return cls


def _import_plugins_for(model: nn.Module) -> None:
    packages = {type(m).__module__.split(".", 1)[0] for m in (model, *model.modules())}
    for package in packages:
        plugin = _PLUGIN_FOR_PACKAGE.get(package)
        if plugin:
            importlib.import_module(plugin)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (the plain-PyTorch fallback when no family matches)."""
    _import_plugins_for(model)
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls()
    return TorchAdapter()


def adapter_for_library(library: str) -> ModelAdapter:
    """The adapter that builds models of ``library`` ('timm', 'transformers', or 'torch' for a
    plain ``nn.Module``) from config."""
    if library == "torch":
        return TorchAdapter()
    plugin = _PLUGIN_FOR_PACKAGE.get(library)
    if plugin is None:
        from ..errors import FormatError

        raise FormatError(
            f"unknown model library {library!r}; slimkit folders hold timm, transformers or plain torch models"
        )
    importlib.import_module(plugin)
    for cls in _ADAPTERS:
        if cls.library == library:
            return cls()
    raise AssertionError(f"plugin {plugin} registered no adapter for {library}")  # pragma: no cover


__all__ = [
    "BlockStack",
    "HeadLayout",
    "ModelAdapter",
    "Task",
    "TorchAdapter",
    "adapter_for_library",
    "batch_inputs",
    "call_model",
    "get_adapter",
    "get_logits",
    "get_loss",
    "register_adapter",
]
