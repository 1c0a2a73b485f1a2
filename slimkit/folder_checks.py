"""Type checks of a folder's ``config.json`` before anything is built from it.

A folder may come from anyone. Valid JSON can still hold a list where a string belongs, a
negative shape, or nesting deep enough to exhaust Python's stack in a later copy; each such
value must be refused with a :class:`FormatError` that names the file and the field, never
reach the model code as a raw ``TypeError`` / ``KeyError`` / ``RecursionError``. The method
blocks (``pruning``, ``quantization``) check their own fields with the helpers below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FormatError
from .json_bounds import exceeded_bound
from .methods import hub_blocks
from .recipe_io import short_repr

MAX_CONFIG_DEPTH = 32  # transformers / timm configs nest a few levels (sub-configs, rope_scaling)
MAX_CONFIG_VALUES = 1_000_000
MAX_DIM = 1 << 31  # no tensor dimension (or size attribute) of a real model is larger
LIBRARIES = ("timm", "transformers", "torch")  # the libraries whose models a slimkit folder holds


def fail(file: Path | str, field: str, message: str) -> FormatError:
    return FormatError(f"{file}: {field} {message}")


def check_tree(config: Any, file: Path | str) -> None:
    """Bounded depth and size (iteratively: a deeply nested file must not hit the stack)."""
    bound = exceeded_bound(config, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES)
    if bound == "depth":
        raise FormatError(f"{file} is nested more than {MAX_CONFIG_DEPTH} levels deep; not a model config")
    if bound == "values":
        raise FormatError(f"{file} holds more than {MAX_CONFIG_VALUES:,} values; not a model config")


def is_count(value: Any, minimum: int = 0) -> bool:
    """A whole number in [minimum, MAX_DIM] (``True`` is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_DIM


def expect_mapping(value: Any, file: Path | str, field: str) -> dict:
    if not isinstance(value, dict):
        raise fail(file, field, f"must be a JSON object, got {short_repr(value)}")
    return value


def expect_str(value: Any, file: Path | str, field: str, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or len(value) > 1000:
        raise fail(file, field, f"must be a string, got {short_repr(value)}")
    if allowed is not None and value not in allowed:
        raise fail(file, field, f"must be one of {', '.join(map(repr, allowed))}, got {short_repr(value)}")
    return value


def expect_names(value: Any, file: Path | str, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(file, field, f"must be a list of module names, got {short_repr(value)}")
    return value


def expect_shape(value: Any, file: Path | str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(is_count(v) for v in value):
        raise fail(file, field, f"must be a list of whole numbers >= 0 (a tensor shape), got {short_repr(value)}")
    return value


def expect_format(block: dict, file: Path | str, field: str, newest: int) -> int:
    """A block's ``format``: an integer no newer than this slimkit reads (default ``newest``)."""
    version = block.get("format", newest)
    if not is_count(version, 1):
        raise fail(file, f"{field}.format", f"must be a whole number >= 1, got {short_repr(version)}")
    if version > newest:
        raise FormatError(
            f"{file}: the slimkit {field!r} block is format {version}, written by a newer slimkit (this one reads "
            f"up to {newest}); upgrade slimkit: pip install -U slimkit"
        )
    return version


_SHA = frozenset("0123456789abcdef")


def check_slimkit_block(block: Any, file: Path | str) -> dict[str, Any]:
    """The top-level fields of the ``"slimkit"`` block (method blocks check their own)."""
    block = expect_mapping(block, file, "'slimkit'")
    version = block.get("format_version")
    if not is_count(version, 1):
        raise fail(file, "slimkit.format_version", f"must be a whole number >= 1, got {short_repr(version)}")
    if "version" in block and not isinstance(block["version"], str):
        raise fail(file, "slimkit.version", f"must be a string, got {short_repr(block['version'])}")
    if "library" in block:
        expect_str(block["library"], file, "slimkit.library", LIBRARIES)
    if "class" in block:
        expect_str(block["class"], file, "slimkit.class")
    sha = block.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _SHA):
        raise fail(file, "slimkit.weights_sha256", f"must be 64 lowercase hex digits, got {short_repr(sha)}")
    for name in ("recipe", "report", *(method.name for method in hub_blocks())):
        if name in block:
            expect_mapping(block[name], file, f"slimkit.{name}")
    return block


def library_of(config: dict[str, Any], file: Path | str) -> str:
    """Which library wrote this ``config.json`` (``"transformers"``, ``"timm"`` or ``"torch"``):
    the one place slimkit decides it (``from_pretrained``, ``build_architecture``, ``slimkit
    info`` and the model card all ask here). The slimkit block says; a plain folder is told by
    its keys: transformers' ``model_type``, timm's ``architecture``. Anything else is a
    ``FormatError`` naming ``file``."""
    block = config.get("slimkit")
    if isinstance(block, dict) and "library" in block:
        return expect_str(block["library"], file, "slimkit.library", LIBRARIES)
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    raise FormatError(f"{file} holds neither a transformers config ('model_type') nor a timm config ('architecture')")


def architecture_of(config: dict[str, Any]) -> str | None:
    """The model's architecture name in a config: timm's ``architecture``, or the first of
    transformers' ``architectures`` (None when neither is a string)."""
    name = config.get("architecture")
    if isinstance(name, str):
        return name
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return None
