"""Which convolutions feed a BatchNorm that can be folded into them.

A conv and a BatchNorm fold when the BatchNorm's input is the conv's output and nothing else
reads that output. Module structure cannot tell this (timm, Hugging Face and torchvision
wire their blocks in ``forward``), so one forward pass on example inputs is watched: forward
hooks record each conv's output tensor and each BatchNorm's input, and a
``TorchFunctionMode`` counts every torch call that reads a conv output and returns a tensor.
No tracer is needed, and models that ``torch.fx`` cannot trace work too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..adapters import call_model


class _CountReaders(TorchFunctionMode):
    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.readers: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                name = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if name is not None:
                    self.readers[name] = self.readers.get(name, 0) + 1
        return out


def foldable_batchnorms(
    model: nn.Module, convs: dict[str, nn.Module], example_inputs: Any
) -> dict[str, tuple[str, nn.Module]]:
    """conv name -> (BatchNorm name, BatchNorm) for every conv whose only reader is a
    BatchNorm2d with running statistics."""
    norms = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None
    }
    if not norms or not convs:
        return {}
    outputs: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []
    bn_inputs: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []

    def on_conv(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = name
            keep_alive.append(output)

        return hook

    def on_norm(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                bn_inputs[name] = id(args[0])

        return hook

    for name, conv in convs.items():
        handles.append(conv.register_forward_hook(on_conv(name)))
    for name, bn in norms.items():
        handles.append(bn.register_forward_pre_hook(on_norm(name)))
    counter = _CountReaders(outputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    pairs: dict[str, tuple[str, nn.Module]] = {}
    for bn_name, input_id in bn_inputs.items():
        conv_name = outputs.get(input_id)
        if conv_name is None or calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue  # a layer run twice (shared weights) cannot be folded for both uses
        if counter.readers.get(conv_name) != 1:
            continue
        conv, bn = convs[conv_name], norms[bn_name]
        if bn.num_features == conv.out_channels and conv_name not in pairs:
            pairs[conv_name] = (bn_name, bn)
    return pairs
