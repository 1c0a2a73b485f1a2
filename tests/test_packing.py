"""INT8 folders pack their small tensors (slimkit.packing): a smaller file, the same model
back, and a packed tensor that does not fit the rebuilt model is refused before it loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import slimkit
from slimkit import FormatError
from slimkit.hub import folder_state_dict, student_state_dict
from slimkit.packing import MAX_PACKED_NUMEL, PACKED_PREFIX
from tests.fixture_models import FixtureCNN, fixture_inputs


def _int8_fixture_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = slimkit.prepare(
        FixtureCNN(), {"quant": {"mode": "ptq", "compile": "never"}}, example_inputs=fixture_inputs()
    )
    slimkit.calibrate(model, [fixture_inputs() * s for s in (0.5, 1.0, 2.0, 1.5)])
    return slimkit.convert(model)


def _raw(file):
    with safe_open(str(file), framework="pt") as f:
        return load_file(str(file)), dict(f.metadata())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _int8_fixture_cnn()
    folder = slimkit.save_pretrained(model, tmp_path_factory.mktemp("packed") / "int8", model_card=False)
    return model, folder


def _rewritten(saved, tmp_path, edit):
    """A copy of the saved folder whose weights file went through ``edit(state, metadata)``."""
    _, folder = saved
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    state, metadata = _raw(copy / "model.safetensors")
    edit(state, metadata)
    save_file(state, str(copy / "model.safetensors"), metadata=metadata)
    config = json.loads((copy / "config.json").read_text())
    config["slimkit"].pop("weights_sha256")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_an_int8_folder_packs_its_small_tensors_and_loads_the_same_model(saved, tmp_path):
    model, folder = saved
    state, metadata = _raw(folder / "model.safetensors")
    packed = sorted(k for k in state if k.startswith(PACKED_PREFIX))
    assert packed == [PACKED_PREFIX + d for d in ("F32", "I32", "I8")]  # scales and biases, zero points, weights
    assert all(math.prod(t.shape) > MAX_PACKED_NUMEL for k, t in state.items() if k not in packed)
    assert set(metadata) >= set(packed)
    assert json.loads((folder / "config.json").read_text())["slimkit"]["format_version"] == 2

    live = student_state_dict(model)
    unpacked = folder_state_dict(folder, model=FixtureCNN())
    assert set(unpacked) == set(live) and all(torch.equal(unpacked[k], live[k]) for k in live)
    assert all(unpacked[k].dtype == live[k].dtype for k in live)
    loaded = slimkit.from_pretrained(folder, model=FixtureCNN())
    with torch.no_grad():
        assert torch.equal(loaded(fixture_inputs()), model(fixture_inputs()))

    # the same tensors stored one by one (format 1) still load, into the same model, from a larger file
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    save_file(live, str(plain / "model.safetensors"))
    config = json.loads((plain / "config.json").read_text())
    config["slimkit"].update(format_version=1)
    config["slimkit"].pop("weights_sha256")
    (plain / "config.json").write_text(json.dumps(config))
    again = slimkit.from_pretrained(plain, model=FixtureCNN())
    with torch.no_grad():
        assert torch.equal(again(fixture_inputs()), model(fixture_inputs()))
    packed_bytes, plain_bytes = ((f / "model.safetensors").stat().st_size for f in (folder, plain))
    assert packed_bytes < 0.75 * plain_bytes, (packed_bytes, plain_bytes)


def test_a_loaded_packed_model_saves_again_without_shared_storage(saved, tmp_path):
    _, folder = saved
    loaded = slimkit.from_pretrained(folder, model=FixtureCNN())
    again = slimkit.save_pretrained(loaded, tmp_path / "again", model_card=False)
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(folder / "model.safetensors")).keys()


def test_float_folders_are_not_packed(tmp_path):
    folder = slimkit.save_pretrained(FixtureCNN(), tmp_path / "fp32", model_card=False)
    assert not [k for k in load_file(str(folder / "model.safetensors")) if k.startswith(PACKED_PREFIX)]
    assert json.loads((folder / "config.json").read_text())["slimkit"]["format_version"] == 1


def _longer(state, metadata):
    state[PACKED_PREFIX + "F32"] = torch.cat([state[PACKED_PREFIX + "F32"], torch.ones(1)])


def _other_names(state, metadata):
    metadata[PACKED_PREFIX + "F32"] = "0" * 64


def _wrong_dtype(state, metadata):
    state[PACKED_PREFIX + "F32"] = state[PACKED_PREFIX + "F32"].double()


def _twice(state, metadata):
    state["fc.bias"] = torch.zeros(10)


def _not_flat(state, metadata):
    state[PACKED_PREFIX + "I32"] = state[PACKED_PREFIX + "I32"].reshape(1, -1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_longer, r"slimkit.packed.F32 holds \d+ values but the rebuilt model's small F32 tensors take"),
        (_other_names, r"slimkit.packed.F32 packs other tensors than the rebuilt model's \d+ small F32 tensors"),
        (_wrong_dtype, r"slimkit.packed.F32 is stored as F64"),
        (_twice, r"fc.bias is stored twice, on its own and packed in slimkit.packed.F32"),
        (_not_flat, r"slimkit.packed.I32 is stored as I32 with shape \(1, \d+\); a packed tensor is 1-D"),
    ],
    ids=["longer", "other-names", "wrong-dtype", "twice", "not-flat"],
)
def test_a_packed_tensor_that_does_not_fit_the_rebuilt_model_is_refused(saved, tmp_path, edit, message):
    folder = _rewritten(saved, tmp_path, edit)
    for load in (
        lambda: slimkit.from_pretrained(folder, model=FixtureCNN()),
        lambda: folder_state_dict(folder, model=FixtureCNN()),
    ):
        with pytest.raises(FormatError, match=message):
            load()


def test_a_timm_int8_folder_is_rebuilt_on_meta_and_unpacked(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": "never"}}, example_inputs=x)
    slimkit.calibrate(model, [x * s for s in (0.5, 1.0, 2.0, 1.5)])
    int8 = slimkit.convert(model)
    folder = slimkit.save_pretrained(int8, tmp_path / "int8", model_card=False)
    live, unpacked = student_state_dict(int8), folder_state_dict(folder)
    assert set(unpacked) == set(live) and all(torch.equal(unpacked[k], live[k]) for k in live)
    raw = load_file(str(folder / "model.safetensors"))
    assert "layer1.0.conv1.input_scale" not in raw and "layer4.1.conv2.weight" in raw  # 0-d packed, 2.4M int8 not
    with torch.no_grad():
        assert torch.equal(slimkit.from_pretrained(folder)(x), int8(x))
