"""Channel coupling from Torch-Pruning's dependency graph, behind one function.

Torch-Pruning traces the model once and knows which layers must lose the same channels:
BatchNorm after a conv, the next layer's inputs, depthwise convs, residual adds (the whole
residual group), concatenations (with offsets), squeeze-excite gates, flattening into a
classifier. :func:`channel_groups` turns its groups into slimkit's plain
:class:`~slimkit.prune.units.UnitGroup` records and decides which of them slimkit can prune
*exactly* (masked forward == physically pruned forward):

* a group whose channels pass through a LayerNorm / GroupNorm / RMSNorm-style parameter, an
  embedding or a model output is left whole -- zeroing a channel there is not the same as
  removing it (the norm's statistics see it), and the model's output width is its interface.
  In transformers and ConvNeXt that is the residual stream; their MLP hidden neurons and
  attention heads are still pruned;
* a group that would slice an excluded module's outputs or an attention projection (heads are
  pruned as whole heads instead) is left whole;
* everything else becomes a group; grouped convolutions add the rule that each conv group
  loses the same number of channels.

``torch_pruning`` is imported here, lazily, so that ``import slimkit`` never needs it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapters import call_model
from ..errors import IncompatibleError, UnsupportedModelError
from .units import Member, UnitGroup, is_depthwise, supports

_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _import_torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - the prune extra is installed in development
        raise UnsupportedModelError(
            "structured channel pruning needs Torch-Pruning's dependency graph: pip install 'slimkit[prune]'"
        ) from exc
    return tp


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model's outputs (tensor, tuple/list, dict / ModelOutput), in order.

    Objects such as a key/value cache are skipped: they are not part of the output's width.
    """
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in output_tensors(item)]
    return []


def _transposed_pruner(tp, out_attr: str, in_attr: str):
    """A Torch-Pruning pruner for a linear layer stored [in, out] (HF ``Conv1D``), so that the
    graph couples it; slimkit slices it itself (slicing.py)."""

    class TransposedLinearPruner(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):  # pragma: no cover - slimkit slices itself
            raise NotImplementedError

        def prune_in_channels(self, layer, idxs):  # pragma: no cover
            raise NotImplementedError

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return TransposedLinearPruner()


def _skip_reason(module: Any, name: str, is_out: bool, tp, ctx: dict) -> str | None:
    """Why a group containing this traced item cannot be pruned exactly (None: it can)."""
    if isinstance(module, nn.Parameter):
        return f"its channels pass through the parameter {name!r} (a norm scale, position embedding, ...)"
    if type(module).__module__.startswith("torch_pruning"):
        if isinstance(module, tp.ops._OutputOp):
            return "its channels reach the model's output (part of the model's interface)"
        return None
    if isinstance(module, _CHANNEL_NORMS):
        return f"{name!r} ({type(module).__name__}) normalises over these channels"
    if isinstance(module, nn.Embedding):
        return f"its channels are the embedding width of {name!r}"
    if not supports(module, ctx["transposed"]):
        return f"slimkit cannot slice {name!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed and module.groups > 1:
        return f"slimkit cannot slice the grouped transposed conv {name!r}"
    if is_out and name in ctx["attention"]:
        return f"{name!r} is an attention projection (heads are pruned whole, with prune.heads)"
    if is_out and name in ctx["excluded"]:
        return f"{name!r} is excluded"
    return None


def depthwise_aliases(graph: Any, tp: Any, names: dict, members: dict) -> list[tuple[str, str]]:
    """(depthwise conv, producer) pairs of one group whose output channels are the same channels.

    A depthwise conv's channel j reads only its input's channel j; when that input comes from a
    conv / linear of the same group through element-wise ops only (BatchNorm, activations), the
    two layers' output positions name the same channels."""
    kinds = tp.ops.OPTYPE
    passing = (kinds.BN, kinds.ELEMENTWISE, kinds.PRELU)
    producing = (kinds.CONV, kinds.LINEAR, kinds.DEPTHWISE_CONV)
    pairs = []
    for (name, side), _ in members.items():
        module = next((m for m, n in names.items() if n == name), None)
        if side != "out" or not is_depthwise(module) or module not in graph.module2node:
            continue
        node = graph.module2node[module]
        while len(node.inputs) == 1 and node.inputs[0].type in passing:
            node = node.inputs[0]
        if len(node.inputs) != 1 or node.inputs[0].type not in producing:
            continue
        producer = names.get(node.inputs[0].module)
        if producer is not None and (producer, "out") in members:
            pairs.append((name, producer))
    return pairs


