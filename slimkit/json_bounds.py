"""One walker for the size of nested JSON-like data read from untrusted files.

Recipes (``recipe_io``) and saved folders' ``config.json`` (``folder_checks``) both refuse data
nested too deeply or holding too many values before anything else touches it: a later
recursive copy or ``repr`` of a 100,000-level list would exhaust Python's stack. The walk is
iterative for the same reason.
"""

from __future__ import annotations

from typing import Any, Literal


def exceeded_bound(value: Any, max_depth: int, max_values: int) -> Literal["depth", "values"] | None:
    """Which bound nested lists / dicts in ``value`` break first: ``"depth"`` (more than
    ``max_depth`` levels, the top level being 1), ``"values"`` (more than ``max_values``
    values, containers included), or None when within both."""
    stack, count = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > max_depth:
            return "depth"
        if count > max_values:
            return "values"
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None
