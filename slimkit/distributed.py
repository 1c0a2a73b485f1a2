"""What slimkit needs of ``torch.distributed``, in one place: DDP and FSDP2 (``fully_shard``).

Every method calls these instead of ``torch.distributed`` directly:

* :func:`is_distributed`, :func:`rank`, :func:`is_main_process`;
* :func:`broadcast_` (rank 0's tensors everywhere: masks, projector initialisation) and
  :func:`all_reduce_` (statistics), both also for CPU tensors on an NCCL process group;
* :func:`is_sharded`, :func:`full_tensor`, :func:`local_like` for FSDP2's ``DTensor`` parameters;
* :func:`mul_mask_` (a mask on a possibly sharded parameter: each process its own rows) and
  :func:`follow_grad_hook` (a gradient hook that also fires on the whole parameter FSDP2
  gathers for each forward), what pruning needs on sharded parameters;
* :func:`gather_full_model_`: an FSDP2 model made a plain module again, with full parameters on
  every process (what ``slimkit.convert`` does first, so that it converts one whole model);
* :func:`sync_buffers_like_ddp`: FSDP2 shards parameters but leaves buffers (BatchNorm statistics,
  fake-quant observers) to each process; DDP broadcasts rank 0's buffers before every forward.
  slimkit does the same under FSDP2, so that both give the same model and every process
  quantizes with the same ranges.

Only :func:`gather_full_model_` touches FSDP2 internals (the hooks it registers and the class it
swaps in); it is pinned by tests/test_fsdp.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------


_ALONE = [0]  # > 0 while this process works alone (alone()): slimkit's collectives are skipped


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """This process works by itself for a while (rank 0 deciding for all, e.g. quantizing the
    copies a target times, while the others wait at a broadcast): inside, slimkit behaves as in a
    single process, so a method that would agree with its peers (``broadcast_``) does not start a
    collective the others never join."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (and not :func:`alone`)."""
    return (
        not _ALONE[0]
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def _on_comm_device(tensor: torch.Tensor, fn) -> None:
    """Run the collective ``fn`` on ``tensor``, through a CUDA copy when NCCL holds CPU tensors."""
    view = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
    if torch.distributed.get_backend() == "nccl" and not view.is_cuda:
        moved = view.cuda()
        fn(moved)
        view.copy_(moved.cpu())
    else:
        fn(view)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s values into ``tensors`` on every process (in place; no-op alone)."""
    if not is_distributed():
        return
    for tensor in tensors:
        _on_comm_device(local_tensor(tensor), lambda t: torch.distributed.broadcast(t, src=src))


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op="sum"``), ``"max"``, ``"min"`` or ``"mean"`` of ``tensor`` over processes, in place."""
    if not is_distributed():
        return tensor
    reduce_op = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}[op]
    _on_comm_device(
        tensor, lambda t: torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, reduce_op))
    )
    if op == "mean":
        tensor /= world_size()
    return tensor


def average_values(values: dict[str, float]) -> dict[str, float]:
    """The mean over processes of each logged value (every process must pass the same keys)."""
    if not values or not is_distributed():
        return values
    keys = sorted(values)
    t = all_reduce_(torch.tensor([values[k] for k in keys], dtype=torch.float64), "mean")
    return dict(zip(keys, t.tolist()))


