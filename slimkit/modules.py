"""Finding modules by qualified name or pattern, with helpful errors.

Recipes name modules by their qualified names (``encoder.layer.3.attention``) or fnmatch
patterns (``blocks.*.mlp.fc1``); never by object. Everything slimkit attaches to a model
lives under one child named :data:`SLIMKIT_ATTR`, which the helpers here skip.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator

from torch import nn

from .errors import ModuleNameError, close_matches

SLIMKIT_ATTR = "slimkit"  # the child module that holds projectors and training state


def attached_by_slimkit(name: str) -> bool:
    """A module, parameter or state_dict name inside the :data:`SLIMKIT_ATTR` child."""
    return name == SLIMKIT_ATTR or name.startswith(SLIMKIT_ATTR + ".")


def user_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without what slimkit attached."""
    for name, module in model.named_modules():
        if not attached_by_slimkit(name):
            yield name, module


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in user_named_modules(model) if name]


def _missing(model: nn.Module, name: str, role: str) -> ModuleNameError:
    names = module_names(model)
    hits = close_matches(name, names)
    hint = f" Close matches: {', '.join(hits)}." if hits else ""
    return ModuleNameError(
        f"{role}module {name!r} is not in {type(model).__name__}.{hint} "
        f"List the names with [n for n, _ in model.named_modules()]."
    )


def get_module(model: nn.Module, name: str, role: str = "") -> nn.Module:
    """The submodule called ``name``; a ModuleNameError lists close matches when it is missing."""
    if name in ("", "."):
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _missing(model, name, role) from None


def match_modules(model: nn.Module, pattern: str, role: str = "", required: bool = True) -> list[str]:
    """Module names matching an exact name or an fnmatch pattern (``*`` spans dots)."""
    names = module_names(model)
    if not any(ch in pattern for ch in "*?["):
        if pattern in names:
            return [pattern]
    else:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if hits:
            return hits
    if required:
        raise _missing(model, pattern, role)
    return []


def indexed_layers(model: nn.Module, pattern: str, role: str = "") -> dict[int, str]:
    """Expand a name with one ``*`` standing for an integer layer index.

    ``encoder.layer.*.attention`` -> {0: 'encoder.layer.0.attention', 1: ...}.
    """
    head, _, tail = pattern.partition("*")
    regex = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\Z")
    found = {}
    for name in module_names(model):
        m = regex.match(name)
        if m:
            found[int(m.group(1))] = name
    if not found:
        raise _missing(model, pattern.replace("*", "0"), role)
    return dict(sorted(found.items()))


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when ``name`` equals or fnmatches one of ``patterns``, or lies inside a named module."""
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)
