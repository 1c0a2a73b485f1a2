"""Depth pruning of Hugging Face transformers: which layers are blocks, how the config follows.

The blocks are the one ``ModuleList`` of ``config.num_hidden_layers`` layers. After some are
removed, ``num_hidden_layers``, per-layer config lists (``layer_types``, ``*_layer_types``,
``*_per_layer``) and each kept layer's ``layer_idx`` (what the key/value cache is indexed by)
follow, so that plain ``AutoModel...from_pretrained`` builds the shallower model from the config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.adapters import BlockStack
from slimkit.modules import get_module, user_named_modules


def block_stacks(model: nn.Module) -> list[BlockStack]:
    """The transformer layers (none for ALBERT's shared layer group, or when the layers are not
    one ``ModuleList`` of ``config.num_hidden_layers``)."""
    config = model.config
    n = getattr(config, "num_hidden_layers", None)
    if getattr(config, "num_hidden_groups", None) is not None:  # ALBERT
        name = next((k for k, _ in user_named_modules(model) if k.endswith("albert_layer_groups")), "encoder")
        why = (
            f"it runs one shared layer group {n} times, so no layer can be removed on its own; "
            "run fewer passes by lowering config.num_hidden_layers instead"
        )
        return [BlockStack(name, 0, [], unsupported=why)]
    found = [k for k, m in user_named_modules(model) if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if len(found) != 1:
        return []
    name = found[0]
    removable = list(range(n))
    parent = get_module(model, name.rpartition(".")[0])
    if getattr(parent, "conv", None) is not None:  # DeBERTa-v2: a conv runs after layer 0 only
        removable.remove(0)
    return [BlockStack(name, n, removable, channel_dim=-1)]


def after_depth_pruning(model: nn.Module, kept: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rewrite what counts the layers; returns the config fields changed."""
    config = model.config
    changed: dict[str, Any] = {}
    for name, entry in kept.items():
        indices, total = entry["kept"], entry["total"]
        changed["num_hidden_layers"] = len(indices)
        for field, value in list(vars(config).items()):
            per_layer = field == "layer_types" or field.endswith(("_layer_types", "_per_layer"))
            if per_layer and isinstance(value, (list, tuple)) and len(value) == total:
                changed[field] = [value[i] for i in indices]
        for new, layer in enumerate(get_module(model, name).children()):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
    for field, value in changed.items():
        setattr(config, field, value)
    return changed
