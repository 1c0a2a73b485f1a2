"""Reading recipe files that may come from anywhere: bounded size, depth and alias expansion.

A recipe is a few hundred bytes of plain data, so anything far larger is refused before it
is parsed, and YAML's anchors and aliases are allowed only while the document they expand to
stays small: a 364-byte YAML "billion laughs" file (nested anchors, each alias repeated ten
times) would otherwise expand to hundreds of millions of nodes when the recipe is validated,
and its echo in an error message to megabytes. The expanded size is counted on the composed
node graph (aliases are shared nodes there, so counting is cheap and memoised) before any
Python object is constructed. JSON has no aliases; its depth is bounded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .json_bounds import exceeded_bound

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: real recipes are a few hundred bytes
MAX_NODES = 100_000  # scalars, lists and mappings after expanding every alias
MAX_DEPTH = 64  # nesting of lists / mappings


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters, for echoing user input in errors.

    Containers are summarised before ``repr`` so that a huge (or shared, alias-expanded)
    value is never rendered in full."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        kind = type(value).__name__
        return f"<{kind} of {len(value)} items>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:
        return f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_expanded_size(root: Any, where: str) -> int:
    """Nodes of the YAML node graph with every alias expanded (memoised; cycles refused)."""
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order walk: deep documents must not exhaust Python's stack.
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = list(node.value)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_NODES:
                raise ConfigError(
                    f"{where}: expands to more than {MAX_NODES:,} values (YAML anchors and aliases "
                    "nested inside each other); a recipe is a few dozen values, write it out plainly"
                )
            continue
        if key in sizes:
            continue
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; a recipe is a few levels deep")
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        if key in on_path:
            raise ConfigError(f"{where}: a YAML alias refers to a value that contains it (a recursive recipe)")
        on_path.add(key)
        stack.append((node, depth, True))
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        for child in children:
            if id(child) in on_path:
                raise ConfigError(f"{where}: a YAML alias refers to a value that contains it (a recursive recipe)")
            if id(child) not in sizes:
                stack.append((child, depth + 1, False))
    return sizes[id(root)]


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the expanded size and depth of the document bounded."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_expanded_size(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _json_depth_ok(value: Any, where: str) -> None:
    bound = exceeded_bound(value, MAX_DEPTH, MAX_NODES)
    if bound == "depth":
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; a recipe is a few levels deep")
    if bound == "values":
        raise ConfigError(f"{where}: holds more than {MAX_NODES:,} values; a recipe is a few dozen")


def read_recipe_file(path: Path) -> Any:
    """The plain data of a ``.yaml`` / ``.yml`` / ``.json`` recipe file, with bounded size."""
    where = f"recipe file {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{where}: use a .yaml, .yml or .json file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{where} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text ({exc})") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
            _json_depth_ok(data, where)
            return data
        return load_yaml(text, where)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; a recipe is a few levels deep") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and its subclasses
        message = short_repr(str(exc), 400)[1:-1] if len(str(exc)) > 400 else str(exc)
        raise ConfigError(f"{where} is not valid YAML: {message}") from None
