"""Whole blocks as pruning units (depth pruning): which blocks, how they are skipped, how removed.

The adapters name the stacks of blocks (:class:`~slimkit.adapters.BlockStack`: the transformer
layers of an HF model, timm's ``blocks``, a ResNet stage's blocks without a downsample). A
forward pass over the example inputs then checks that every candidate really keeps its input's
shape. While training, a removed block becomes an identity: its forward hook returns the
block's input in place of its output (``torch.where``, so the block's parameters stay in the
autograd graph with zero gradients and DDP sees every parameter used). At ``convert`` the
blocks leave their ``ModuleList`` / ``Sequential``, which is re-indexed in place, and the
adapter rewrites what counts layers (``num_hidden_layers``, ``layer_types``, ``layer_idx``).
Skipping a block and removing it give the same outputs; :func:`check_removal` verifies it on
a copy of the model at ``prepare``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import BlockStack, ModelAdapter
from ..errors import IncompatibleError, UnsupportedModelError
from ..modules import get_module


@dataclass(frozen=True)
class Block:
    """One removable block: entry ``index`` of the stack ``stack``."""

    stack: str
    index: int
    channel_dim: int

    @property
    def name(self) -> str:
        return f"{self.stack}.{self.index}" if self.stack else str(self.index)


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The stream a block reads: its first tensor argument (HF layers: ``hidden_states``)."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for key in ("hidden_states", "x", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def hidden_output(output: Any) -> torch.Tensor | None:
    """The stream a block returns: the output itself, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its stream replaced (the other items, e.g. attention weights, kept)."""
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


def skipped(output: Any, hidden_in: torch.Tensor) -> Any:
    """The block's output as if the block were not there: its input, still connected to the
    block's parameters (zero gradients), so that DDP finds every parameter used."""
    out = hidden_output(output)
    keep = torch.zeros((), dtype=torch.bool, device=hidden_in.device)
    return replace_hidden(output, torch.where(keep, out, hidden_in))


def find_blocks(
    model: nn.Module,
    adapter: ModelAdapter,
    inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    exclude: Callable[[str], bool],
) -> tuple[list[Block], list[BlockStack]]:
    """The removable blocks of ``model`` (those whose stream keeps its shape on ``inputs``)."""
    stacks = adapter.block_stacks(model)
    problems = [f"{s.name}: {s.unsupported}" for s in stacks if s.unsupported]
    stacks = [s for s in stacks if not s.unsupported]
    if not stacks:
        why = "; ".join(problems) or (
            "slimkit knows the blocks of Hugging Face transformers (the ModuleList of config.num_hidden_layers "
            "layers) and of timm ViTs, ResNets, ConvNeXts, EfficientNets and GhostNets"
        )
        raise UnsupportedModelError(
            f"prune.layers: slimkit finds no removable blocks in {type(model).__name__} ({why}). "
            "Set prune.layers: 0 (channels and heads are still pruned)."
        )
    candidates = [Block(s.name, i, s.channel_dim) for s in stacks for i in s.removable if not exclude(f"{s.name}.{i}")]
    shapes: dict[Block, tuple] = {}

    def probe(block: Block):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x, y = hidden_input(args, kwargs), hidden_output(output)
            ok = x is not None and y is not None and x.shape == y.shape
            shapes[block] = shapes.get(block, ()) + (ok,)

        return hook

    handles = [_block(model, b).register_forward_hook(probe(b), with_kwargs=True) for b in candidates]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    # A block never called, called twice (shared) or changing the stream's shape is left alone.
    return [b for b in candidates if shapes.get(b) == (True,)], stacks


def _block(model: nn.Module, block: Block) -> nn.Module:
    container = get_module(model, block.stack)
    return list(container.children())[block.index]


def block_module(model: nn.Module, block: Block) -> nn.Module:
    """The module of ``block`` in the (not yet converted) model."""
    return _block(model, block)


