"""The ``pruning`` block of a saved folder: a manifest of final shapes, and the rebuild from it.

``convert`` compares the model before and after physical pruning and records every tensor
whose shape changed (its final shape) and every size attribute of a module that changed
(``out_features``, ``groups``, ``num_heads``, ``all_head_size``, timm's ``num_features``, ...).
``from_pretrained`` builds the base architecture from ``config.json``, then replays the
manifest: blocks removed by depth pruning leave their stacks (``layers``: the kept indices of
each stack, unless the rewritten config already built the shallower model), each listed tensor
is replaced by an empty one of the recorded shape and each attribute is set, before the compact
weights are loaded with strict shape checks. Like timm's pruned models, the structure comes
from a manifest of shapes, never from pickled objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import FormatError
from ..model_info import model_info, model_info_of
from ..modules import attached_by_slimkit
from . import manifest_checks

MANIFEST_FORMAT = 1


def _is_size(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _is_size(v)}


def _own(name: str) -> bool:
    return not attached_by_slimkit(name)


def snapshot(model: nn.Module) -> dict[str, dict]:
    """Shapes of every tensor and size attributes of every module, before pruning."""
    tensors = {
        name: tuple(t.shape)
        for named in (
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False),
        )
        for name, t in named
        if _own(name)
    }
    attributes = {name: _attributes(m) for name, m in model.named_modules(remove_duplicate=False) if _own(name)}
    return {"tensors": tensors, "attributes": attributes}


def changes(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """What pruning changed: final tensor shapes and attribute values."""
    tensors = {k: list(v) for k, v in after["tensors"].items() if before["tensors"].get(k) != v}
    attributes = {}
    for module, attrs in after["attributes"].items():
        old = before["attributes"].get(module, {})
        changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if old.get(k) != v}
        if changed:
            attributes[module] = changed
    return {"tensors": tensors, "attributes": attributes}


def merge(previous: dict | None, new: dict) -> dict:
    """A model pruned again after loading: later shapes override earlier ones."""
    if not previous:
        return new
    out = {**previous, **{k: v for k, v in new.items() if k not in ("tensors", "attributes", "config")}}
    out["tensors"] = {**previous.get("tensors", {}), **new.get("tensors", {})}
    attributes = {k: dict(v) for k, v in previous.get("attributes", {}).items()}
    for module, attrs in new.get("attributes", {}).items():
        attributes.setdefault(module, {}).update(attrs)
    out["attributes"] = attributes
    out["config"] = {**previous.get("config", {}), **new.get("config", {})}
    layers = {k: dict(v) for k, v in previous.get("layers", {}).items()}
    for stack, entry in new.get("layers", {}).items():
        if stack in layers:  # removed again: the new indices point into the earlier kept list
            earlier = layers[stack]["kept"]
            layers[stack] = {"kept": [earlier[i] for i in entry["kept"]], "total": layers[stack]["total"]}
        else:
            layers[stack] = dict(entry)
    if layers:
        out["layers"] = layers
    return out


def manifest_of(model: nn.Module) -> dict | None:
    """The manifest of a pruned (or loaded pruned) model, None for one never pruned; it lives
    in the model's :class:`slimkit.ModelInfo` (``pruning``)."""
    info = model_info(model)
    return info.pruning if info is not None else None


def set_manifest(model: nn.Module, manifest: dict) -> None:
    """Record ``manifest`` as the model's pruning manifest (convert, or loading a folder)."""
    model_info_of(model).pruning = manifest


def describe(model: nn.Module) -> dict | None:
    """The hub block for a pruned model (None when it was never pruned)."""
    manifest = manifest_of(model)
    return dict(manifest) if manifest else None


def forget_tensors(model: nn.Module, names: Iterable[str]) -> None:
    """Drop tensors from the manifest of a pruned ``model`` (no-op for one never pruned).

    ``names`` are tensors (``conv.weight_scale``) and modules (every tensor under them). For
    another method's own tensors that pruning sliced along with the weights (quantization's
    learned ``weight_scale`` and its quantizers) and that this method replaces at its convert:
    replayed on a freshly built model at load time they would name tensors that do not exist.
    """
    manifest = manifest_of(model)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        return
    names = set(names)
    prefixes = tuple(f"{n}." for n in names)
    manifest["tensors"] = {
        k: v for k, v in manifest["tensors"].items() if k not in names and not k.startswith(prefixes)
    }


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def rebuild(model: nn.Module, block: dict) -> nn.Module:
    """Give a freshly built base model the pruned structure recorded in ``block``."""
    block = manifest_checks.check_block(block, MANIFEST_FORMAT)  # types; FormatError naming the field
    if block.get("layers"):  # blocks first: the tensor names below are those after re-indexing
        from ..adapters import get_adapter
        from .blocks import replay_removal

        replay_removal(model, block["layers"], get_adapter(model))
    replaced: dict[int, torch.Tensor] = {}
    for name, shape in block.get("tensors", {}).items():
        module_name, attr = _split(name)
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            module = None
        old = getattr(module, attr, None) if module is not None else None
        if not isinstance(old, torch.Tensor):
            raise FormatError(
                f"config.json: the pruning manifest lists tensor {name!r}, which {type(model).__name__} "
                "does not have; the folder was written for another architecture"
            )
        if tuple(old.shape) == tuple(shape):
            continue
        manifest_checks.check_shape(name, old, shape)
        new = replaced.get(id(old))
        if new is None:
            empty = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
            new = nn.Parameter(empty, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else empty
            replaced[id(old)] = new
        if attr in module._parameters:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
    for module_name, attrs in block.get("attributes", {}).items():
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise FormatError(
                f"config.json: the pruning manifest names module {module_name!r}, which "
                f"{type(model).__name__} does not have"
            ) from None
        for attr, value in attrs.items():
            manifest_checks.set_size_attribute(module, module_name, attr, value)
    set_manifest(model, dict(block))
    return model


def validate(block: dict) -> None:
    """Type-check a ``pruning`` block alone (``slimkit info``); ``FormatError`` naming the field."""
    manifest_checks.check_block(block, MANIFEST_FORMAT)


def summary(block: dict) -> str:
    """One line for ``slimkit info``: tensors resized, heads per layer, blocks kept, config rewritten."""
    text = f"{len(block.get('tensors', {}))} tensors resized"
    if block.get("heads"):  # {attention module: [query heads, key/value heads]}
        counts = sorted({tuple(v) if isinstance(v, list) else (v,) for v in block["heads"].values()})
        text += ", heads per layer " + ", ".join("/".join(map(str, c)) for c in counts)
    for stack, entry in (block.get("layers") or {}).items():
        text += f", {stack}: {len(entry['kept'])} of {entry['total']} blocks kept"
    if block.get("config"):
        text += f", config rewritten: {', '.join(sorted(block['config']))}"
    return text
