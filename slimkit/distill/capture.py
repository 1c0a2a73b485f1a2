"""Capturing the outputs of named modules with forward hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleError
from ..modules import get_module


def hidden_states(output: Any) -> torch.Tensor:
    """The tensor a feature KD term uses from a module's output.

    Tensors are used as they are; a tuple/list gives its first tensor (HF layers return
    ``(hidden_states, attn_weights, ...)``); a ModelOutput gives ``last_hidden_state``.
    """
    if isinstance(output, torch.Tensor):
        return output
    last = getattr(output, "last_hidden_state", None)
    if isinstance(last, torch.Tensor):
        return last
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    raise IncompatibleError(
        f"cannot find a tensor in a module output of type {type(output).__name__}; name a module that returns "
        "a tensor (or a tuple / dict / ModelOutput holding one) in distill.features"
    )


class FeatureCapture:
    """Stores ``hidden_states(output)`` of each named module on every forward."""

    def __init__(self, model: nn.Module, names: list[str], role: str = ""):
        self.store: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):  # unique, in order
            module = get_module(model, name, role=role)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.store[name] = hidden_states(output)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        store, self.store = self.store, {}
        return store

    def clear(self) -> None:
        self.store = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.store = {}