def remove_blocks(
    model: nn.Module, stacks: list[BlockStack], removed: set[Block], adapter: ModelAdapter
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Drop ``removed`` from their stacks (re-indexed in place) and let the adapter rewrite the
    rest; returns the manifest entry ``{stack: {"kept": [old indices], "total": old size}}`` and
    the config fields the adapter rewrote."""
    kept: dict[str, dict[str, Any]] = {}
    for stack in stacks:
        gone = {b.index for b in removed if b.stack == stack.name}
        if not gone:
            continue
        container = get_module(model, stack.name)
        children = list(container._modules.items())
        indices = [i for i in range(len(children)) if i not in gone]
        container._modules.clear()
        for new, old in enumerate(indices):
            container._modules[str(new)] = children[old][1]
        kept[stack.name] = {"kept": indices, "total": len(children)}
    fields = adapter.after_depth_pruning(model, kept) if kept else {}
    return kept, fields


def replay_removal(model: nn.Module, layers: dict[str, dict[str, Any]], adapter: ModelAdapter) -> None:
    """Give a freshly built model the depth recorded in a manifest (``remove_blocks``' entry).

    A stack that already has the kept length was built that way from its rewritten config
    (Hugging Face ``num_hidden_layers``) and is left alone."""
    todo = {}
    for name, entry in layers.items():
        try:
            container = get_module(model, name)
        except Exception:
            container = None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise _format_error(f"names the stack {name!r}, which {type(model).__name__} does not have")
        kept, total = list(entry["kept"]), int(entry["total"])
        if len(container) == len(kept):
            continue
        if len(container) != total:
            raise _format_error(f"expects {total} blocks in {name!r}, the model has {len(container)}")
        todo[name] = (kept, total)
    if not todo:
        return
    stacks = [BlockStack(name, total, []) for name, (_, total) in todo.items()]
    removed = {Block(n, i, -1) for n, (kept, total) in todo.items() for i in range(total) if i not in set(kept)}
    remove_blocks(model, stacks, removed, adapter)


def _format_error(what: str) -> Exception:
    from ..errors import FormatError

    return FormatError(f"config.json: the pruning manifest {what}; the folder was written for another architecture")


def renamer(kept: dict[str, dict[str, Any]]) -> Callable[[str], str | None]:
    """Old module name -> its name after removal (None for a module inside a removed block)."""
    maps = {stack: {old: new for new, old in enumerate(entry["kept"])} for stack, entry in kept.items()}

    def rename(name: str) -> str | None:
        for stack, mapping in maps.items():
            prefix = f"{stack}." if stack else ""
            if name.startswith(prefix):
                index, _, rest = name[len(prefix) :].partition(".")
                if index.isdigit():
                    if int(index) not in mapping:
                        return None
                    return f"{prefix}{mapping[int(index)]}" + (f".{rest}" if rest else "")
        return name

    return rename


def check_removal(
    model: nn.Module,
    blocks: list[Block],
    stacks: list[BlockStack],
    adapter: ModelAdapter,
    inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    memo: dict,
    compare: Callable[[list, list], str | None],
    outputs: Callable[[Any], list[torch.Tensor]],
) -> None:
    """On copies of the model, skip every other block (then the others) with the training-time
    gate and remove the same blocks; raise ``IncompatibleError`` naming a block that differs."""

    def trial(chosen: list[Block]) -> str | None:
        probe = copy.deepcopy(model, memo=dict(memo))
        probe.eval()
        handles = []
        for block in chosen:

            def gate(module, args, kwargs, output):
                return skipped(output, hidden_input(args, kwargs))

            handles.append(_block(probe, block).register_forward_hook(gate, with_kwargs=True))
        with torch.no_grad():
            masked = [t.detach().clone() for t in outputs(forward(probe, inputs))]
            for handle in handles:
                handle.remove()
            try:
                remove_blocks(probe, stacks, set(chosen), adapter)
                removed = outputs(forward(probe, inputs))
            except Exception as exc:  # any failure of the shallower model is the finding
                return f"the model without them fails: {type(exc).__name__}: {exc}"
        return compare(masked, removed)

    for subset in (blocks[0::2], blocks[1::2]):
        if not subset or trial(subset) is None:
            continue
        culprit = next((b for b in subset if trial([b]) is not None), subset[0])
        problem = trial([culprit])
        raise IncompatibleError(
            f"prune.layers: skipping block {culprit.name!r} while training and removing it at convert give "
            f"different outputs ({problem}); slimkit cannot remove it exactly. Add it to prune.exclude "
            f"(exclude: [{culprit.name!r}])."
        )
