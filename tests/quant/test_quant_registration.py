"""Model-family knowledge reaches quantization through registrations (the adapters' calls), never
through class names in the core: transposed Linear layers, BatchNorm remainders."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from quant_helpers import logits_of
from safetensors.torch import save_file
from torch import nn

import slimkit
from slimkit.quant import register_norm_remainder, register_transposed_linear, state_of
from slimkit.quant.fold import norm_remainder
from slimkit.quant.layers import layer_kind


class BatchNormSiLU(nn.BatchNorm2d):
    """A BatchNorm that also runs an activation, like timm's BatchNormAct2d."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = BatchNormSiLU(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _random_statistics(model: ConvBNAct) -> ConvBNAct:
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.2, 3)
    return model.eval()


def test_a_registered_norm_remainder_runs_alone_once_folded_and_after_loading(tmp_path):
    torch.manual_seed(0)
    assert norm_remainder(BatchNormSiLU(6)) is None  # unknown: a folded one would run its own forward
    calls = []

    def remainder(bn, x):
        calls.append(1)
        return bn.act(x)

    register_norm_remainder(f"{__name__}.BatchNormSiLU", remainder)  # by class path: nothing imported
    assert norm_remainder(BatchNormSiLU(6)) is remainder

    model = _random_statistics(ConvBNAct())
    x = torch.randn(8, 3, 8, 8)
    float_out = logits_of(model, x)
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=x)
    assert slimkit.methods_of(model)["quant"].folded == {"conv": "bn"}
    slimkit.calibrate(model, [x, torch.randn(16, 3, 8, 8)])
    calls.clear()
    fake = logits_of(model, x)
    assert calls, "the folded BatchNorm must run only its remainder (the conv computes the normalization)"
    torch.testing.assert_close(fake, float_out, rtol=0, atol=0.1)  # fake-quant stays near the float model

    int8 = slimkit.convert(model)
    assert type(int8.bn) is not nn.Identity and state_of(int8.bn).batchnorm.neutral  # kept for its SiLU
    # it runs only its remainder, so it keeps no statistics or affine tensors to save
    assert int8.bn.weight is None and int8.bn.running_var is None
    assert not [k for k in int8.state_dict() if k.startswith("bn.") and not k.startswith("bn.act.")]
    calls.clear()
    out = logits_of(int8, x)
    assert calls
    torch.testing.assert_close(out, fake, rtol=0, atol=1e-4)

    folder = slimkit.save_pretrained(int8, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["slimkit"]["quantization"]["folded_batchnorms"] == {"bn": "remainder"}
    saved = slimkit.hub.folder_state_dict(folder, model=ConvBNAct())
    assert not [k for k in saved if k.startswith("bn.") and not k.startswith("bn.act.")]
    loaded = slimkit.from_pretrained(folder, model=ConvBNAct())
    assert state_of(loaded.bn).batchnorm.neutral and loaded.bn.running_var is None
    calls.clear()
    torch.testing.assert_close(logits_of(loaded, x), out, rtol=0, atol=1e-6)
    assert calls

    # a folder saved before the "remainder" form: "frozen", the identity statistics in the file
    state = dict(saved)
    state.update({"bn.weight": torch.ones(6), "bn.bias": torch.zeros(6), "bn.running_mean": torch.zeros(6)})
    state.update({"bn.running_var": torch.ones(6), "bn.num_batches_tracked": torch.tensor(0)})
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, old / "model.safetensors")
    config["slimkit"]["quantization"]["folded_batchnorms"] = {"bn": "frozen"}
    config["slimkit"].pop("weights_sha256")
    (old / "config.json").write_text(json.dumps(config))
    loaded_old = slimkit.from_pretrained(old, model=ConvBNAct())
    assert torch.equal(loaded_old.bn.running_var, torch.ones(6)) and loaded_old.bn.eps == 0.0
    torch.testing.assert_close(logits_of(loaded_old, x), out, rtol=0, atol=1e-6)


class TransposedLinear(nn.Module):
    """A Linear whose weight is stored ``[in, out]`` (GPT-2's Conv1D layout)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) / inputs**0.5)
        self.bias = nn.Parameter(torch.randn(outputs) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = TransposedLinear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


def test_a_registered_transposed_linear_is_quantized_like_a_linear():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    plain = slimkit.prepare(Projection(), {"quant": {"mode": "ptq"}}, example_inputs=x)
    assert list(slimkit.methods_of(plain)["quant"].layers) == ["head"]  # unknown layers stay float

    register_transposed_linear(TransposedLinear)
    model = Projection()
    assert layer_kind(model.proj) == "conv1d"
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=x)
    assert sorted(slimkit.methods_of(model)["quant"].layers) == ["head", "proj"]
    slimkit.calibrate(model, [x])
    fake = logits_of(model, x)
    int8 = slimkit.convert(model)
    assert slimkit.quant.is_int8_layer(int8.proj) and int8.proj.weight.dtype == torch.int8
    assert int8.proj.weight.shape == (5, 6)  # stored in the Linear layout the kernels take
    torch.testing.assert_close(logits_of(int8, x), fake, rtol=0, atol=1e-4)


def test_the_core_knows_no_model_family_until_its_adapter_is_imported():
    code = """
import torch, timm.layers, transformers.pytorch_utils
from slimkit.quant.fold import norm_remainder
from slimkit.quant.layers import is_transposed_linear_class, layer_kind
before = (layer_kind(timm.layers.Linear(3, 4)), norm_remainder(timm.layers.BatchNormAct2d(4)),
          is_transposed_linear_class(transformers.pytorch_utils.Conv1D))
import slimkit.plugins.timm, slimkit.plugins.hf_adapters
after = (layer_kind(timm.layers.Linear(3, 4)), norm_remainder(timm.layers.BatchNormAct2d(4)) is not None,
         is_transposed_linear_class(transformers.pytorch_utils.Conv1D))
print(before, after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(None, None, False) ('linear', True, True)", out.stdout + out.stderr
