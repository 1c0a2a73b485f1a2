"""Folders saved by earlier slimkits still load and give the outputs they gave then: format 1
from before the method registry (commit 67bd9a7), format 2 (small tensors packed,
slimkit.packing) as first written. Never regenerate one; add a folder for a new format
(tests/fixture_models.py writes it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimkit
from slimkit.cli import folder_info
from tests.fixture_models import FixtureCNN

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, version", [("prune_int8_before_registry", 1), ("prune_int8_packed", 2)])
def test_a_pruned_int8_folder_of_an_earlier_format_loads_with_the_same_outputs(name, version):
    folder = FIXTURES / name
    expected = load_file(str(folder / "expected.safetensors"))
    model = slimkit.from_pretrained(folder, model=FixtureCNN())
    assert model.features[3].out_channels == 8 and model.fc.in_features == 8  # pruned shapes replayed (16 -> 8)
    assert slimkit.quant.is_int8_layer(model.fc) and slimkit.quant.is_int8_layer(model.features[3])
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"]), expected["outputs"], rtol=0, atol=1e-6)
    info = folder_info(folder)
    assert info["format_version"] == version
    assert info["pruning"]["tensors"] and set(info["quantization"]["layers"]) == {"features.0", "features.3", "fc"}