# ----------------------------------------------------------------------------------------
# FSDP2 parameters (DTensors)
# ----------------------------------------------------------------------------------------


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def managed_by_fsdp(module: nn.Module) -> bool:
    """True if FSDP2 manages ``module``'s parameters. In a forward they are whole tensors that
    FSDP2 gathers into the same storage every step with their version counter preserved, so
    ``(tensor._version, data_ptr())`` does not tell whether their values changed."""
    return bool(module.__dict__.get("_is_fsdp_managed_module", False))


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` (or a submodule) is wrapped by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(is_dtensor(p) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every process) cut like ``like``: a DTensor with ``like``'s mesh and
    placements when ``like`` is one (no communication), else ``full`` itself."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _shard_bounds(size: int, tensor: torch.Tensor) -> tuple[int, int]:
    """(start, length) of this process's part of a dimension of ``size`` split like
    ``torch.chunk`` over the mesh of the 1-D DTensor ``tensor`` (``Shard``'s layout)."""
    mesh = tensor.device_mesh
    parts, index = mesh.size(), mesh.get_local_rank()
    chunk = -(-size // parts)
    start = min(chunk * index, size)
    return start, max(min(chunk, size - start), 0)


def local_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``keep``, a mask that broadcasts against the whole of ``like``
    (a size-1 dimension stays whole); ``keep`` itself when ``like`` is not a DTensor."""
    if not is_dtensor(like):
        return keep
    from torch.distributed.tensor import Replicate, Shard

    placements = like.placements
    if len(placements) == 1 and isinstance(placements[0], Replicate):
        return keep
    if len(placements) == 1 and isinstance(placements[0], Shard):
        dim = placements[0].dim % like.dim()
        if keep.dim() < like.dim() or keep.shape[dim] == 1:
            return keep
        start, length = _shard_bounds(keep.shape[dim], like)
        return keep.narrow(dim, start, length)
    # several mesh dimensions (HSDP, FSDP + TP): let DTensor cut it
    return local_like(keep.expand(like.shape).contiguous(), like).to_local()


@torch.no_grad()
def mul_mask_(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    """``tensor *= keep`` in place, for a plain tensor or a sharded DTensor parameter (each
    process multiplies its own shard by its part of the mask; no communication)."""
    if is_dtensor(tensor):
        tensor.to_local().mul_(local_mask(keep, tensor))
    else:
        tensor.data.mul_(keep)


class _FollowingGradHook:
    """See :func:`follow_grad_hook`; ``remove()`` removes every hook it registered."""

    def __init__(self, model: nn.Module, param: nn.Parameter, make_hook: Any) -> None:
        self._make = make_hook
        self._hooked: dict[int, Any] = {}  # id -> weakref of every tensor hooked (ids get reused)
        self._handles: list[Any] = []
        self._hook(param)
        owners = [(m, n) for m in model.modules() for n, p in m._parameters.items() if p is param]
        self._handles += [m.register_forward_pre_hook(self._follow(n)) for m, n in owners]

    def _hook(self, tensor: torch.Tensor) -> None:
        import weakref

        ref = self._hooked.get(id(tensor))
        if (ref is not None and ref() is tensor) or is_dtensor(tensor) or not tensor.requires_grad:
            return
        self._hooked[id(tensor)] = weakref.ref(tensor)
        self._handles.append(tensor.register_hook(self._make(tensor)))

    def _follow(self, name: str) -> Any:
        def pre_hook(module: nn.Module, args: Any) -> None:
            tensor = module._parameters.get(name)
            if tensor is not None:
                self._hook(tensor)

        return pre_hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], {}


def follow_grad_hook(model: nn.Module, param: nn.Parameter, make_hook: Any) -> _FollowingGradHook:
    """Register ``make_hook(tensor)`` (which returns a ``grad -> None`` hook) on ``param`` and on
    every tensor that later stands in its place in its module during a forward.

    ``fully_shard`` replaces a parameter by a sharded DTensor, never used in autograd: during
    each forward the module holds a whole, gathered parameter instead (the same object every
    step), and its gradient is what DDP's hook would see, this process's local one. A forward
    pre-hook on each module that owns ``param`` hooks that tensor the first time it appears.
    For a model that is never sharded this is ``param.register_hook(make_hook(param))``.
    """
    return _FollowingGradHook(model, param, make_hook)


# ----------------------------------------------------------------------------------------
# FSDP2 models
# ----------------------------------------------------------------------------------------

_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable")
_KWARGS_DICTS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _from_fsdp(hook: Any) -> bool:
    hook = getattr(hook, "hook", hook)  # load_state_dict pre-hooks are wrapped
    hook = getattr(hook, "func", hook)  # functools.partial
    owner = getattr(hook, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(hook, "__module__", "")
    return str(module).startswith(_FSDP_MODULES)


def _strip_fsdp(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for attr in _HOOK_DICTS:
        hooks = getattr(module, attr, None)
        if not hooks:
            continue
        for key in [k for k, h in hooks.items() if _from_fsdp(h)]:
            del hooks[key]
            for extra in (
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
            ):
                getattr(module, extra, {}).pop(key, None)
    if isinstance(module, FSDPModule):
        module.__class__ = type(module).__mro__[type(module)._orig_cls_mro_index]
    for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
        module.__dict__.pop(attr, None)
    # fully_shard's per-module state and registry (torch.distributed._composable.contract)
    for key in [k for k in module.__dict__ if isinstance(k, str) and k.startswith("__composable_api_state_key")]:
        del module.__dict__[key]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` wrapped."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_(model: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward of a root module (it expects a
    backward). After slimkit's own forwards (probes, measurements, the frozen teacher) the
    registered parameters are the sharded ones again, which the optimizer must hold."""
    for module in fsdp_modules(model):
        module.reshard()


def gather_full_model_(model: nn.Module) -> nn.Module:
    """Make an FSDP2-sharded ``model`` a plain module again, in place, and return it.

    A collective: call it on every process. Each ``DTensor`` parameter is gathered into a
    full ``nn.Parameter`` (tied parameters stay tied), FSDP's hooks are removed and each
    module gets its own class back, so the model runs, converts and saves like one that was
    never sharded, with rank 0's buffers. Training it further needs ``fully_shard`` again. A
    model that is not sharded is returned as it is.
    """
    if not is_sharded(model):
        return model
    reshard_(model)  # the registered parameters are the sharded DTensors again
    gathered: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():  # the same order on every process: collectives match
            for name, param in list(module._parameters.items()):
                if param is None or not is_dtensor(param):
                    continue
                if id(param) not in gathered:
                    gathered[id(param)] = nn.Parameter(param.full_tensor().clone(), requires_grad=param.requires_grad)
                module._parameters[name] = gathered[id(param)]
            for name, buf in list(module._buffers.items()):
                if buf is not None and is_dtensor(buf):
                    module._buffers[name] = buf.full_tensor().clone()
    for module in model.modules():
        _strip_fsdp(module)
    # buffers (fake-quant ranges, BatchNorm statistics) are each process's own since the last
    # forward: rank 0's everywhere, as DDP would broadcast them, so every process converts the
    # same model, the one rank 0 of a DDP run converts
    broadcast_([b for b in model.buffers() if b is not None and b.numel() > 0])
    return model


# ----------------------------------------------------------------------------------------
# buffers under FSDP2, like DDP
# ----------------------------------------------------------------------------------------


def sync_buffers_like_ddp(model: nn.Module) -> Any:
    """A forward pre-hook on ``model`` that, when it runs sharded by FSDP2 in a process group,
    broadcasts rank 0's buffers before each training forward, as DDP does (``broadcast_buffers``).

    Registered by ``slimkit.prepare``; a no-op for plain and DDP-wrapped models (DDP syncs
    them itself, and its inner module's parameters are not DTensors). Returns the handle.
    """
    state = {"sharded": None}

    def hook(module: nn.Module, args: Any) -> None:
        if not module.training or not is_distributed():
            return
        if state["sharded"] is None:
            state["sharded"] = is_sharded(module)
        if state["sharded"]:
            broadcast_([b for b in module.buffers() if b is not None and b.numel() > 0])

    return model.register_forward_pre_hook(hook, prepend=True)


def replicate_gradients(params: list[nn.Parameter]) -> list[Any]:
    """For parameters slimkit adds to an already-sharded model (KD projectors): rank 0's initial
    values everywhere, and gradients averaged over processes as DDP would (hook handles)."""
    if not is_distributed():
        return []
    broadcast_([p.data for p in params])

    def average(param: torch.Tensor) -> None:
        if param.grad is not None:
            all_reduce_(param.grad, "mean")

    return [p.register_post_accumulate_grad_hook(average) for p in params]
