"""Fixtures of the quantization tests; the models and helpers live in quant_helpers.py."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import SmallCNN, cnn_loss

import slimkit
from tests.families import train_steps


@pytest.fixture
def cnn_data():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    held_out = torch.randn(256, 1, 12, 12, generator=g)
    return batches, held_out


@pytest.fixture
def qat_cnn(cnn_data):
    """A SmallCNN after 8 QAT steps (ranges frozen at 5, BN frozen at 6), in eval mode."""
    batches, _ = cnn_data
    torch.manual_seed(0)
    model = SmallCNN()
    recipe = {"quant": {"freeze_observers_step": 5, "freeze_bn_step": 6}}
    slimkit.prepare(model, recipe, example_inputs=batches[0][0])
    train_steps(model, batches, 8, loss=cnn_loss)
    return model
