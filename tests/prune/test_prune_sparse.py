"""Unstructured magnitude masks and N:M (2:4) masks: weights stay dense, zeros stay zero."""

import json

import pytest
import torch
from prune_helpers import ConvNet
from safetensors.torch import load_file

import slimkit
from tests.families import hf_model, logits, token_batch, train_steps

X = torch.randn(2, 3, 16, 16)


def _weights(model, pruner):
    return {n: model.get_submodule(n).weight.detach() for n in pruner.sparse_weights}


def test_unstructured_local_prunes_each_layer_by_magnitude():
    model = ConvNet()
    slimkit.prepare(model, {"prune": {"sparsity": 0.6}}, example_inputs=X)
    pruner = slimkit.methods_of(model)["prune"]
    assert set(pruner.sparse_weights) == {"conv1", "conv2"}  # stem and classifier excluded
    train_steps(model, X, 2)
    for weight in _weights(model, pruner).values():
        assert int((weight == 0).sum()) == int(0.6 * weight.numel())
    logged = slimkit.log_values(model)
    assert logged["prune/sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert 0 < logged["prune/params"] < 0.6


def test_unstructured_global_uses_one_threshold():
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight.mul_(1e-6)  # all of conv1 is below every weight of conv2
    slimkit.prepare(model, {"prune": {"sparsity": 0.3, "scope": "global"}}, example_inputs=X)
    weights = _weights(model, slimkit.methods_of(model)["prune"])
    total = sum(w.numel() for w in weights.values())
    assert int((weights["conv2"] == 0).sum()) == int(0.3 * total) - weights["conv1"].numel()
    assert bool((weights["conv1"] == 0).all())


def test_two_four_keeps_two_of_every_four_inputs_and_saves_dense(tmp_path):
    model = hf_model("bert")
    inputs = token_batch()
    slimkit.prepare(model, {"prune": {"nm": "2:4"}}, example_inputs=inputs)
    pruner = slimkit.methods_of(model)["prune"]
    train_steps(model, inputs, 2)
    assert pruner.sparse_weights and not any("classifier" in n for n in pruner.sparse_weights)
    for name, weight in _weights(model, pruner).items():
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name  # at most 2 nonzeros in every run of 4 inputs
    assert slimkit.log_values(model)["prune/sparsity"] == pytest.approx(0.5)
    before = logits(model, inputs)
    small = slimkit.convert(model)
    slimkit.save_pretrained(small, tmp_path / "sparse")
    saved = load_file(tmp_path / "sparse" / "model.safetensors")
    query = saved["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.shape == (32, 32) and float((query == 0).float().mean()) == 0.5  # dense, half zeros
    assert "pruning" not in json.loads((tmp_path / "sparse" / "config.json").read_text())["slimkit"]
    again = slimkit.from_pretrained(tmp_path / "sparse")
    torch.testing.assert_close(logits(again, inputs), before)


def test_gpt2_conv1d_two_four_runs_along_its_input_dimension():
    model = hf_model("gpt2")
    slimkit.prepare(model, {"prune": {"nm": "2:4"}}, example_inputs=token_batch())
    weight = model.transformer.h[0].attn.c_attn.weight.detach()  # stored [in, out]
    groups = (weight != 0).t().reshape(weight.shape[1], -1, 4).sum(-1)
    assert int(groups.max()) == 2 and int(groups.min()) == 2


def test_structured_and_unstructured_together():
    model = ConvNet(widths=(24, 40))
    recipe = {"prune": {"channels": 0.5, "sparsity": 0.5}}
    slimkit.prepare(model, recipe, example_inputs=X)
    train_steps(model, X)
    masked = logits(model, X)
    small = slimkit.convert(model)
    torch.testing.assert_close(logits(small, X), masked, rtol=1e-5, atol=1e-5)
    assert small.conv1.out_channels == 12
    assert float((small.conv2.weight == 0).float().mean()) > 0.0