def merge_shared_units(members: list[Member], size: int) -> tuple[list[Member], int]:
    """Units that occupy a common position of some layer become one unit (union-find), so that
    they are kept or removed together: removing one would remove that position, and with it
    the other."""
    parent = list(range(size))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for member in members:
        owner: dict[int, int] = {}
        for unit, positions in enumerate(member.index):
            for position in positions:
                if position in owner:
                    a, b = find(owner[position]), find(unit)
                    parent[max(a, b)] = min(a, b)
                else:
                    owner[position] = unit
    roots = sorted({find(u) for u in range(size)})
    if len(roots) == size:
        return members, size
    number = {root: i for i, root in enumerate(roots)}
    merged = []
    for member in members:
        index: list[set[int]] = [set() for _ in roots]
        for unit, positions in enumerate(member.index):
            index[number[find(unit)]].update(positions)
        merged.append(Member(member.module, member.side, [sorted(p) for p in index]))
    return merged, len(roots)


def _blocks(members: list[Member], modules: dict[str, nn.Module], size: int) -> tuple[list | None, str | None]:
    """Grouped convs: the partition of units into conv groups (each must lose as many units)."""
    partition = None
    for member in members:
        conv = modules[member.module]
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups == 1 or is_depthwise(conv):
            continue
        width = (conv.out_channels if member.side == "out" else conv.in_channels) // conv.groups
        block_of = []
        for positions in member.index:
            ids = {p // width for p in positions}
            if len(ids) != 1:
                return None, f"a channel spans two groups of the grouped conv {member.module!r}"
            block_of.append(ids.pop())
        blocks = {}
        for unit, block in enumerate(block_of):
            blocks.setdefault(block, []).append(unit)
        candidate = sorted(blocks.values())
        if partition is not None and candidate != partition:
            return None, f"grouped convs with different group layouts meet at {member.module!r}"
        partition = candidate
    if partition is not None and sum(len(b) for b in partition) != size:
        return None, "a grouped conv sees only part of the channels"
    return partition, None


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    names: dict[nn.Module, str],
    transposed: dict[type, tuple[str, str]],
    attention: set[str],
    attention_outputs: set[str],
    excluded: set[str],
    included: set[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] = call_model,
) -> tuple[list[UnitGroup], dict[str, str]]:
    """Trace ``model`` and return (prunable channel groups, {root: why another group is not}).

    With ``included`` (``prune.include``), only groups whose outputs an included layer produces
    are pruned."""
    tp = _import_torch_pruning()
    customized = {cls: _transposed_pruner(tp, *attrs) for cls, attrs in transposed.items()}
    was_training = model.training
    # Heads are pruned whole (heads.py). Cutting the graph at the input of each attention output
    # projection keeps the attention internals (rotary embeddings, key/value repetition, fused
    # kernels) out of the trace, where their index mappings make Torch-Pruning's group search
    # explode; the projections are then never channel roots.
    cuts = [_module(model, name).register_forward_pre_hook(_detach_inputs) for name in sorted(attention_outputs)]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=forward,
                output_transform=output_tensors,
                customized_pruners=customized,
                verbose=False,
            )
    except Exception as exc:
        raise IncompatibleError(
            f"prune.channels: Torch-Pruning could not trace {type(model).__name__} into a dependency graph "
            f"({type(exc).__name__}: {exc}). Check that the example inputs run the model, or set "
            "prune.channels: 0 (heads and unstructured masks need no graph)."
        ) from exc
    finally:
        model.train(was_training)
        for handle in cuts:
            handle.remove()

    ctx = {"transposed": transposed, "attention": attention, "excluded": excluded, "included": included}
    result = _unit_groups(graph, model, names, ctx, tp)
    # The graph holds the traced output, and through it the autograd graph of the trace (every
    # activation), in reference cycles: free it now rather than whenever the collector runs.
    del graph
    gc.collect()
    return result


