"""Fake-quant numerics against PyTorch's reference ops, straight-through gradients, LSQ."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import SmallCNN, cnn_loss
from torch import nn

import slimkit
from slimkit.quant import qat
from slimkit.quant.fake_quant import ActivationQuantizer
from slimkit.quant.numerics import activation_qparams, lsq_fake_quantize, quantize_activation
from slimkit.quant.state import WeightSpec, state_of
from slimkit.recipe import ActivationQuantConfig
from tests.families import train_steps


def _quantizer(observer: str = "minmax", symmetric: bool = False) -> ActivationQuantizer:
    q = ActivationQuantizer(ActivationQuantConfig(observer=observer, symmetric=symmetric))
    q.train()
    q.observe = q.fake_quant = True
    return q


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_fake_quant_matches_torch_per_tensor_reference(symmetric):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3 + 0.7
    q = _quantizer(symmetric=symmetric)
    y = q(x)
    lo, hi = float(x.min()), float(x.max())
    if symmetric:
        scale, zero_point = max(-lo, hi) / 127.5, 128
    else:
        scale = (max(hi, 0) - min(lo, 0)) / 255
        zero_point = int(round(-min(lo, 0) / scale))
    assert float(q.scale) == pytest.approx(scale, rel=1e-6)
    assert int(q.zero_point) == zero_point
    reference = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    # 256 levels at most, and zero is exactly representable (zero padding stays exact)
    assert torch.unique(y).numel() <= 256
    assert float(q(torch.zeros(3))[0]) == 0.0


def test_weight_fake_quant_matches_torch_per_channel_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    spec = WeightSpec(per_channel=True, observer="minmax", percentile=99.99, learn=False)
    qat.attach(conv, "conv2d", spec, ActivationQuantConfig(), dynamic=False, learn_activations=False, bn=None)
    w = conv.weight.detach()
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    reference = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
    torch.testing.assert_close(qat.fake_quant_weight(conv), reference, rtol=0, atol=1e-7)
    weight_int8, int8_scale, _ = qat.int8_parameters(conv)
    assert weight_int8.dtype == torch.int8 and int(weight_int8.abs().max()) == 127
    torch.testing.assert_close(weight_int8.float() * int8_scale.reshape(-1, 1, 1, 1), reference)


def test_gpt2_conv1d_weights_quantize_per_output_column():
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(nf=5, nx=7)  # weight [in=7, out=5]
    spec = WeightSpec(per_channel=True, observer="minmax", percentile=99.99, learn=False)
    qat.attach(layer, "conv1d", spec, ActivationQuantConfig(), dynamic=False, learn_activations=False, bn=None)
    w = layer.weight.detach()
    scale = w.abs().amax(dim=0) / 127
    reference = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(5, dtype=torch.int32), 1, -127, 127)
    torch.testing.assert_close(qat.fake_quant_weight(layer), reference, rtol=0, atol=1e-7)


def test_per_tensor_weights_use_one_scale():
    conv = nn.Conv2d(2, 4, 1)
    spec = WeightSpec(per_channel=False, observer="minmax", percentile=99.99, learn=False)
    qat.attach(conv, "conv2d", spec, ActivationQuantConfig(), dynamic=False, learn_activations=False, bn=None)
    scale = float(conv.weight.detach().abs().max()) / 127
    reference = torch.fake_quantize_per_tensor_affine(conv.weight.detach(), scale, 0, -127, 127)
    torch.testing.assert_close(qat.fake_quant_weight(conv), reference, rtol=0, atol=1e-7)


def test_straight_through_gradient_is_one_inside_and_zero_outside_the_range():
    q = _quantizer()
    q.observe = False
    q.observer.update(torch.tensor([-1.0, 1.0]))
    q.refresh()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.99, 2.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_weight_gradient_is_straight_through():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.5, -0.25]).reshape(2, 1, 1, 1))
    spec = WeightSpec(per_channel=True, observer="minmax", percentile=99.99, learn=False)
    qat.attach(conv, "conv2d", spec, ActivationQuantConfig(), dynamic=False, learn_activations=False, bn=None)
    state_of(conv).layer.weight_fake_quant = True
    conv(torch.ones(1, 1, 2, 2)).sum().backward()
    assert conv.weight.grad.flatten().tolist() == [4.0, 4.0]  # d(sum)/dw = number of pixels


def test_lsq_gradients_match_torch_learnable_fake_quant():
    torch.manual_seed(0)
    x = (torch.randn(64) * 2).requires_grad_()
    scale = torch.tensor([0.05], requires_grad=True)
    zero_point = torch.tensor([100.0], requires_grad=True)
    factor = 1.0 / (x.numel() * 255) ** 0.5
    ref_x = x.detach().clone().requires_grad_()
    ref_scale = scale.detach().clone().requires_grad_()
    ref_zp = zero_point.detach().clone().requires_grad_()
    reference = torch._fake_quantize_learnable_per_tensor_affine(ref_x, ref_scale, ref_zp, 0, 255, factor)
    ours = lsq_fake_quantize(x, scale, zero_point, 0, 255)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    upstream = torch.randn(64)
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(scale.grad, ref_scale.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(zero_point.grad, ref_zp.grad, rtol=1e-4, atol=1e-6)


def test_learned_scales_train_and_start_from_the_observer(cnn_data):
    batches, _ = cnn_data
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"learn_scales": True}}, example_inputs=batches[0][0])
    assert isinstance(model.conv2.weight_scale, nn.Parameter) and model.conv2.weight_scale.shape == (16,)
    quantizer = model.conv3.input_quantizer
    assert isinstance(quantizer.scale, nn.Parameter) and not bool(quantizer.initialized)
    train_steps(model, batches[:1], 1, loss=cnn_loss)
    assert bool(quantizer.initialized)
    first = quantizer.scale.detach().clone()
    weight_scale = model.conv2.weight_scale.detach().clone()
    train_steps(model, batches, 4, loss=cnn_loss, lr=0.05)
    assert not torch.equal(first, quantizer.scale.detach()), "the activation scale was not learned"
    assert not torch.equal(weight_scale, model.conv2.weight_scale.detach()), "weight scales were not learned"


def test_quantize_activation_rounds_half_to_even_like_the_kernels():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.1
    assert quantize_activation(x, 0.1, 10).tolist() == [10, 12, 12, 10]


def test_activation_qparams_keep_zero_in_range_for_positive_inputs():
    scale, zero_point = activation_qparams(torch.tensor(2.0), torch.tensor(6.0), symmetric=False)
    assert int(zero_point) == 0 and float(scale) == pytest.approx(6.0 / 255)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_fake_quant_keeps_nan_and_inf_and_its_gradient_is_the_fused_kernels(bad):
    """The CPU shortcut (a range check, no select) and the traced path (the select) give the
    same values and gradients: finite inputs get the kernel's grid and its straight-through
    gradient, a NaN / inf stays where it was."""
    from slimkit.quant.numerics import fake_quantize_activation

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 4) * 2).requires_grad_()
    if bad is not None:
        with torch.no_grad():
            x[1, 2, 3, 0] = bad
    scale, zero_point = torch.tensor(0.01), torch.tensor(100, dtype=torch.int32)
    y = fake_quantize_activation(x, scale, zero_point)
    y.sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    fused = torch.fake_quantize_per_tensor_affine(reference_x, scale, zero_point, 0, 255)
    reference = torch.where(torch.isfinite(reference_x), fused, reference_x)
    reference.sum().backward()
    assert torch.equal(y, reference) or (bad is not None and torch.allclose(y, reference, equal_nan=True))
    assert torch.equal(x.grad, reference_x.grad)
    finite = torch.isfinite(x.detach())
    assert torch.equal(y.detach()[finite], fused.detach()[finite])
    if bad is not None:
        got = y.detach()[1, 2, 3, 0]
        assert torch.isnan(got) if bad != bad else got == bad
    assert 0 < int((x.grad == 0).sum()) < x.numel()  # clipped values get no gradient, the rest do


def test_fake_quant_of_an_empty_tensor_is_empty():
    from slimkit.quant.numerics import fake_quantize_activation

    y = fake_quantize_activation(torch.empty(0, 4), torch.tensor(0.1), torch.tensor(0, dtype=torch.int32))
    assert y.shape == (0, 4)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_fake_quant_values_and_gradients_are_pytorchs(per_channel):
    """Clipped weights included: slimkit's backward selects by the kernel's mask where PyTorch's
    multiplies by it; the numbers must not differ."""
    from slimkit.quant.numerics import fake_quantize_weight

    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    upstream = torch.randn(6, 3, 3, 3)
    scale = torch.full((6,), 1.0 / 63) if per_channel else torch.tensor(1.0 / 63)  # clips |w| > 1
    ours = fake_quantize_weight(w, scale, axis=0, qmax=63)
    (ours * upstream).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    if per_channel:
        reference = torch.fake_quantize_per_channel_affine(ref_w, scale, torch.zeros(6, dtype=torch.int32), 0, -63, 63)
    else:
        reference = torch.fake_quantize_per_tensor_affine(ref_w, scale, torch.zeros((), dtype=torch.int32), -63, 63)
    (reference * upstream).sum().backward()
    assert torch.equal(ours, reference)
    assert torch.equal(w.grad, ref_w.grad)
    assert 0 < int((w.grad == 0).sum()) < w.numel()
