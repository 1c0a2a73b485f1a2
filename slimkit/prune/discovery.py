"""Which units a model has to prune, found once at ``prepare``: attention-head groups (from the
adapter's head layouts), channel / MLP-neuron groups (from the traced dependency graph) and the
layers whose weights get unstructured / N:M masks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..adapters import HeadLayout
from ..errors import ConfigError, UnsupportedModelError
from ..modules import user_named_modules
from ..recipe import PruneConfig
from .checks import check_round_to, nm_message
from .graph import channel_groups
from .heads import head_group, tie_groups
from .sparse import input_dim
from .units import UnitGroup, is_transposed_linear

logger = logging.getLogger("slimkit")


def find_head_groups(
    model: nn.Module, layouts: list[HeadLayout], excluded: set[str], included: set[str] | None
) -> list[UnitGroup]:
    """The head groups to prune: one per attention layer the adapter found (``layouts``) that
    is neither excluded nor outside ``included``; layers sharing per-head modules are tied."""
    if not layouts:
        candidates = [
            n
            for n, m in user_named_modules(model)
            if n and ("attn" in n.rsplit(".", 1)[-1].lower() or "attention" in type(m).__name__.lower())
        ]
        raise UnsupportedModelError(
            f"prune.heads: slimkit knows no attention heads in {type(model).__name__}. It prunes the "
            "heads of timm ViT-style Attention (fused qkv) and of Hugging Face BERT / ViT / GPT-2 / "
            "Llama-style attention. "
            + (
                f"Modules that look like attention here: {candidates[:6]}; "
                if candidates
                else "No module here looks like attention; "
            )
            + "set prune.heads: 0 (MLP neurons and channels are still pruned with prune.channels)."
        )
    groups = []

    def left_whole(layout) -> bool:
        projections = [m for m, _ in (*layout.query, *layout.key_value, *layout.output)]
        if any(n in excluded for n in (layout.name, *projections)):
            return True
        return included is not None and not any(n in included for n in (layout.name, *projections))

    # Layers that share per-head modules (MPNet's position bias) lose the same heads, so
    # leaving one of them whole leaves them all whole.
    whole = {s for layout in layouts if left_whole(layout) for s in layout.shared}
    for layout in layouts:
        if left_whole(layout) or whole.intersection(layout.shared):
            continue
        if layout.unsupported:
            raise UnsupportedModelError(
                f"prune.heads: cannot remove heads of {layout.name!r} exactly: {layout.unsupported}. "
                f"Add it to prune.exclude (exclude: [{layout.name!r}]) or set prune.heads: 0."
            )
        if layout.num_kv_heads > 1:
            groups.append(head_group(layout))
    return tie_groups(groups)


def find_channel_groups(
    model: nn.Module,
    inputs: object,
    layouts: list[HeadLayout],
    transposed: dict[type, tuple[str, str]],
    excluded: set[str],
    included: set[str] | None,
    round_to: int | None,
) -> tuple[list[UnitGroup], dict[str, str]]:
    """The channel / MLP-neuron groups traced from the model's dependency graph on ``inputs``
    (attention projections are left to head pruning), and the group roots left whole with why.
    Call it with the controller's hooks suspended."""
    attention = {m for layout in layouts for m, _ in (*layout.query, *layout.key_value, *layout.output)}
    names = {}
    for name, module in user_named_modules(model):
        names.setdefault(module, name)
    groups, skipped = channel_groups(
        model,
        inputs,
        names=names,
        transposed=transposed,
        attention=attention,
        attention_outputs={m for layout in layouts for m, _ in layout.output},
        excluded=excluded,
        included=included,
    )
    groups = [g for g in groups if g.size > g.min_keep]
    if not groups:
        reasons = "; ".join(f"{root}: {why}" for root, why in list(skipped.items())[:6])
        raise UnsupportedModelError(
            f"prune.channels: {type(model).__name__} has no channel group slimkit can prune "
            f"exactly ({reasons or 'no conv / linear layer was traced'}). Set prune.channels: 0, "
            "or remove modules from prune.exclude (or name them in prune.include)."
        )
    check_round_to(groups, round_to)
    return groups, skipped


def find_sparse_weights(
    model: nn.Module,
    cfg: PruneConfig,
    excluded: set[str],
    included: set[str] | None,
    transposed: dict[type, tuple[str, str]],
) -> tuple[list[str], list[torch.Size]]:
    """The layers whose weights get unstructured / N:M keep masks, and their weight shapes
    (N:M: layers whose input size is not a multiple of M stay dense)."""
    if not cfg.sparsity and not cfg.nm:
        return [], []
    names, shapes, widths = [], [], set()
    for name, module in user_named_modules(model):
        if name in excluded or isinstance(module, nn.Embedding):
            continue
        if included is not None and name not in included:
            continue
        is_layer = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_transposed_linear(module, transposed)
        weight = getattr(module, "weight", None)
        if not is_layer or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        widths.add(int(weight.shape[input_dim(module, transposed)]))
        if cfg.nm and weight.shape[input_dim(module, transposed)] % int(cfg.nm.split(":")[1]):
            logger.info("prune.nm: %s stays dense (its input size is not a multiple of M)", name)
            continue
        names.append(name)
        shapes.append(weight.shape)
    if not shapes and cfg.nm and widths:
        raise ConfigError(nm_message(cfg.nm, widths))
    if not shapes:
        raise UnsupportedModelError(
            f"prune: {type(model).__name__} has no linear / conv weight left for "
            f"{'prune.nm' if cfg.nm else 'prune.sparsity'} after prune.exclude"
        )
    return names, shapes
