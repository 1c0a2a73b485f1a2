"""Every error a user of the quant method can meet names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import SmallCNN
from torch import nn

import slimkit
from slimkit.errors import (
    ConfigError,
    IncompatibleError,
    ModuleNameError,
    SlimkitError,
    UnsupportedModelError,
)
from tests.families import hf_model


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.proj(x)
        x = self.attn(x, x, x)[0]
        x = self.temporal(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x.mean(1))


def test_unsupported_layers_are_listed_with_the_exclude_entry():
    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(WithAttention(), {"quant": {}}, example_inputs=torch.randn(2, 5, 8))
    message = str(info.value)
    assert "attn (MultiheadAttention)" in message and "temporal (Conv1d)" in message
    assert 'quant.exclude: ["attn", "temporal"]' in message
    assert "attn.out_proj" not in message  # children of a reported module are not listed again
    model = slimkit.prepare(WithAttention(), {"quant": {"exclude": ["attn", "temporal"]}})
    assert sorted(slimkit.methods_of(model)["quant"].layers) == ["head", "proj"]


def test_a_conv_subclass_with_its_own_forward_is_reported():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return self._conv_forward(x, w, self.bias)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = StdConv(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.stem(x).mean((2, 3)))

    with pytest.raises(UnsupportedModelError, match=r"stem \(StdConv\): StdConv overrides Conv2d.forward"):
        slimkit.prepare(Net(), {"quant": {"fold_bn": False}})


def test_an_exclude_pattern_that_matches_nothing_names_close_matches():
    with pytest.raises(ModuleNameError, match="conv9"):
        slimkit.prepare(SmallCNN(), {"quant": {"exclude": ["conv9"]}}, example_inputs=torch.randn(1, 1, 8, 8))


def test_excluding_every_layer_is_an_error():
    with pytest.raises(UnsupportedModelError, match="no layer to quantize"):
        slimkit.prepare(SmallCNN(), {"quant": {"exclude": ["conv*", "fc"]}}, example_inputs=torch.randn(1, 1, 8, 8))


def test_converting_before_the_observers_saw_data_says_so():
    x = torch.randn(2, 1, 8, 8)
    model = slimkit.prepare(SmallCNN(), {"quant": {"mode": "ptq"}}, example_inputs=x)
    with pytest.raises(IncompatibleError, match=r"never saw data .*slimkit.calibrate"):
        slimkit.convert(model)
    qat = slimkit.prepare(SmallCNN(), {"quant": {"start_step": 10}}, example_inputs=x)
    with pytest.raises(IncompatibleError, match=r"4 of 4 quantized layers never saw data.*quant.start_step \(10\)"):
        slimkit.convert(qat)


@pytest.mark.parametrize("bits", [4, 16])
def test_bit_widths_other_than_8_and_7_are_rejected_by_the_recipe(bits):
    with pytest.raises(ConfigError, match=rf"quant.weights.bits: must be 8, 7 .* or auto; got {bits}"):
        slimkit.Recipe.from_dict({"quant": {"weights": {"bits": bits}}})
    with pytest.raises(ConfigError, match="quant.activations.bits: activations are 8-bit"):
        slimkit.Recipe.from_dict({"quant": {"activations": {"bits": bits}}})
    with pytest.raises(ConfigError, match="quant.activations.bits: activations are 8-bit .*weights.bits: 7"):
        slimkit.Recipe.from_dict({"quant": {"activations": {"bits": 7}}})


def test_weight_settings_the_int8_kernels_cannot_run_are_rejected():
    with pytest.raises(ConfigError, match="quant.weights.symmetric: false is not supported"):
        slimkit.Recipe.from_dict({"quant": {"weights": {"symmetric": False}}})
    with pytest.raises(ConfigError, match="quant.weights.observer: 'moving_average_minmax' is for activations"):
        slimkit.Recipe.from_dict({"quant": {"weights": {"observer": "moving_average_minmax"}}})
    with pytest.raises(ConfigError, match="activations.granularity"):
        slimkit.Recipe.from_dict({"quant": {"activations": {"granularity": "per_channel"}}})


def test_a_missing_int8_engine_is_named(monkeypatch, qat_cnn):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "oneDNN" in slimkit.quant.int8_engine_problem()
    with pytest.raises(IncompatibleError, match=r"needs the oneDNN x86 int8 engine \('onednn'\).*export_onnx"):
        slimkit.convert(qat_cnn)


def test_a_non_x86_cpu_is_named(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert slimkit.quant.int8_engine_problem() == "this CPU is aarch64, not x86"


def test_calibrate_errors():
    with pytest.raises(SlimkitError, match="without a 'prune' or 'quant' recipe section"):
        slimkit.calibrate(
            slimkit.prepare(hf_model("bert").eval(), {"distill": {}}, teacher=hf_model("bert").eval()), []
        )
    dynamic = slimkit.prepare(hf_model("bert").eval(), {"quant": {"mode": "dynamic"}})
    with pytest.raises(IncompatibleError, match="nothing to calibrate"):
        slimkit.calibrate(dynamic, [])
    ptq = slimkit.prepare(SmallCNN(), {"quant": {"mode": "ptq"}}, example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(SlimkitError, match="yielded no batches"):
        slimkit.calibrate(ptq, [])
    with pytest.raises(SlimkitError, match="cannot feed a batch of type str"):
        slimkit.calibrate(ptq, ["not a tensor"])
    with pytest.raises(SlimkitError, match="num_batches must be >= 1"):
        slimkit.calibrate(ptq, [torch.randn(1, 1, 8, 8)], num_batches=0)


def test_export_onnx_of_a_model_still_prepared_for_training(qat_cnn, tmp_path):
    with pytest.raises(IncompatibleError, match=r"still prepared for training.*slimkit.convert"):
        slimkit.export_onnx(qat_cnn, tmp_path / "m.onnx", torch.randn(1, 1, 12, 12))


def test_compile_needs_a_converted_model():
    with pytest.raises(SlimkitError, match="has no INT8 layers; call slimkit.convert"):
        slimkit.quant.compile_int8(SmallCNN())


def test_preparing_quant_twice_is_refused():
    x = torch.randn(1, 1, 8, 8)
    model = slimkit.prepare(SmallCNN(), {"quant": {}}, example_inputs=x)
    with pytest.raises(SlimkitError, match="already prepared for 'quant'"):
        slimkit.prepare(model, {"quant": {}}, example_inputs=x)


def test_register_plain_forward_makes_an_equivalent_subclass_quantizable():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = MyLinear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(UnsupportedModelError, match="MyLinear overrides Linear.forward"):
        slimkit.prepare(Net(), {"quant": {}})
    slimkit.quant.register_plain_forward(MyLinear)
    assert list(slimkit.methods_of(slimkit.prepare(Net(), {"quant": {}}))["quant"].layers) == ["fc"]


def test_timm_linear_is_quantized_like_nn_linear():
    timm = pytest.importorskip("timm")

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = timm.layers.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    model = slimkit.prepare(Head(), {"quant": {}})
    assert type(model.fc).__name__.startswith("QAT") and isinstance(model.fc, timm.layers.Linear)
    assert hasattr(model.fc, "input_quantizer")


@pytest.mark.parametrize("mode", ["qat", "dynamic"])
def test_recurrent_layers_are_refused_with_the_exclude_entry_and_the_reason(mode):
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    x = torch.randn(2, 5, 8)
    with pytest.raises(
        UnsupportedModelError, match=r'(?s)no oneDNN int8 kernel for recurrent.*quant.exclude: \["rnn"\]'
    ):
        slimkit.prepare(Tagger(), {"quant": {"mode": mode}}, example_inputs=x)
    model = slimkit.prepare(Tagger(), {"quant": {"mode": mode, "exclude": ["rnn"]}}, example_inputs=x)
    assert type(model.rnn) is torch.nn.LSTM  # kept in float; the head is quantized
    assert type(model.head).__name__.startswith("QAT")
