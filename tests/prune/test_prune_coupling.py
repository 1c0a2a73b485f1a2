"""Coupled layers (concat, grouped convs, flatten), unit selection and importance scores, on
small hand-made models whose answers are known."""

import pytest
import torch
from prune_helpers import ConvNet
from torch import nn

import slimkit
from slimkit.prune import count_parameters
from tests.families import hf_model, logits, token_batch


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _prune(model, x, **section):
    slimkit.prepare(model, {"prune": section}, example_inputs=x)
    pruner = slimkit.methods_of(model)["prune"]
    masked = logits(model, x)
    small = slimkit.convert(model)
    torch.testing.assert_close(logits(small, x), masked, rtol=1e-5, atol=1e-5)
    return small, pruner


X = torch.randn(2, 3, 16, 16)


def test_concatenation_densenet():
    import timm

    model = timm.create_model("densenet121", num_classes=10, growth_rate=4, block_config=(2, 2), bn_size=2)
    _randomise_bn(model)
    small, pruner = _prune(model, torch.randn(2, 3, 32, 32), channels=0.5)
    layer = small.features.denseblock1.denselayer2
    # the stem's 8 channels are kept (stem excluded); layer 1's 4 new channels lost half, and the
    # BatchNorm after the concatenation lost exactly those, at their offset
    assert layer.norm1.num_features == layer.conv1.in_channels == 8 + 2
    assert small.features.denseblock1.denselayer1.conv2.out_channels == 2
    assert pruner.summary()["channels"]["pruned"] * 2 == pruner.summary()["channels"]["prunable"]


def test_grouped_conv_loses_the_same_number_of_channels_in_every_group():
    model = ConvNet(widths=(24, 32), groups=4)
    _randomise_bn(model)
    small, pruner = _prune(model, X, channels=0.5)
    assert small.conv2.groups == 4
    assert small.conv2.in_channels == 12 and small.conv2.out_channels == 16
    assert small.conv2.weight.shape == (16, 3, 3, 3)
    groups = {g.root: g for g in pruner.channels.groups}
    assert groups["conv1"].blocks == [list(range(i, i + 6)) for i in range(0, 24, 6)]


def test_flatten_into_the_classifier_slices_its_input_columns():
    model = ConvNet(flatten=True)
    _randomise_bn(model)
    small, _ = _prune(model, X, channels=0.5)
    assert small.conv2.out_channels == 20 and small.fc.in_features == 20 * 16


def test_round_to_rounds_kept_widths_up():
    model = ConvNet(widths=(24, 40))
    small, _ = _prune(model, X, channels=0.5, round_to=8)
    assert (small.conv1.out_channels, small.conv2.out_channels) == (16, 24)  # 12 -> 16, 20 -> 24


def _weaken(model, units):
    with torch.no_grad():  # everything unit u owns: its filter, its BN scale, the next layer's column
        model.conv1.weight[units] *= 1e-3
        model.bn1.weight[units] *= 1e-3
        model.conv2.weight[:, units] *= 1e-3


def test_global_scope_one_threshold_with_a_per_layer_limit():
    """Scores are divided by their group's mean, then ranked together: conv1's 24 near-zero units
    fall first (up to the 75% limit), the remaining 8 come from conv2."""
    model = ConvNet(widths=(32, 32))
    _weaken(model, list(range(24)))
    small, pruner = _prune(model, X, channels=0.5, scope="global", max_layer_ratio=0.75, importance="l1")
    assert small.conv1.out_channels == 8
    assert small.conv2.out_channels == 24
    assert pruner.summary()["channels"]["pruned"] == 32


def test_local_scope_prunes_every_layer_alike():
    model = ConvNet(widths=(32, 32))
    _weaken(model, list(range(24)))
    small, _ = _prune(model, X, channels=0.5, scope="local")
    assert small.conv1.out_channels == small.conv2.out_channels == 16


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale"])
def test_magnitude_importances_remove_the_weakest_units(importance):
    model = ConvNet(widths=(8, 8))
    weak = [1, 4, 6, 7]
    with torch.no_grad():
        model.conv1.weight[weak] *= 0.01  # l1 / l2 see the filters
        model.bn1.weight.fill_(1.0)
        model.bn1.weight[weak] = 0.01  # bn_scale sees gamma
        model.conv2.weight[:, weak] *= 0.01
    slimkit.prepare(model, {"prune": {"channels": 0.5, "importance": importance}}, example_inputs=X)
    pruner = slimkit.methods_of(model)["prune"]
    group = next(i for i, g in enumerate(pruner.channels.groups) if g.root == "conv1")
    pruned = pruner.channels.split(pruner.state.channels_pruned)[group]
    assert pruned.nonzero().flatten().tolist() == weak


