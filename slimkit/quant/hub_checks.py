"""Checks of a folder's ``quantization`` block and of the INT8 values it loads.

The block's fields must have the types slimkit writes before any layer is changed; after the
weights are loaded, every scale must be finite and positive and every activation zero-point
a uint8 value (0..255): a NaN, infinite, zero or negative scale would turn every output into
NaN or into plausible garbage after the next uint8 rounding, and an out-of-range zero-point
wraps around. The dtypes (int8 weights, int32 zero-points) were already checked against the
safetensors header, so a float tensor is never cast into an int8 one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FormatError
from ..folder_checks import expect_format, expect_mapping, expect_names, expect_str
from ..recipe_io import short_repr
from .numerics import ACT_QMAX, ACT_QMIN

WHERE = "config.json"
_KINDS = ("conv2d", "linear", "conv1d")


def saved_module(model: nn.Module, name: str, what: str) -> nn.Module:
    """The module a folder's ``quantization`` block names (``what``: layer, site, BatchNorm, ...)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FormatError(
            f"config.json: the quantization block names {what} {name!r}, which {type(model).__name__} does "
            "not have; the folder was written for another architecture"
        ) from None


def check_block(block: Any, newest: int) -> dict:
    block = expect_mapping(block, WHERE, "slimkit.quantization")
    expect_format(block, WHERE, "quantization", newest)
    for name, info in expect_mapping(block.get("layers", {}), WHERE, "slimkit.quantization.layers").items():
        field = f"slimkit.quantization.layers[{short_repr(name)}]"
        info = expect_mapping(info, WHERE, field)
        expect_str(info.get("kind"), WHERE, f"{field}.kind", _KINDS)
        expect_str(info.get("activations", "static"), WHERE, f"{field}.activations", ("static", "dynamic"))
        if "input" in info:
            expect_str(info["input"], WHERE, f"{field}.input", ("site",))
    for name, where in expect_mapping(block.get("sites", {}), WHERE, "slimkit.quantization.sites").items():
        expect_str(where, WHERE, f"slimkit.quantization.sites[{short_repr(name)}]", ("output", "input", "gate"))
    expect_names(block.get("sites_read_by_layers_only", []), WHERE, "slimkit.quantization.sites_read_by_layers_only")
    folded = expect_mapping(block.get("folded_batchnorms", {}), WHERE, "slimkit.quantization.folded_batchnorms")
    for name, how in folded.items():
        expect_str(
            how,
            WHERE,
            f"slimkit.quantization.folded_batchnorms[{short_repr(name)}]",
            ("identity", "remainder", "frozen"),
        )
    expect_names(block.get("embeddings", []), WHERE, "slimkit.quantization.embeddings")
    return block


def _check_values(file: Path, name: str, module: nn.Module) -> None:
    for attr, tensor in module.named_buffers(recurse=False):
        key = f"{name}.{attr}" if name else attr
        if attr.endswith("_scale"):
            if not torch.isfinite(tensor).all():
                raise FormatError(f"{file}: {key} holds non-finite scales (NaN or inf); the folder is corrupt")
            if not (tensor > 0).all():
                raise FormatError(f"{file}: {key} holds zero or negative scales; quantization scales are > 0")
        elif attr.endswith("_zero_point") and attr not in module._non_persistent_buffers_set:
            if ((tensor < ACT_QMIN) | (tensor > ACT_QMAX)).any():
                raise FormatError(
                    f"{file}: {key} holds zero-points outside the uint8 range {ACT_QMIN}..{ACT_QMAX}; the folder "
                    "is corrupt"
                )
        elif attr == "bias" and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FormatError(f"{file}: {key} holds non-finite values (NaN or inf); the folder is corrupt")


def check_loaded(model: nn.Module, file: Path) -> None:
    """The loaded INT8 layers', sites' and embeddings' scales and zero-points are usable."""
    from . import embeddings as qemb
    from . import sites
    from .int8 import is_int8_layer

    for name, module in model.named_modules():
        if is_int8_layer(module) or sites.site_of(module) or qemb.is_int8_embedding(module):
            _check_values(file, name, module)
