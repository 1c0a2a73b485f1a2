"""One small error hierarchy. Every error is a ``ValueError`` so that callers catching the
builtin keep working; messages name the field, module or file and say how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlimkitError(ValueError):
    """Base class of every error slimkit raises for bad input."""


class ConfigError(SlimkitError):
    """A recipe field is unknown or out of range."""


class ModuleNameError(SlimkitError):
    """A module name (or pattern) in a recipe does not exist in the model."""


class IncompatibleError(SlimkitError):
    """Two things that must fit together do not (feature shapes, coupled layers, method order)."""


class UnsupportedModelError(SlimkitError):
    """No adapter knows this model, or it lacks something a method needs."""


class FormatError(SlimkitError):
    """A saved folder is missing a file, is corrupt, or was written by a newer slimkit."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates nearest to ``name``, best first (for 'did you mean' hints)."""
    candidates = list(candidates)
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not hits:
        # Fall back to a substring match on the last path component: 'layer.3' -> 'encoder.layer.3'.
        tail = name.rsplit(".", 1)[-1]
        hits = [c for c in candidates if tail and tail in c][:n]
    return hits


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    hits = close_matches(name, candidates, n=1)
    return f" Did you mean {hits[0]!r}?" if hits else ""


class NonFiniteError(SlimkitError):
    """A number that must be finite (an input, a range, a scale) is NaN or infinite."""


class CalibrationError(SlimkitError):
    """Calibration data too degenerate to set quantization ranges (constant, or all zero)."""
