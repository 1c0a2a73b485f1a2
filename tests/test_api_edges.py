"""The edges of the plain-loop API: convert (a copy) and convert_ (in place), errors for bad calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit

RECIPE = {"prune": {"channels": 0.5, "include": ["hidden"], "schedule": {"kind": "one_shot", "start_step": 1}}}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(x)))


def _mlp():
    torch.manual_seed(0)
    return MLP()


def test_convert_copies_by_default_and_convert_underscore_works_in_place():
    x = torch.randn(3, 8)
    model = slimkit.prepare(_mlp(), RECIPE, example_inputs=x)
    slimkit.step(model)  # the one-shot point: masks set, shapes unchanged

    small = slimkit.convert(model)  # a copy (the default), as torch.ao.quantization.convert
    assert small is not model
    assert small.hidden.out_features == 8  # half the 16 hidden channels cut out of the copy
    assert model.hidden.out_features == 16 and list(slimkit.methods_of(model)) == ["prune"]
    slimkit.step(model)  # the original is still prepared

    assert slimkit.convert(model, inplace=False).hidden.out_features == 8 and slimkit.methods_of(model)
    again = slimkit.convert_(model)  # in place: the same object, no longer prepared
    assert again is model and model.hidden.out_features == 8 and slimkit.methods_of(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))


def test_compute_loss_without_labels_is_a_slimkit_error():
    x = torch.randn(3, 8)
    model = slimkit.prepare(_mlp(), RECIPE, example_inputs=x)
    with pytest.raises(slimkit.SlimkitError, match=r"MLP carry no loss; pass labels="):
        slimkit.compute_loss(model, model(x))


def test_methods_of_an_unprepared_model_is_empty():
    assert slimkit.methods_of(_mlp()) == {}


def test_convert_inplace_false_keeps_the_kd_hook_of_the_original():
    x, y = torch.randn(3, 8), torch.tensor([0, 1, 2])
    model = slimkit.prepare(_mlp(), {"distill": {"alpha": 0.5}}, teacher=_mlp(), example_inputs=x)
    small = slimkit.convert(model, inplace=False)
    assert not small._forward_hooks  # the copy's hooks are gone ...
    model.train()
    slimkit.compute_loss(model, model(x), labels=y)
    assert {"distill/kd", "distill/task"} <= set(slimkit.log_values(model))  # ... the original's still run
