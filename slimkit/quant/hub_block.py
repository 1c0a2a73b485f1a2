"""The ``quantization`` block of a saved folder, and the rebuild from it.

``config.json``'s ``slimkit.quantization`` (format 2; format 1 folders still load) holds:

* ``layers``: every INT8 layer: ``kind`` (conv2d / linear / conv1d), ``activations`` (static or
  dynamic) and, when its input comes quantized from a site, ``"input": "site"``;
* ``sites``: every activation site between layers (:mod:`slimkit.quant.sites`), module name ->
  ``"output"`` or ``"input"``, with its qparams in ``<module>.<where>_scale`` / ``_zero_point``;
* ``folded_batchnorms``: every BatchNorm folded away (``identity`` or ``frozen``);
* ``embeddings`` (format 3, only when there are any): the names of the weight-only INT8
  embeddings (``quant.embeddings``), int8 ``weight`` and per-row ``weight_scale``. Folders
  without INT8 embeddings are still written as format 2, which older slimkit versions read;
  a folder with them is format 3, which older versions refuse instead of loading an int8 table
  into a float embedding.

``from_pretrained`` builds the float model, replays pruning, then gives each listed layer the
INT8 structure (int8 weight, scales, bias, input qparams as empty tensors of the right shapes)
and each site its qparam buffers before the weights are loaded with strict shape checks.
Nothing is unpickled: the int8 weights and scales are plain safetensors tensors.
"""

from __future__ import annotations

from torch import nn

from ..errors import FormatError
from ..modules import user_named_modules
from . import embeddings as qemb
from . import sites
from .hub_checks import check_block
from .int8 import DYNAMIC_ATTR, FROM_SITE_ATTR, INT8_KIND_ATTR, empty_int8_like, is_int8_layer
from .layers import layer_kind
from .quantizer import FOLDED_ATTR, neutralize_batchnorm
from .runtime import COMPILE_MODES, install, runtime_of

BLOCK_FORMAT = 3


def _layer_entry(module: nn.Module) -> dict:
    entry = {
        "kind": module.__dict__[INT8_KIND_ATTR],
        "activations": "dynamic" if module.__dict__.get(DYNAMIC_ATTR) else "static",
    }
    if module.__dict__.get(FROM_SITE_ATTR):
        entry["input"] = "site"
    return entry


def describe(model: nn.Module) -> dict | None:
    modules = list(user_named_modules(model))
    layers = {name: _layer_entry(module) for name, module in modules if is_int8_layer(module)}
    embeddings = [name for name, module in modules if qemb.is_int8_embedding(module)]
    if not layers and not embeddings:
        return None
    block = {
        "format": 3 if embeddings else 2,
        "backend": "onednn",
        "weights": "int8, symmetric, per output channel (weight, weight_scale)",
        "activations": "uint8, per tensor, affine (input_scale, input_zero_point) or dynamic per batch",
        "layers": layers,
        "sites": {name: sites.site_of(module) for name, module in modules if sites.site_of(module)},
        "sites_read_by_layers_only": [name for name, module in modules if sites.read_by_layers_only(module)],
        "folded_batchnorms": dict(model.__dict__.get(FOLDED_ATTR, {})),
        "compile": runtime.mode if (runtime := runtime_of(model)) is not None else "auto",
    }
    if embeddings:
        block["embeddings"] = embeddings
        block["embedding_weights"] = "int8, symmetric, per row (weight, weight_scale), weight-only"
    return block


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FormatError(
            f"config.json: the quantization block names {what} {name!r}, which {type(model).__name__} does "
            "not have; the folder was written for another architecture"
        ) from None


def rebuild(model: nn.Module, block: dict) -> nn.Module:
    block = check_block(block, BLOCK_FORMAT)  # field types; FormatError naming the field
    folded = block.get("folded_batchnorms", {})
    for name, how in folded.items():
        bn = _module(model, name, "BatchNorm")
        if how == "identity":
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
        elif how == "frozen":
            neutralize_batchnorm(bn)
        else:
            raise FormatError(f"config.json: unknown folded BatchNorm form {how!r} for {name!r}")
    for name, info in block.get("layers", {}).items():
        layer = _module(model, name, "layer")
        kind = info.get("kind")
        if layer_kind(layer) != kind:
            raise FormatError(
                f"config.json: quantized layer {name!r} is a {kind} in the folder but a "
                f"{type(layer).__name__} in the rebuilt {type(model).__name__}"
            )
        empty_int8_like(
            layer, kind, dynamic=info.get("activations") == "dynamic", input_from_site=info.get("input") == "site"
        )
    for name, where in block.get("sites", {}).items():
        if where not in ("output", "input"):
            raise FormatError(f"config.json: unknown site position {where!r} for {name!r} (output or input)")
        layers_only = name in block.get("sites_read_by_layers_only", ())
        sites.install_int8(_module(model, name, "site"), where, 1.0, 0, read_by_layers_only=layers_only)
    for name in block.get("embeddings", ()):
        embedding = _module(model, name, "embedding")
        if not isinstance(embedding, nn.Embedding):
            raise FormatError(
                f"config.json: quantized embedding {name!r} is a {type(embedding).__name__} in the rebuilt "
                f"{type(model).__name__}, not an nn.Embedding"
            )
        qemb.empty_int8_like(embedding)
    model.__dict__[FOLDED_ATTR] = dict(folded)
    mode = block.get("compile", "auto")  # folders written before quant.compile: the default
    if mode not in COMPILE_MODES:
        raise FormatError(f"config.json: quantization.compile is {mode!r}, expected one of {', '.join(COMPILE_MODES)}")
    install(model, mode)
    return model


__all__ = ["describe", "rebuild"]


def validate(block: dict) -> None:
    """Type-check a ``quantization`` block alone (``slimkit info``); ``FormatError`` naming the field."""
    check_block(block, BLOCK_FORMAT)


def summary(block: dict) -> str:
    """One line for ``slimkit info``: INT8 layers and their kernels, folded BatchNorms, INT8 embeddings."""
    text = f"{len(block.get('layers', {}))} int8 layers ({block.get('backend', '?')} kernels)"
    if block.get("folded_batchnorms"):
        text += f", {len(block['folded_batchnorms'])} BatchNorms folded"
    if block.get("embeddings"):
        text += f", {len(block['embeddings'])} int8 embeddings (weight-only)"
    return text
