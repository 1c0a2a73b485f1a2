"""Peak memory of the tensors a piece of code allocates, on any device (CPU included).

torch has allocator statistics for CUDA only; on CPU this counts what the ops create instead:
a ``TorchDispatchMode`` sees every op (forward and backward, which autograd runs in the same
thread on CPU), records each new storage once, and a weakref callback subtracts it when it is
freed. Storages that existed before (parameters, inputs) are not counted; views of them cost
nothing (an op's output that shares an input's storage is a view or an in-place result, not
new memory). The count is exact and deterministic, unlike the process's resident size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...``; then ``m.peak`` (bytes) and ``m.live``."""

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._seen: dict[int, Any] = {}

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        key = _key(t)
        if key is None or key in self._seen or key in inputs:
            return
        storage = t.untyped_storage()
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref: Any, key: int = key, size: int = size) -> None:
            self._seen.pop(key, None)
            self.live -= size

        self._seen[key] = weakref.ref(storage, freed) if _weakrefable(storage) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


def _key(t: torch.Tensor) -> int | None:
    """The tensor's storage address; None for an empty storage (FSDP2 frees gathered parameters
    by resizing their storage to 0 bytes, which then has no valid data pointer)."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except RuntimeError:
        return None


def _weakrefable(storage: torch.UntypedStorage) -> bool:
    try:
        weakref.ref(storage)
        return True
    except TypeError:
        return False


def peak_bytes(fn: Callable[[], Any], device: str | None = None) -> int:
    """Peak bytes of the tensors ``fn()`` allocates (a training step: forward and backward)."""
    tracker = PeakMemory(device)
    with tracker:
        fn()
    return tracker.peak