def test_taylor_accumulates_weight_times_gradient_since_the_last_point():
    torch.manual_seed(0)
    model = ConvNet(widths=(8, 8))
    recipe = {"prune": {"channels": 0.5, "importance": "taylor", "schedule": {"start_step": 3}}}
    slimkit.prepare(model, recipe, example_inputs=X)
    pruner = slimkit.methods_of(model)["prune"]
    group = next(i for i, g in enumerate(pruner.channels.groups) if g.root == "conv1")
    offset = pruner.channels.offsets[group]
    expected = torch.zeros(8)
    model.train()
    for step in (1, 2):
        loss = model(X).square().mean()
        loss.backward()
        with torch.no_grad():  # the group: conv1 filters, bn1 scales, conv2 input columns
            expected += (model.conv1.weight * model.conv1.weight.grad).abs().sum((1, 2, 3))
            expected += (model.bn1.weight * model.bn1.weight.grad).abs()
            expected += (model.conv2.weight * model.conv2.weight.grad).abs().sum((0, 2, 3))
        model.zero_grad()  # no optimizer step: weights stay, so the sums are exact
        slimkit.step(model, step)
    stats = pruner.state.channels_taylor[offset : offset + 8]
    torch.testing.assert_close(stats, expected, rtol=1e-4, atol=1e-8)
    model(X).square().mean().backward()
    slimkit.step(model, 3)  # the pruning point: the lowest accumulated scores go, sums restart
    pruned = pruner.channels.split(pruner.state.channels_pruned)[group]
    assert int(pruned.sum()) == 4 and float(pruner.state.channels_taylor.abs().sum()) == 0.0


def test_a_unit_pruned_once_stays_pruned():
    model = ConvNet(widths=(16, 16))
    recipe = {"prune": {"channels": 0.75, "schedule": {"kind": "iterative", "end_step": 2, "stages": 2}}}
    slimkit.prepare(model, recipe, example_inputs=X)
    pruner = slimkit.methods_of(model)["prune"]
    group = next(i for i, g in enumerate(pruner.channels.groups) if g.root == "conv1")
    slimkit.step(model, 1)
    first = pruner.channels.split(pruner.state.channels_pruned)[group].clone()
    assert int(first.sum()) == 8  # 1 - (1 - 0.75) ** (1 / 2) = 0.5 after the first of two stages
    with torch.no_grad():  # make the pruned units the strongest: they must still stay pruned
        model.conv1.weight[first] = 100.0
    slimkit.step(model, 2)
    second = pruner.channels.split(pruner.state.channels_pruned)[group]
    assert bool((second | ~first).all())  # every unit pruned at step 1 is still pruned
    assert float(model.conv1.weight.detach()[first].abs().max()) == 0.0  # and masked again
    assert int(second.sum()) == 12


def test_heads_ratio_never_empties_a_layer():
    model = hf_model("bert")
    small, _ = _prune(model, token_batch(), heads=0.99, verify=False)
    for layer in small.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == 1 and layer.attention.self.query.out_features == 8


def test_exclude_keeps_a_layer_whole():
    model = ConvNet(widths=(24, 40))
    small, pruner = _prune(model, X, channels=0.5, exclude=["conv2"])
    assert small.conv2.out_channels == 40 and small.conv1.out_channels == 12
    assert "is excluded" in pruner.skipped["conv2"]


def test_parameters_fall_by_what_was_removed():
    model = ConvNet(widths=(24, 40))
    before = count_parameters(model)
    small, _ = _prune(model, X, channels=0.5)
    removed = 12 * 8 * 9 + 12 * 2 + (40 * 24 - 20 * 12) * 9 + 20 * 2 + 20 * 10
    assert before - count_parameters(small) == removed
