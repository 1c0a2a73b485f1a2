"""Which modules a ``quant`` recipe quantizes, and the error naming those it cannot."""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from ..adapters import ModelAdapter
from ..errors import UnsupportedModelError
from ..modules import match_modules, matches_any, user_named_modules
from ..recipe import QuantConfig
from . import embeddings as qemb
from .layers import layer_kind, unsupported_reason

logger = logging.getLogger("slimkit")


@dataclasses.dataclass
class Selection:
    kinds: dict[str, str]  # module name -> conv2d | linear | conv1d | embedding
    skipped_tied: list[str]  # layers kept in float because another module owns their weight too


def _pattern_for(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def exclude_hint(names: list[str]) -> str:
    patterns = sorted({_pattern_for(n) for n in names})
    shown = patterns if len(patterns) < len(names) else names
    return "quant.exclude: [" + ", ".join(f'"{n}"' for n in shown[:8]) + (", ..." if len(shown) > 8 else "") + "]"


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of weight Parameters that more than one module owns (tied embeddings / heads)."""
    owners: dict[int, int] = {}
    for _, module in user_named_modules(model):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return {k for k, v in owners.items() if v > 1}


def select_layers(model: nn.Module, cfg: QuantConfig, adapter: ModelAdapter) -> Selection:
    """What ``cfg`` quantizes in ``model`` (the family's defaults from ``adapter``: int8
    embeddings, layers kept in float); raises :class:`UnsupportedModelError` naming the layers
    it cannot quantize."""
    skipped_tied: list[str] = []
    kept_float = adapter.float_layers(model)
    for name, reason in kept_float.items():
        logger.info("quant: keeping %s in float: %s", name, reason)
    for pattern in cfg.exclude:
        match_modules(model, pattern, role="quant.exclude: ")
    tied = _tied_weights(model)
    dynamic = cfg.mode == "dynamic"
    # null: the family's default (on for transformers models, where the embedding table is up to
    # half of the weights); an embedding that cannot be int8 then stays float instead of an error
    auto_embeddings = cfg.embeddings is None
    embeddings = adapter.int8_embeddings_by_default() if auto_embeddings else cfg.embeddings
    selected: dict[str, str] = {}
    problems: list[tuple[str, nn.Module, str]] = []
    blocked: list[str] = []
    for name, module in user_named_modules(model):
        if not name or name in kept_float or matches_any(name, cfg.exclude) or matches_any(name, blocked):
            continue
        kind = layer_kind(module)
        if kind is None and embeddings and isinstance(module, nn.Embedding):
            reason = qemb.embedding_problem(module)
            if reason is not None and auto_embeddings:
                logger.info("quant: keeping embedding %s in float: %s", name, reason)
            elif reason is not None:
                problems.append((name, module, reason))
                blocked.append(name)
            elif id(module._parameters.get("weight")) in tied:
                skipped_tied.append(name)
            else:
                selected[name] = "embedding"
            continue
        if kind is None:
            reason = unsupported_reason(module)
            relevant = reason is not None and not (dynamic and isinstance(module, nn.modules.conv._ConvNd))
            if relevant:
                problems.append((name, module, reason))
                blocked.append(name)
            continue
        if dynamic and kind == "conv2d":
            continue  # dynamic INT8 is for Linear layers; convolutions stay in float
        if id(module._parameters.get("weight")) in tied:
            skipped_tied.append(name)
            continue
        selected[name] = kind
    if problems:
        lines = "\n".join(f"  - {n} ({type(m).__name__}): {r}" for n, m, r in problems)
        raise UnsupportedModelError(
            f"quant: {len(problems)} layer(s) of {type(model).__name__} cannot be quantized:\n{lines}\n"
            f"Keep them in floating point with {exclude_hint([n for n, _, _ in problems])} "
            "(names or fnmatch patterns; a module's children are excluded with it)."
        )
    if not any(kind != "embedding" for kind in selected.values()):
        raise UnsupportedModelError(
            f"quant: {type(model).__name__} has no layer to quantize (Conv2d, Linear or a transposed Linear"
            + (", Linear only in mode: dynamic" if dynamic else "")
            + f"{' after quant.exclude' if cfg.exclude else ''})."
        )
    if skipped_tied:
        logger.info("quant: keeping layers with tied weights in float: %s", skipped_tied)
    return Selection(selected, skipped_tied)
