"""PTQ tools: cross-layer equalization (float function unchanged, ranges equalized, through ReLU,
pooling and depthwise convs) and bias correction (less mean output error on held-out data)."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import logits_of
from torch import nn

import slimkit
from slimkit.errors import ConfigError


class DepthwiseNet(nn.Module):
    """conv-BN-ReLU -> depthwise conv-BN-ReLU -> max-pool -> pointwise conv -> ReLU -> pool -> Linear,
    with channels of very different scales (what equalization is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv1.weight.mul_(torch.logspace(-2, 1, 16).reshape(-1, 1, 1, 1))
            self.dw.weight.mul_(torch.rand(16, 1, 1, 1, generator=g) * 10)
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.weight.uniform_(0.2, 3.0, generator=g)
                bn.bias.uniform_(-0.2, 0.2, generator=g)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.dw(x))), 2)
        x = torch.relu(self.pw(x))
        return self.fc(x.mean((2, 3)))


def _data(seed: int, n: int = 4, batch: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


def _ranges(model):
    def out_range(conv, bn):
        factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()
        return conv.weight.abs().flatten(1).amax(1) * factor

    return {
        "conv1->dw": (out_range(model.conv1, model.bn1), model.dw.weight.abs().flatten(1).amax(1)),
        "dw->pw": (out_range(model.dw, model.bn2), model.pw.weight.abs().transpose(0, 1).flatten(1).amax(1)),
    }


def test_equalization_keeps_the_float_function_and_equalizes_ranges():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    x = _data(1)[0]
    expected = logits_of(model, x)
    before = _ranges(model)
    assert all((a / b).max() / (a / b).min() > 10 for a, b in before.values())  # far from equal to start
    slimkit.prepare(model, {"quant": {"mode": "ptq", "equalization": True}}, example_inputs=x)
    pairs = [(p.producer, p.consumer) for p in slimkit.methods_of(model)["quant"].equalized]
    assert pairs == [("conv1", "dw"), ("dw", "pw"), ("pw", "fc")]  # through ReLU, max-pool, depthwise, mean
    assert torch.allclose(logits_of(model, x), expected, atol=1e-5, rtol=1e-5)  # not calibrated: float
    for name, (a, b) in _ranges(model).items():
        assert torch.allclose(a, b, rtol=1e-3), name


def test_equalization_stops_at_relu6_and_residual_branches():
    class Blocked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = nn.functional.relu6(self.a(x))  # not positive-homogeneous
            z = torch.relu(self.b(y))
            return self.c(z) + z  # z has two readers

    model = Blocked().eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq", "equalization": True}}, example_inputs=torch.randn(2, 3, 8, 8))
    assert slimkit.methods_of(model)["quant"].equalized == []


def _int8(model, data, **quant):
    model = copy.deepcopy(model)
    recipe = {"quant": {"mode": "ptq", "compile": "never", "weights": {"granularity": "per_tensor"}, **quant}}
    slimkit.prepare(model, recipe, example_inputs=data[0])
    slimkit.calibrate(model, data)
    return slimkit.convert(model)


def test_bias_correction_reduces_the_mean_output_error_on_held_out_data():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    calibration, held_out = _data(2), torch.cat(_data(3))
    reference = logits_of(model, held_out)

    def mean_error(int8):
        return (logits_of(int8, held_out) - reference).mean(0).abs().mean().item()

    plain = mean_error(_int8(model, calibration))
    corrected_model = _int8(model, calibration, bias_correction=True)
    corrected = mean_error(corrected_model)
    print(f"\nmean output error: plain {plain:.4g}, bias-corrected {corrected:.4g}")
    assert corrected < 0.8 * plain  # activation rounding (not corrected) stays
    assert "bias_correction" not in corrected_model.state_dict() and not any(
        k.endswith("bias_correction") for k in corrected_model.state_dict()
    )


def test_bias_correction_state_survives_a_checkpoint_and_is_refused_in_dynamic_mode():
    model = DepthwiseNet().eval()
    data = _data(4)
    slimkit.prepare(model, {"quant": {"mode": "ptq", "bias_correction": True}}, example_inputs=data[0])
    slimkit.calibrate(model, data)
    state = model.state_dict()
    assert state["pw.bias_correction"].abs().sum() > 0
    fresh = DepthwiseNet().eval()
    slimkit.prepare(fresh, {"quant": {"mode": "ptq", "bias_correction": True}}, example_inputs=data[0])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.pw.bias_correction, model.pw.bias_correction)
    with pytest.raises(ConfigError, match="bias_correction"):
        slimkit.Recipe.from_dict({"quant": {"mode": "dynamic", "bias_correction": True}})
    with pytest.raises(ConfigError, match="equalization"):
        slimkit.Recipe.from_dict({"prune": {"channels": 0.5}, "quant": {"equalization": True, "start_step": 5}})


def test_needs_calibration_is_true_only_where_a_method_cannot_go_on_without_it():
    """PTQ waits for calibrate until its ranges are observed; QAT observes them while training,
    so a training script must not calibrate it at step 0 (its ranges would come from the model
    before training)."""
    data = _data(3)
    ptq = slimkit.prepare(DepthwiseNet(), {"quant": {"mode": "ptq"}}, example_inputs=data[0])
    assert slimkit.needs_calibration(ptq)
    slimkit.calibrate(ptq, data)
    assert not slimkit.needs_calibration(ptq)
    qat = slimkit.prepare(DepthwiseNet(), {"quant": {"start_step": 10}}, example_inputs=data[0])
    assert not slimkit.needs_calibration(qat)
    slimkit.calibrate(qat, data)  # still allowed: QAT may start from calibrated ranges
