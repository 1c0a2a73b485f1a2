"""Non-finite numbers and degenerate calibration (issue 10, items 10-12): a NaN batch never
reaches an observer's range, INT8 never turns NaN into finite numbers, and calibration on
constant data is refused (or allowed explicitly), on too few samples warned about."""

from __future__ import annotations

import logging

import pytest
import torch
from quant_helpers import SmallCNN, cnn_loss, logits_of

import slimkit
from slimkit.errors import CalibrationError, NonFiniteError
from tests.families import train_steps


def _quantizers(model):
    return slimkit.methods_of(model)["quant"].quantizers  # introspection of observer state


@pytest.mark.parametrize("observer", ["moving_average_minmax", "minmax", "histogram"])
def test_a_nan_batch_is_ignored_counted_and_logged_and_training_goes_on(observer, cnn_data, caplog):
    batches, held_out = cnn_data
    torch.manual_seed(0)
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"activations": {"observer": observer}}}, example_inputs=batches[0][0])
    train_steps(model, batches, 2, loss=cnn_loss)
    before = {n: q.observer.range() for n, q in _quantizers(model).items()}
    poisoned = batches[0][0].clone()
    poisoned[0, 0, 0, 0] = float("nan")
    model.train()
    for module in model.modules():  # BatchNorm's own running statistics would take the NaN in
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    with caplog.at_level(logging.WARNING, logger="slimkit"):
        out = model(poisoned)  # the forward of a bad batch
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()  # fake-quant keeps the NaN visible
    assert "ignored a batch holding NaN / inf" in caplog.text
    first = _quantizers(model)["conv1.input_quantizer"]
    assert int(first.observer.nonfinite_batches) == 1
    assert slimkit.log_values(model)["quant/nonfinite_batches"] == 1.0
    for name, quantizer in _quantizers(model).items():  # downstream ones saw NaN too: all unchanged
        assert all(torch.equal(a, b) for a, b in zip(quantizer.observer.range(), before[name])), name
        assert torch.isfinite(quantizer.scale).all(), name
    train_steps(model, batches, 2, loss=cnn_loss)
    quant_state = {k: v for k, v in model.state_dict().items() if "quantizer" in k and v.is_floating_point()}
    assert quant_state and all(torch.isfinite(v).all() for v in quant_state.values()), "checkpoint has NaN"
    int8 = slimkit.convert(model)
    assert torch.isfinite(logits_of(int8, held_out)).all()


def test_checkpoints_from_before_the_count_still_load(cnn_data):
    batches, _ = cnn_data
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {}}, example_inputs=batches[0][0])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("nonfinite_batches")}
    model.load_state_dict(state)  # strict


def test_a_nan_learned_scale_is_refused_at_convert(cnn_data):
    batches, _ = cnn_data
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"learn_scales": True}}, example_inputs=batches[0][0])
    train_steps(model, batches, 2, loss=cnn_loss)
    with torch.no_grad():
        model.conv1.input_quantizer.scale.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="input of conv1"):
        slimkit.convert(model)


@pytest.mark.parametrize("compile_mode", ["never", "always", "onnxruntime"])
def test_int8_refuses_nan_and_inf_inputs_eager_and_compiled(compile_mode, cnn_data):
    batches, held_out = cnn_data
    model = SmallCNN().eval()
    recipe = {"quant": {"mode": "ptq", "compile": compile_mode}}
    slimkit.prepare(model, recipe, example_inputs=batches[0][0])
    slimkit.calibrate(model, [x for x, _ in batches])
    int8 = slimkit.convert(model).eval()
    assert torch.isfinite(logits_of(int8, held_out[:4])).all()
    for value in (float("nan"), float("inf"), -float("inf")):
        x = held_out[:4].clone()
        x[2, 0, 5, 5] = value
        with pytest.raises(NonFiniteError, match="1 NaN / inf value"):
            logits_of(int8, x)


def _ptq(data, **kwargs):
    model = SmallCNN().eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq", "compile": "never"}}, example_inputs=data[0])
    slimkit.calibrate(model, data, **kwargs)
    return model


def test_all_zero_calibration_is_refused_unless_allowed():
    zeros = [torch.zeros(16, 1, 12, 12) for _ in range(2)]
    with pytest.raises(CalibrationError, match="allow_degenerate=True"):
        _ptq(zeros)
    model = _ptq(zeros, allow_degenerate=True)
    assert slimkit.convert_(model) is model


def test_calibration_on_one_sample_warns():
    with pytest.warns(UserWarning, match="only 1 sample"):
        _ptq([torch.randn(1, 1, 12, 12)])
    with pytest.warns(UserWarning, match="only 8 sample"):  # 2 batches of 4
        _ptq([torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)])
