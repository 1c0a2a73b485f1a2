"""Physical removal: slice positions out of one side of one module.

Parameters keep their identity (``param.data`` is replaced), so anything that holds a reference
to a module or parameter (QAT wrappers, tied weights, hooks) still sees the pruned tensors. A
resized parameter also gets a fresh gradient accumulator (see :func:`_resize_parameter`), so
the converted model trains. When a module's outputs are sliced, every other parameter or buffer
of that module whose leading dimension equals the old output size is sliced too: per-output-
channel state that other methods keep on the module (QAT scales, zero points) follows the
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IncompatibleError
from .units import Side, is_depthwise, is_transposed_linear, transposed_attrs


def _keep(size: int, remove: list[int]) -> torch.Tensor:
    removed = set(remove)
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _resize_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the (smaller) ``value`` in place, with a gradient accumulator of its new shape.

    Autograd caches one AccumulateGrad node per leaf tensor for as long as any graph holds it,
    and that node checks every incoming gradient against the shape the leaf had when the node
    was made. Graphs from before ``convert`` are often still alive: the last training step's
    ``loss``, or the graph Torch-Pruning traced at prepare (freed only by the cyclic garbage
    collector). Assigning ``.data`` of a new shape keeps that stale node, and the first backward
    after convert then fails with "returned an invalid gradient ... got [128, 45, 3, 3] but
    expected [128, 64, 3, 3]". torch drops the cached node when ``.data`` changes dtype or
    device (``VariableHooks::set_data``), so a passing assignment of another dtype resets it;
    the parameter object, its hooks and attributes stay the same.
    """
    if tuple(value.shape) != tuple(param.shape):
        other = torch.float64 if param.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=param.device)
    param.data = value.contiguous()
    param.grad = None


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        _resize_parameter(module._parameters[name], value)
    else:
        module._buffers[name] = value.contiguous()


def _index(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    tensor = getattr(module, name, None)
    if isinstance(tensor, torch.Tensor):
        _set(module, name, tensor.detach().index_select(dim, keep.to(tensor.device)))


def _out_size(module: nn.Module, transposed: dict[type, tuple[str, str]]) -> int:
    if is_transposed_linear(module, transposed):
        return module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.PReLU):
        return module.num_parameters
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    raise IncompatibleError(f"cannot slice a {type(module).__name__}")


def _slice_extra(module: nn.Module, old_out: int, keep: torch.Tensor, handled: set[str]) -> None:
    """Per-output-channel tensors other methods keep on the module (leading dim == outputs)."""
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if name in handled or tensor is None or tensor.dim() == 0:
            continue
        if tensor.shape[0] == old_out:
            _set(module, name, tensor.detach().index_select(0, keep.to(tensor.device)))


def _slice_grouped_conv_inputs(conv: nn.Module, remove: list[int]) -> None:
    """Grouped conv: every group loses the same number of inputs; each output row keeps the
    columns of its own group."""
    groups, old_in = conv.groups, conv.in_channels
    per_group = old_in // groups
    removed = set(remove)
    kept_by_group = [
        [i - g * per_group for i in range(g * per_group, (g + 1) * per_group) if i not in removed]
        for g in range(groups)
    ]
    if len({len(k) for k in kept_by_group}) != 1:
        raise IncompatibleError(f"grouped conv: the pruned inputs are not spread evenly over its {groups} groups")
    out_per_group = conv.out_channels // groups
    weight = conv.weight.detach()
    rows = [
        weight[g * out_per_group : (g + 1) * out_per_group].index_select(
            1, torch.tensor(kept, dtype=torch.long, device=weight.device)
        )
        for g, kept in enumerate(kept_by_group)
    ]
    _set(conv, "weight", torch.cat(rows, dim=0))
    conv.in_channels = old_in - len(removed)


def slice_module(module: nn.Module, side: Side, remove: list[int], transposed: dict[type, tuple[str, str]]) -> None:
    """Remove positions ``remove`` from the ``side`` of ``module`` (in place)."""
    if not remove:
        return
    if side == "out":
        old = _out_size(module, transposed)
        keep = _keep(old, remove)
        handled = {"weight", "bias"}
        if is_transposed_linear(module, transposed):
            _index(module, "weight", 1, keep)
            _index(module, "bias", 0, keep)
            setattr(module, transposed_attrs(module, transposed)[0], len(keep))
        elif isinstance(module, nn.Linear):
            _index(module, "weight", 0, keep)
            _index(module, "bias", 0, keep)
            module.out_features = len(keep)
        elif isinstance(module, nn.modules.conv._ConvNd):
            depthwise = is_depthwise(module)
            _index(module, "weight", 1 if module.transposed else 0, keep)
            _index(module, "bias", 0, keep)
            module.out_channels = len(keep)
            if depthwise:  # one input channel per output channel: both sides go together
                module.in_channels = module.groups = len(keep)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _index(module, name, 0, keep)
            handled |= {"running_mean", "running_var"}
            module.num_features = len(keep)
        elif isinstance(module, nn.PReLU):
            _index(module, "weight", 0, keep)
            module.num_parameters = len(keep)
        elif isinstance(module, nn.Embedding):  # columns: one per head of a per-head table
            _index(module, "weight", 1, keep)
            module.embedding_dim = len(keep)
            return
        _slice_extra(module, old, keep, handled)
        return

    if is_transposed_linear(module, transposed):
        keep = _keep(module.weight.shape[0], remove)
        _index(module, "weight", 0, keep)
        setattr(module, transposed_attrs(module, transposed)[1], len(keep))
    elif isinstance(module, nn.Linear):
        keep = _keep(module.in_features, remove)
        _index(module, "weight", 1, keep)
        module.in_features = len(keep)
    elif isinstance(module, nn.modules.conv._ConvNd):
        if is_depthwise(module):
            slice_module(module, "out", remove, transposed)
        elif module.groups > 1:
            _slice_grouped_conv_inputs(module, remove)
        else:
            keep = _keep(module.in_channels, remove)
            _index(module, "weight", 0 if module.transposed else 1, keep)
            module.in_channels = len(keep)
    else:  # norms and PReLU have one side
        slice_module(module, "out", remove, transposed)


def remove_units(
    model: nn.Module, groups: list, pruned: list[torch.Tensor], transposed: dict[type, tuple[str, str]]
) -> None:
    """Slice every pruned unit out of every layer it lives in.

    Positions are collected per (module, side) over all groups first and each side is sliced
    once, so that a fused projection (timm's qkv) or a layer shared by two groups is cut in one
    go, in its original coordinates.
    """
    cuts: dict[tuple[str, str], set[int]] = {}
    for group, mask in zip(groups, pruned):
        units = mask.nonzero().flatten().tolist()
        if not units:
            continue
        for member in group.members:
            cuts.setdefault((member.module, member.side), set()).update(member.positions(units))
    for (name, side), positions in cuts.items():
        module = model.get_submodule(name) if name else model
        slice_module(module, side, sorted(positions), transposed)
