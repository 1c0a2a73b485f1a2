"""The ``quantization`` block of a saved folder, and the rebuild from it.

``config.json``'s ``slimkit.quantization`` (format 2; format 1 folders still load) holds:

* ``layers``: every INT8 layer: ``kind`` (conv2d / linear / conv1d), ``activations`` (static or
  dynamic) and, when its input comes quantized from a site, ``"input": "site"``;
* ``sites``: every activation site between layers (:mod:`slimkit.quant.sites`), module name ->
  ``"output"`` or ``"input"``, with its qparams in ``<module>.<where>_scale`` / ``_zero_point``;
* ``folded_batchnorms``: every BatchNorm folded away (``identity``, ``remainder`` or ``frozen``);
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
from . import fold
from .hub_checks import check_block
from .runtime import COMPILE_MODES, install, runtime_of
from .targets import EmbeddingTarget, LayerTarget, SiteTarget

BLOCK_FORMAT = 3


def describe(model: nn.Module) -> dict | None:
    modules = list(user_named_modules(model))
    layers = LayerTarget.describe(modules)
    embeddings = EmbeddingTarget.describe(modules)
    if not layers["layers"] and not embeddings:
        return None
    return {
        "format": 3 if embeddings else 2,
        "backend": "onednn",
        "weights": "int8, symmetric, per output channel (weight, weight_scale)",
        "activations": "uint8, per tensor, affine (input_scale, input_zero_point) or dynamic per batch",
        **layers,
        **SiteTarget.describe(modules),
        "folded_batchnorms": fold.folded_batchnorms(model),
        "compile": runtime.mode if (runtime := runtime_of(model)) is not None else "auto",
        **embeddings,
    }


def rebuild(model: nn.Module, block: dict) -> nn.Module:
    block = check_block(block, BLOCK_FORMAT)  # field types; FormatError naming the field
    fold.rebuild(model, block.get("folded_batchnorms", {}))  # first: sites may sit on their Identity
    for kind in (LayerTarget, SiteTarget, EmbeddingTarget):
        kind.rebuild(model, block)
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
