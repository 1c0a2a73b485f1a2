"""One watched forward pass: which tensors each module call and each torch call reads and writes.

Module structure cannot tell how a model's blocks are wired (timm, Hugging Face and
torchvision wire them in ``forward``), and ``torch.fx`` cannot trace every model. So the model
runs once on example inputs while forward hooks record each module call's input and output
tensor and a ``TorchFunctionMode`` records every torch call that returns a tensor (its name,
arguments, tensor inputs and outputs). BatchNorm folding and the placement of activation
quantizers (:mod:`slimkit.quant.sites`) are decided from this record.

A tensor is identified by ``(id(tensor), tensor._version)``: an in-place op (``x += y``,
``relu_``) writes a new version of the same object, which is a different value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..adapters import call_model
from ..modules import user_named_modules

Key = tuple[int, int]


def key_of(tensor: torch.Tensor) -> Key:
    return id(tensor), tensor._version


@dataclasses.dataclass
class Op:
    """One torch call that returned a tensor."""

    index: int
    name: str  # the function's __name__ ("conv2d", "batch_norm", "__iadd__", "relu_", ...)
    args: tuple
    kwargs: dict
    inputs: list[Key]  # tensor arguments, in order
    outputs: list[Key]


@dataclasses.dataclass
class Call:
    """One call of a module: its first tensor input, its output (if a tensor), and the span
    ``[start, end)`` of the torch calls made inside it."""

    module: str
    input: Key | None
    output: Key | None
    start: int
    end: int


@dataclasses.dataclass
class Recording:
    ops: list[Op] = dataclasses.field(default_factory=list)
    calls: dict[str, list[Call]] = dataclasses.field(default_factory=dict)
    readers: dict[Key, list[int]] = dataclasses.field(default_factory=dict)  # ops reading a tensor
    returned_by: dict[Key, list[str]] = dataclasses.field(default_factory=dict)  # innermost module first
    received_by: dict[Key, list[str]] = dataclasses.field(default_factory=dict)  # outermost module first
    keep_alive: list[torch.Tensor] = dataclasses.field(default_factory=list)  # so that ids stay unique

    def single_call(self, name: str) -> Call | None:
        """The call of module ``name`` if it ran exactly once (a module run twice, with shared
        weights, cannot carry per-call state such as a folded BatchNorm or a quantizer)."""
        calls = self.calls.get(name, [])
        return calls[0] if len(calls) == 1 else None

    def producer(self, key: Key) -> Op | None:
        for op in self.ops:  # few lookups, on small graphs: a scan is fine
            if key in op.outputs:
                return op
        return None


class _RecordOps(TorchFunctionMode):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        in_keys = [key_of(t) for t in inputs]
        out = func(*args, **kwargs)
        outputs = [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        if outputs:
            rec = self.recording
            index = len(rec.ops)
            name = getattr(func, "__name__", str(func))
            rec.ops.append(Op(index, name, args, kwargs, in_keys, [key_of(t) for t in outputs]))
            for key in dict.fromkeys(in_keys):
                rec.readers.setdefault(key, []).append(index)
            rec.keep_alive.extend(inputs + outputs)
        return out


def _first_tensor(values: Any) -> torch.Tensor | None:
    return next((v for v in tree_leaves(values) if isinstance(v, torch.Tensor)), None)


@torch.no_grad()
def record(model: nn.Module, example_inputs: Any) -> Recording:
    """Run ``model`` once in eval mode on ``example_inputs`` and record its dataflow."""
    rec = Recording()
    starts: dict[str, list[tuple[Key | None, int]]] = {}
    handles = []

    def before(name: str):
        def hook(module, args, kwargs):
            tensor = _first_tensor(args) if args else _first_tensor(kwargs)
            key = None if tensor is None else key_of(tensor)
            if key is not None:
                rec.received_by.setdefault(key, []).append(name)
                rec.keep_alive.append(tensor)
            starts.setdefault(name, []).append((key, len(rec.ops)))

        return hook

    def after(name: str):
        def hook(module, args, output):
            key, start = starts[name].pop()
            out_key = key_of(output) if isinstance(output, torch.Tensor) else None
            if out_key is not None:
                rec.returned_by.setdefault(out_key, []).append(name)
                rec.keep_alive.append(output)
            rec.calls.setdefault(name, []).append(Call(name, key, out_key, start, len(rec.ops)))

        return hook

    for name, module in user_named_modules(model):
        handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(module.register_forward_hook(after(name)))
    was_training = model.training
    model.eval()
    try:
        with _RecordOps(rec):
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return rec


__all__ = ["Call", "Key", "Op", "Recording", "key_of", "record"]
