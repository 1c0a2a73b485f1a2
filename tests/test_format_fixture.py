"""A folder saved by slimkit before the method registry (commit 67bd9a7) still loads, and gives
the outputs it gave then. Regenerate only on purpose (a format change): tests/fixture_models.py."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import slimkit
from slimkit.cli import folder_info
from tests.fixture_models import FixtureCNN

FOLDER = Path(__file__).parent / "fixtures" / "prune_int8_before_registry"


def test_a_pruned_int8_folder_of_the_previous_layout_loads_with_the_same_outputs():
    expected = load_file(str(FOLDER / "expected.safetensors"))
    model = slimkit.from_pretrained(FOLDER, model=FixtureCNN())
    assert model.features[3].out_channels == 8 and model.fc.in_features == 8  # pruned shapes replayed (16 -> 8)
    assert slimkit.quant.is_int8_layer(model.fc) and slimkit.quant.is_int8_layer(model.features[3])
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"]), expected["outputs"], rtol=0, atol=1e-6)
    info = folder_info(FOLDER)
    assert info["pruning"]["tensors"] and set(info["quantization"]["layers"]) == {"features.0", "features.3", "fc"}
