"""Weights the CPU's int8 kernels compute exactly: 7-bit on x86 CPUs without VNNI.

Without VNNI, oneDNN's u8 x s8 kernels add each pair of products in int16 with saturation, so
8-bit weights (up to 127) against uint8 inputs (up to 255) can be clipped; 7-bit weights cannot.
``quant.weights.bits: auto`` (the default) picks 7 there, and a model with 8-bit weights warns
on such a CPU. What the CPU is, is patched where a test must not depend on the machine.
"""

import copy
import logging

import pytest
import torch
from quant_helpers import SmallCNN, logits_of

import slimkit
from slimkit.quant import int8_hardware
from slimkit.quant.int8 import int8_state


def _converted(bits, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the PTQ fake-quant model, its INT8 conversion) of the tests' SmallCNN."""
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)]
    recipe = {"quant": {"mode": "ptq", "compile": "never", "weights": {"bits": bits}}}
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    fake = copy.deepcopy(model)
    return fake, slimkit.convert(model).eval()


def _int8_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if int8_state(m) is not None]


@pytest.mark.parametrize(("bits", "qmax"), [(7, 63), (8, 127)])
def test_weights_use_the_levels_of_their_bit_width_and_match_fake_quant(bits, qmax):
    fake, int8 = _converted(bits)
    weights = _int8_weights(int8)
    assert weights and all(int(w.abs().amax()) == qmax for w in weights)  # per channel: the max reaches qmax
    # on a CPU without VNNI the 8-bit layers run as two exact halves (test below): exact here too
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    expected, got = logits_of(fake, x), logits_of(int8, x)
    assert float((got - expected).norm() / expected.norm()) < 2e-3


def test_auto_means_7_bits_where_the_kernels_saturate_and_8_elsewhere(monkeypatch):
    monkeypatch.setattr(int8_hardware, "saturating_cpu", lambda: True)
    assert max(int(w.abs().amax()) for w in _int8_weights(_converted("auto")[1])) == 63
    monkeypatch.setattr(int8_hardware, "saturating_cpu", lambda: False)
    assert max(int(w.abs().amax()) for w in _int8_weights(_converted("auto")[1])) == 127


def test_8_bit_weights_warn_once_on_a_cpu_without_vnni(monkeypatch, caplog):
    monkeypatch.setattr(int8_hardware, "saturating_cpu", lambda: True)
    monkeypatch.setattr(int8_hardware, "_warned", set())
    x = torch.randn(2, 1, 12, 12)
    with caplog.at_level(logging.WARNING, logger="slimkit"):
        logits_of(_converted(7)[1], x)
        assert "int16" not in caplog.text
        _, model = _converted(8)
        assert "no VNNI" not in caplog.text  # said at the first call: a loaded model has its weights by then
        logits_of(model, x)
        assert "no VNNI" in caplog.text and "quant.weights.bits: auto (the default) or 7" in caplog.text
        assert "SmallCNN (conv1, conv2, conv3, ...)" in caplog.text
        caplog.clear()
        logits_of(_converted(8, seed=1)[1], x)
    assert "no VNNI" not in caplog.text  # once per model class
    monkeypatch.setattr(int8_hardware, "saturating_cpu", lambda: False)
    monkeypatch.setattr(int8_hardware, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="slimkit"):
        int8_hardware.warn_if_saturating(model)
    assert "no VNNI" not in caplog.text


@pytest.mark.skipif(not int8_hardware.saturating_cpu(), reason="this CPU has VNNI: its int8 kernels do not saturate")
def test_this_cpus_kernels_saturate_with_8_bit_weights_and_not_with_7():
    """The premise, on the machine itself: oneDNN's u8 x s8 convolution against the exact result."""
    g = torch.Generator().manual_seed(0)
    x_scale, x_zp = 0.02, 0
    qx = torch.randint(0, 256, (4, 64, 8, 8), dtype=torch.uint8, generator=g)
    qx = qx.contiguous(memory_format=torch.channels_last)
    errors = {}
    for qmax in (127, 63):
        w = torch.randint(-qmax, qmax + 1, (64, 64, 3, 3), dtype=torch.int8, generator=g)
        w_scale = torch.full((64,), 0.005)
        packed = torch.ops.onednn.qconv_prepack(w, w_scale, x_scale, x_zp, [1, 1], [1, 1], [1, 1], 1, None)
        out = torch.ops.onednn.qconv2d_pointwise(
            qx, x_scale, x_zp, packed, w_scale, torch.zeros(64, dtype=torch.int64), None,
            [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        exact = torch.nn.functional.conv2d((qx.float() - x_zp) * x_scale, w.float() * 0.005, None, 1, 1)
        errors[qmax] = float((out - exact).norm() / exact.norm())
    assert errors[127] > 0.01 and errors[63] < 1e-5, errors


@pytest.mark.skipif(not int8_hardware.saturating_cpu(), reason="this CPU has VNNI: one kernel call is exact")
@pytest.mark.parametrize("mode", ["never", "always"])
def test_8_bit_weights_run_exactly_as_two_halves_on_this_cpu(mode, monkeypatch):
    """A model with 8-bit weights (saved on another CPU, or bits: 8) on a CPU without VNNI: every
    such layer runs as high (2s) + low (s) halves, eagerly, and matches its fake-quant model."""
    monkeypatch.setattr(int8_hardware, "_warned", set())
    fake, int8 = _converted(8)
    slimkit.quant.set_compile(int8, mode)
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    expected, got = logits_of(fake, x), logits_of(int8, x)
    assert float((got - expected).norm() / expected.norm()) < 2e-3
    report = slimkit.quant.runtime_report(int8)
    assert "CPU without VNNI" in report["eager"] and not report["signatures"]  # nothing compiled
    monkeypatch.setattr(int8_hardware, "saturating_cpu", lambda: False)  # one call per layer: saturates
    one_call = copy.deepcopy(int8)
    slimkit.quant.set_compile(one_call, "never")
    assert float((logits_of(one_call, x) - expected).norm() / expected.norm()) > 2e-3
