"""quant.keep_fp32: the layers whose INT8 costs the most are measured, kept in float, and say so."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.errors import ConfigError, IncompatibleError
from slimkit.model_info import model_info
from slimkit.quant import is_int8_layer


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _hostile_mlp() -> MLP:
    """An MLP whose fc2 input has one channel 1000x the others (same float function: relu is
    positive-homogeneous), so a per-tensor uint8 grid for that input rounds every other channel
    to a few levels: the one layer that INT8 breaks."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[0] *= 1000.0
        model.fc1.bias[0] *= 1000.0
        model.fc2.weight[:, 0] /= 1000.0
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(6)]


def _ptq(model: nn.Module, batches: list, **quant) -> nn.Module:
    recipe = {"quant": {"mode": "ptq", "compile": "never", **quant}}
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    return model


def _cosine(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cosine_similarity(model(x), reference(x), dim=1).mean())


def test_keep_fp32_count_keeps_the_layer_int8_breaks_and_recovers_the_loss():
    batches, held_out = _batches(), torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    reference = _hostile_mlp()
    plain = slimkit.convert_(_ptq(_hostile_mlp(), batches))
    mixed_prepared = _ptq(_hostile_mlp(), batches, keep_fp32=1)
    with torch.no_grad():
        fake_quant = mixed_prepared(held_out)
    mixed = slimkit.convert_(mixed_prepared)

    assert not is_int8_layer(mixed.fc2) and type(mixed.fc2) is nn.Linear
    assert is_int8_layer(mixed.fc1) and is_int8_layer(mixed.fc3)
    plain_cos, mixed_cos = _cosine(plain, reference, held_out), _cosine(mixed, reference, held_out)
    assert plain_cos < 0.99, f"the test model should be broken by plain INT8 (cosine {plain_cos:.4f})"
    assert mixed_cos > 0.999 > plain_cos
    # the model was prepared again without fc2: fake-quant is what the INT8 model computes
    with torch.no_grad():
        assert torch.allclose(fake_quant, mixed(held_out), atol=1e-4)
    notes = model_info(mixed).report["methods"]["layers kept in float (quant.keep_fp32)"]
    assert notes.startswith("1 of 3 layers kept in float") and "fc2 (+" in notes


def test_keep_fp32_auto_stops_at_the_floor_and_records_why():
    batches = _batches()
    model = _ptq(_hostile_mlp(), batches, keep_fp32="auto", keep_fp32_max=0.9, keep_fp32_floor=0.999)
    quantizer = slimkit.methods_of(model)["quant"]
    choice = quantizer.kept_fp32
    assert choice.layers == ["fc2"], choice  # the floor is met after it: fc1 / fc3 stay INT8
    assert choice.cosine_all_int8 < 0.99 < 0.999 <= choice.cosine_kept
    assert choice.recovery["fc2"] == max(choice.recovery.values())
    assert set(quantizer.layers) == {"fc1", "fc3"}


def test_keep_fp32_folder_reloads_with_the_float_layer(tmp_path):
    batches = _batches()
    mixed = slimkit.convert_(_ptq(_hostile_mlp(), batches, keep_fp32=1))
    folder = slimkit.save_pretrained(mixed, tmp_path / "mixed")
    block = json.loads((folder / "config.json").read_text())["slimkit"]["quantization"]
    assert set(block["layers"]) == {"fc1", "fc3"}
    assert "layers kept in float (quant.keep_fp32)" in (folder / "README.md").read_text()
    again = slimkit.from_pretrained(folder, model=MLP())
    assert type(again.fc2) is nn.Linear and is_int8_layer(again.fc3)
    with torch.no_grad():
        assert torch.equal(again(batches[0]), mixed(batches[0]))


def test_keep_fp32_without_calibration_is_refused_at_convert():
    model = _hostile_mlp()
    slimkit.prepare(model, {"quant": {"keep_fp32": 1, "compile": "never"}}, example_inputs=_batches()[0])
    slimkit.step(model)  # QAT observes ranges while training, but keep_fp32 never measured
    with pytest.raises(IncompatibleError, match=r"keep_fp32 chooses the layers .* slimkit.calibrate"):
        slimkit.convert_(model)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"keep_fp32": 1.5}, "whole number >= 1, a fraction in"),
        ({"keep_fp32": "autp"}, "Did you mean 'auto'"),
        ({"keep_fp32": 2, "mode": "dynamic"}, "mode 'dynamic' has none of"),
        ({"keep_fp32": "auto", "keep_fp32_max": 1.0}, "keep_fp32_max: must be in"),
    ],
)
def test_keep_fp32_bad_values_name_the_field(quant, message):
    with pytest.raises(ConfigError, match=message):
        slimkit.Recipe.from_dict({"quant": quant})


def test_held_weights_compute_what_the_forward_computes():
    """keep_fp32's measurements reuse each fake-quantized weight across passes: same outputs."""
    from slimkit.quant.qat import held_weights

    batches = _batches()
    model = _ptq(_hostile_mlp(), batches).eval()
    layers = list(slimkit.methods_of(model)["quant"].layers.values())
    with torch.no_grad():
        expected = [model(b) for b in batches[1:3]]
        with held_weights(layers):
            assert all(torch.equal(model(b), e) for b, e in zip(batches[1:3], expected))
