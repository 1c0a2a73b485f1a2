"""Conv-BN folding: which pairs fold, the folded conv equals conv+BN, the freeze schedule."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from quant_helpers import SmallCNN, cnn_loss
from torch import nn

import slimkit
from slimkit.quant.fold import bn_factor, foldable_batchnorms, folded_bias
from tests.families import train_steps


def _random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.weight[0] = 0.0  # zero-init gamma, as timm / torchvision residual blocks have
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
    return bn.eval()


class ConvBN(nn.Module):
    # Not an nn.Sequential: slimkit adds a ``slimkit`` child, which Sequential.forward would call.
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_folded_conv_equals_conv_then_bn_in_eval():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _random_bn(6)
    x = torch.randn(2, 4, 7, 7)
    s = bn_factor(bn)
    weight = conv.weight * s.reshape(-1, 1, 1, 1)
    bias = folded_bias(conv.bias, bn, s)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fake_quant_conv_bn_pair_equals_its_folded_int8_conv():
    torch.manual_seed(0)
    model = ConvBN(nn.Conv2d(3, 8, 3, padding=1), _random_bn(8)).eval()
    x = torch.randn(4, 3, 9, 9)
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=x)
    assert slimkit.methods_of(model)["quant"].folded == {"conv": "bn"}
    slimkit.calibrate(model, [x])
    with torch.no_grad():
        fake = model(x)
        converted = slimkit.convert(model)
        assert isinstance(converted.bn, nn.Identity)
        assert converted.conv.weight.dtype == torch.int8
        assert torch.all(converted.conv.weight[0] == 0)  # gamma == 0 folds to zero weights
        torch.testing.assert_close(converted(x), fake, rtol=0, atol=1e-5)


class _SharedOutput(nn.Module):
    """conv_a's output feeds its BN and a residual; conv_b -> bn_b is a clean pair."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv_b, self.bn_b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn_c = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.conv_a(x)
        y = self.bn_a(a) + a
        y = self.bn_b(self.conv_b(y))
        return self.bn_c(torch.relu(y))  # a BN after a non-conv op


def test_only_convs_read_by_their_batchnorm_alone_are_folded():
    model = _SharedOutput()
    convs = {"conv_a": model.conv_a, "conv_b": model.conv_b}
    pairs = foldable_batchnorms(model, convs, torch.randn(2, 3, 4, 4))
    assert {k: v[0] for k, v in pairs.items()} == {"conv_b": "bn_b"}


def test_small_cnn_folds_every_conv_bn_pair():
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {}}, example_inputs=torch.randn(2, 1, 8, 8))
    assert slimkit.methods_of(model)["quant"].folded == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
    assert type(model.bn1).__name__ == "FoldingBatchNorm2d" and isinstance(model.bn1, nn.BatchNorm2d)


def test_fold_bn_false_keeps_batchnorms_and_still_matches():
    torch.manual_seed(0)
    model = ConvBN(nn.Conv2d(3, 8, 3), _random_bn(8)).eval()
    x = torch.randn(2, 3, 6, 6)
    slimkit.prepare(model, {"quant": {"mode": "ptq", "fold_bn": False}}, example_inputs=x)
    slimkit.calibrate(model, [x])
    with torch.no_grad():
        fake = model(x)
        converted = slimkit.convert(model)
        assert type(converted.bn) is nn.BatchNorm2d
        torch.testing.assert_close(converted(x), fake, rtol=0, atol=1e-5)


def test_batchnorm_statistics_update_until_freeze_bn_step_then_stay(cnn_data):
    batches, _ = cnn_data
    torch.manual_seed(0)
    model = SmallCNN()
    slimkit.prepare(model, {"quant": {"freeze_bn_step": 2}}, example_inputs=batches[0][0])
    before = model.bn1.running_mean.clone()
    train_steps(model, batches, 2, loss=cnn_loss)
    after_two = model.bn1.running_mean.clone()
    assert not torch.equal(before, after_two), "BN statistics must update before freeze_bn_step"
    assert slimkit.log_values(model)["quant/bn_frozen"] == 1.0
    train_steps(model, batches, 2, loss=cnn_loss)
    assert torch.equal(after_two, model.bn1.running_mean), "frozen BN statistics moved"
    # and the frozen pair in training mode computes what the folded conv computes
    model.train()
    with torch.no_grad():
        train_out = model(batches[0][0])
        eval_out = copy.deepcopy(model).eval()(batches[0][0])
    torch.testing.assert_close(train_out, eval_out)
