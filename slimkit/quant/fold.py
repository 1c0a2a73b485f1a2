"""Which convolutions feed a BatchNorm that can be folded into them.

A conv and a BatchNorm fold when the BatchNorm's input is the conv's output and nothing else
reads that output. Module structure cannot tell this (timm, Hugging Face and torchvision
wire their blocks in ``forward``), so it is read from one watched forward pass
(:func:`slimkit.quant.dataflow.record`): no tracer is needed, and models that ``torch.fx``
cannot trace work too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .dataflow import Recording, record

Remainder = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _timm_norm_act(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return bn.act(bn.drop(x))


# BatchNorm subclasses that do more than normalize, and what is left of their forward once the
# normalization is folded into the conv before them (by class path: timm is never imported)
_REMAINDERS: dict[str, Remainder] = {"timm.layers.norm_act.BatchNormAct2d": _timm_norm_act}


def register_norm_remainder(cls: type, remainder: Remainder) -> type:
    """Declare what a BatchNorm2d subclass ``cls`` computes besides normalizing (e.g.
    ``lambda bn, x: bn.act(x)``), so that a folded one runs only that remainder."""
    _REMAINDERS[f"{cls.__module__}.{cls.__qualname__}"] = remainder
    return cls


def _keep(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def norm_remainder(bn: nn.Module) -> Remainder | None:
    """What ``bn`` computes besides normalizing: nothing for ``nn.BatchNorm2d``, a registered
    remainder for known subclasses, None (unknown: it must run its own forward) otherwise."""
    cls = next(c for c in type(bn).__mro__ if not c.__module__.startswith("slimkit.quant"))
    if cls is nn.BatchNorm2d:
        return _keep
    return _REMAINDERS.get(f"{cls.__module__}.{cls.__qualname__}")


def batchnorms_with_statistics(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None
    }


def fold_pairs(
    recording: Recording, convs: dict[str, nn.Module], norms: dict[str, nn.Module]
) -> dict[str, tuple[str, nn.Module]]:
    """conv name -> (BatchNorm name, BatchNorm) for every conv whose only reader is a
    BatchNorm2d with running statistics, both run exactly once."""
    pairs: dict[str, tuple[str, nn.Module]] = {}
    for bn_name, bn in norms.items():
        call = recording.single_call(bn_name)
        if call is None or call.input is None:
            continue
        conv_name = next(iter(recording.returned_by.get(call.input, [])), None)
        if conv_name not in convs or recording.single_call(conv_name) is None:
            continue  # a layer run twice (shared weights) cannot be folded for both uses
        if len(recording.readers.get(call.input, [])) != 1:
            continue
        if bn.num_features == convs[conv_name].out_channels and conv_name not in pairs:
            pairs[conv_name] = (bn_name, bn)
    return pairs


def foldable_batchnorms(
    model: nn.Module, convs: dict[str, nn.Module], example_inputs: Any
) -> dict[str, tuple[str, nn.Module]]:
    """:func:`fold_pairs` from one forward pass on ``example_inputs``."""
    norms = batchnorms_with_statistics(model)
    if not norms or not convs:
        return {}
    return fold_pairs(record(model, example_inputs), convs, norms)
