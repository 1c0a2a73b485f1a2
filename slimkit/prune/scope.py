"""Which modules pruning may touch: ``prune.exclude``, ``prune.include`` and the adapter's defaults."""

from __future__ import annotations

import logging

from torch import nn

from ..adapters import ModelAdapter
from ..modules import match_modules, matches_any, user_named_modules
from ..recipe import PruneConfig

logger = logging.getLogger("slimkit")


def pruned_scope(model: nn.Module, adapter: ModelAdapter, config: PruneConfig) -> tuple[set[str], set[str] | None]:
    """(modules whose outputs are never pruned, modules that alone are pruned or None for all).

    Excluded: ``exclude``, plus the adapter's defaults (classifier, stem, pooler, ...) unless
    ``include`` names them. With ``include``, only the included modules (and what lies inside
    them) are pruned. Every entry must name a module (``ModuleNameError`` with close matches)."""
    names = [name for name, _ in user_named_modules(model) if name]
    for pattern in config.include:
        match_modules(model, pattern, role="prune.include: ")
    for pattern in config.exclude:
        match_modules(model, pattern, role="prune.exclude: ")
    defaults = adapter.prune_exclusions(model)
    included = None
    if config.include:
        included = {n for n in names if matches_any(n, config.include)}
        defaults = [d for d in defaults if d not in included]
    elif type(adapter).__name__ == "TorchAdapter" and defaults:
        logger.info(
            "prune: no adapter knows %s; excluding %s by default (classifier and stem guesses). "
            "Name other modules to keep in prune.exclude, or the ones to prune in prune.include.",
            type(model).__name__,
            defaults,
        )
    patterns = [*defaults, *config.exclude]
    return {n for n in names if matches_any(n, patterns)}, included
