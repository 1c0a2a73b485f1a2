"""Teachers and students for a training script: a hub-style folder or a timm model name, and
what kind of inputs the model takes (images or tokens).

Used by :mod:`slimkit.plugins.distill_run` (``scripts/distill.py``); a timm name builds a model
with random weights (never downloaded), handy for trying a recipe out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

import slimkit
from slimkit.adapters import get_adapter
from slimkit.errors import SlimkitError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_model(spec: str, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """A hub-style folder (``slimkit.from_pretrained``), or a timm model name built with random
    weights, sized by ``num_classes`` / ``in_chans`` where given (folders keep their own)."""
    if Path(spec).is_dir():
        return slimkit.from_pretrained(spec)
    import timm

    if not timm.is_model(spec):
        raise SlimkitError(
            f"{spec!r} is neither a folder nor a timm model name; pass a hub-style folder "
            "(config.json + model.safetensors) or a name from timm.list_models()"
        )
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return timm.create_model(spec, pretrained=False, **kwargs)


def input_kind(model: nn.Module) -> str:
    """``"text"`` for models called with ``input_ids`` (transformers' ``main_input_name``), else
    ``"image"``."""
    return "text" if getattr(model, "main_input_name", None) == "input_ids" else "image"


def image_geometry(model: nn.Module, default_size: int) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) the model expects; models that take any size get ``default_size``."""
    example = get_adapter(model).example_inputs(model, batch_size=1)
    pixels = example["pixel_values"] if isinstance(example, dict) else example
    fixed = getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False) or isinstance(example, dict)
    size = tuple(pixels.shape[-2:]) if fixed else (default_size, default_size)
    return pixels.shape[1], size


def load_tokenizer(*folders: str) -> tuple[Any, str]:
    """The tokenizer of the first folder that has tokenizer files, and that folder (local files
    only); a clear error naming the folders when none has them."""
    from transformers import AutoTokenizer

    for folder in folders:
        if Path(folder).is_dir() and any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True), folder
    raise SlimkitError(f"no tokenizer files (tokenizer.json / vocab.txt) in {list(folders)}; add them to a folder")