def _unit_groups(graph: Any, model: nn.Module, names: dict, ctx: dict, tp: Any) -> tuple[list[UnitGroup], dict]:
    """slimkit's groups from Torch-Pruning's (see :func:`channel_groups`)."""
    roots = (nn.modules.conv._ConvNd, nn.Linear, *ctx["transposed"])
    groups: list[UnitGroup] = []
    skipped: dict[str, str] = {}
    for tp_group in graph.get_all_groups(root_module_types=roots):
        group, root, reason = _unit_group(tp_group, graph, model, names, ctx, tp)
        producer = _reroot(group, graph, names, tp) if group is not None else None
        if producer is not None:
            # Torch-Pruning keeps one index mapping per layer: a layer reached both directly and
            # through a depthwise conv (GhostNet: cat([x1, cheap(x1)])) keeps only one of them.
            # Traced from that layer, every path starts at its own channels and none is lost.
            pruner = graph.get_pruner_of_module(producer)
            regrouped = graph.get_pruning_group(
                producer, pruner.prune_out_channels, idxs=list(range(pruner.get_out_channels(producer)))
            )
            group, root, reason = _unit_group(regrouped, graph, model, names, ctx, tp)
        if group is None:
            skipped[root] = reason
            continue
        groups.append(group)
    return groups, skipped


def _reroot(group: UnitGroup, graph: Any, names: dict, tp: Any) -> nn.Module | None:
    """The producer to trace ``group`` from again, when one of its depthwise convs reads another
    producer of the group (see :func:`depthwise_aliases`); None when the group is fine."""
    members = {(m.module, m.side): m for m in group.members}
    pairs = depthwise_aliases(graph, tp, names, members)
    if not pairs or group.root in {producer for _, producer in pairs}:
        return None
    producer = pairs[0][1]
    return next(m for m, n in names.items() if n == producer)


def _unit_group(
    tp_group: Any, graph: Any, model: nn.Module, names: dict, ctx: dict, tp: Any
) -> tuple[UnitGroup | None, str, str | None]:
    """One Torch-Pruning group as a slimkit group: (group or None, root name, why not)."""
    root_module = tp_group[0].dep.target.module
    root = names.get(root_module, "?")
    size = len(tp_group[0].idxs)
    members: dict[tuple[str, str], Member] = {}
    ops: list[str] = []
    reason = None
    for item in tp_group:
        target = item.dep.target
        module = target.module
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        name = names.get(module) if isinstance(module, nn.Module) else None
        if name is None:
            name = graph._param_to_name.get(module, target.name) if isinstance(module, nn.Parameter) else None
        reason = reason or _skip_reason(module, name or target.name, is_out, tp, ctx)
        if type(module).__module__.startswith("torch_pruning"):
            ops.append(target.name)
            continue
        if reason is not None or name is None:
            continue
        if any(r is None for r in item.root_idxs):
            reason = f"Torch-Pruning cannot map {name!r}'s channels back to {root!r}"
            continue
        index: list[list[int]] = [[] for _ in range(size)]
        for position, unit in zip(item.idxs, item.root_idxs):
            index[unit].append(int(position))
        side = "out" if is_out else "in"
        key = (name, side)
        if key in members:  # the same layer reached twice: merge the positions
            for unit, positions in enumerate(index):
                members[key].index[unit] = sorted(set(members[key].index[unit]) | set(positions))
        else:
            members[key] = Member(name, side, [sorted(set(p)) for p in index])
    included = ctx["included"]
    produced = any(m.side == "out" and m.module in (included or ()) for m in members.values())
    if reason is None and included is not None and not produced:
        reason = "none of its layers is in prune.include"
    if reason is not None:
        return None, root, reason
    merged, size = merge_shared_units(list(members.values()), size)
    module_of = {m.module: _module(model, m.module) for m in merged}
    blocks, reason = _blocks(merged, module_of, size)
    if reason is not None:
        return None, root, reason
    return UnitGroup("channels", root, size, merged, blocks=blocks, ops=ops), root, None


def _detach_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model
