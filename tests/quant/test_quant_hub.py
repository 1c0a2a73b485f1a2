"""INT8 folders: int8 weights + scales in safetensors, rebuilt by from_pretrained with equal outputs."""

from __future__ import annotations

import json

import pytest
import torch
from quant_helpers import logits_of

import slimkit
from slimkit.errors import FormatError
from slimkit.hub import folder_state_dict
from slimkit.quant import is_int8_layer
from tests.families import hf_model, token_batch


def _ptq_int8(model, inputs, compile_mode: str = "never"):  # the folder is under test, not compiling
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": compile_mode}}, example_inputs=inputs)
    slimkit.calibrate(model, [inputs])
    return slimkit.convert(model)


def _tensor_dtypes(folder) -> dict[str, torch.dtype]:
    return {k: t.dtype for k, t in folder_state_dict(folder).items()}


def _resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def test_timm_int8_folder_round_trip_and_size(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    float_dir = slimkit.save_pretrained(_resnet18(), tmp_path / "fp32")
    int8 = _ptq_int8(_resnet18(), x)
    expected = logits_of(int8, x)
    folder = slimkit.save_pretrained(int8, tmp_path / "int8")

    config = json.loads((folder / "config.json").read_text())
    block = config["slimkit"]["quantization"]
    assert block["backend"] == "onednn" and len(block["layers"]) == 21  # 20 convs + fc
    assert block["layers"]["fc"] == {"kind": "linear", "activations": "static"}
    assert block["folded_batchnorms"]["bn1"] == "identity"
    dtypes = _tensor_dtypes(folder)
    assert dtypes["layer1.0.conv1.weight"] == torch.int8 and dtypes["layer1.0.conv1.weight_scale"] == torch.float32
    assert dtypes["layer1.0.conv1.input_zero_point"] == torch.int32
    assert not any(k.startswith("bn1.") for k in dtypes), "folded BatchNorms are not saved"
    ratio = (folder / "model.safetensors").stat().st_size / (float_dir / "model.safetensors").stat().st_size
    assert ratio < 0.27, f"INT8 file is {ratio:.3f} of the FP32 file"

    again = slimkit.from_pretrained(folder)
    assert type(again).__name__ == "ResNet" and is_int8_layer(again.layer4[1].conv2)
    assert torch.equal(logits_of(again, x), expected)
    # saving the loaded model again keeps the structure
    again_folder = slimkit.save_pretrained(again, tmp_path / "again")
    assert json.loads((again_folder / "config.json").read_text())["slimkit"]["quantization"] == block


@pytest.mark.parametrize("factory", ["bert", "gpt2"], ids=["bert", "gpt2"])
def test_hf_int8_folder_round_trip(factory, tmp_path):
    inputs = token_batch(batch=4, seed=0)
    int8 = _ptq_int8(hf_model(factory).eval(), inputs)
    expected = logits_of(int8, inputs)
    folder = slimkit.save_pretrained(int8, tmp_path / "int8")
    again = slimkit.from_pretrained(folder)
    assert type(again) is type(int8)
    assert torch.equal(logits_of(again, inputs), expected)
    dtypes = _tensor_dtypes(folder)
    int8_weights = [k for k, v in dtypes.items() if v == torch.int8]
    assert int8_weights and all(k.endswith(".weight") for k in int8_weights)


def test_dynamic_int8_folder_round_trip(tmp_path):
    model = hf_model("bert").eval()
    slimkit.prepare(model, {"quant": {"mode": "dynamic"}})
    int8 = slimkit.convert(model)
    inputs = token_batch(batch=4, seed=0)
    folder = slimkit.save_pretrained(int8, tmp_path / "dyn")
    layers = json.loads((folder / "config.json").read_text())["slimkit"]["quantization"]["layers"]
    assert {v["activations"] for v in layers.values()} == {"dynamic"}
    assert torch.equal(logits_of(slimkit.from_pretrained(folder), inputs), logits_of(int8, inputs))


def test_a_block_naming_a_missing_layer_is_reported(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    folder = slimkit.save_pretrained(_ptq_int8(_resnet18(), x), tmp_path / "int8")
    config = json.loads((folder / "config.json").read_text())
    config["slimkit"]["quantization"]["layers"]["layer9.conv"] = {"kind": "conv2d", "activations": "static"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="layer9.conv"):
        slimkit.from_pretrained(folder)


@pytest.mark.parametrize("compile_mode", ["never", "onnxruntime"])
def test_an_int8_model_copied_or_loaded_under_inference_mode_runs(compile_mode, tmp_path):
    """A serving process often does everything under ``torch.inference_mode()``: the tensors of
    a model copied or loaded there keep no version counter, which the INT8 layers' kernel caches
    read (they raised "Inference tensors do not track version counter")."""
    import copy

    if compile_mode == "onnxruntime":
        pytest.importorskip("onnxruntime")
    x = torch.randn(4, 3, 32, 32)
    int8 = _ptq_int8(_resnet18(), x, compile_mode).eval()
    folder = slimkit.save_pretrained(int8, tmp_path / "int8")
    with torch.inference_mode():
        expected = int8(x)
        copied = copy.deepcopy(int8)
        loaded = slimkit.from_pretrained(folder)
        assert copied.conv1.weight.is_inference() and loaded.conv1.weight.is_inference()
        assert torch.equal(copied(x), expected)
        assert torch.equal(loaded(x), expected)
