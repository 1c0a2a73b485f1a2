"""The composition contract with pruning: QAT keeps module objects and Parameters in place and
keeps per-output-channel state with leading dim == outputs, so a pruner that slices a layer's
outputs (and every own parameter / buffer of that leading size) at convert time, before the
INT8 conversion, leaves a model that still converts exactly."""

from __future__ import annotations

import torch
from quant_helpers import agreement, logits_of
from torch import nn

import slimkit
from slimkit.prune.manifest import set_manifest


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _slice_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """What slimkit.prune's slicing does to one side of a module: replace ``param.data`` so that
    identities survive, and slice every own tensor whose leading dimension is the output size."""
    old = module.weight.shape[0]
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None and tensor.dim() > 0 and tensor.shape[0] == old:
            sliced = tensor.detach().index_select(0, keep).contiguous()
            if name in module._parameters:
                module._parameters[name].data = sliced
            else:
                module._buffers[name] = sliced
    if isinstance(module, nn.Conv2d):
        module.out_channels = len(keep)
    else:
        module.num_features = len(keep)


def test_pruning_slices_at_convert_time_then_int8_still_matches():
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(16, 3, 8, 8)
    slimkit.prepare(model, {"quant": {"learn_scales": True, "freeze_bn_step": 2}}, example_inputs=x)
    conv1, weight = model.conv1, model.conv1.weight
    assert model.conv1.weight_scale.shape == (16,)  # per-output-channel state: leading dim == out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), torch.arange(16) % 4).backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(model)
    assert model.conv1 is conv1 and model.conv1.weight is weight, "QAT must keep module and Parameter objects"

    keep = torch.tensor([i for i in range(16) if i % 4 != 0])  # remove 4 of conv1's 16 channels
    for module in (model.conv1, model.bn1):
        _slice_outputs(module, keep)
    model.conv2.weight.data = model.conv2.weight.detach()[:, keep].contiguous()
    model.conv2.in_channels = len(keep)
    assert model.conv1.weight_scale.shape == (12,)

    model.eval()
    held_out = torch.randn(64, 3, 8, 8)
    fake = logits_of(model, held_out)
    int8 = slimkit.convert(model)
    assert int8.conv1.weight.shape == (12, 3, 3, 3) and int8.conv1.weight.dtype == torch.int8
    assert int8.conv2.weight.shape == (8, 12, 3, 3)
    same, diff = agreement(fake, logits_of(int8, held_out))
    assert same >= 0.99 and diff < 1e-3, (same, diff)


def test_convert_drops_fake_quant_tensors_from_a_pruning_manifest():
    model = Chain()
    x = torch.randn(4, 3, 8, 8)
    slimkit.prepare(model, {"quant": {"mode": "ptq", "learn_scales": True}}, example_inputs=x)
    slimkit.calibrate(model, [x])
    manifest = {"tensors": {"conv1.weight": [12, 3, 3, 3], "conv1.weight_scale": [12], "bn1.weight": [12]}}
    set_manifest(model, manifest)  # as slimkit.prune's convert leaves it
    slimkit.convert_(model)  # in place: the manifest checked is this model's
    assert manifest["tensors"] == {"conv1.weight": [12, 3, 3, 3], "bn1.weight": [12]}
