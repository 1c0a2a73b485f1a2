"""Every way a pruning recipe can be wrong for a model gets an error that names the module or
field and says what to change."""

import json

import pytest
import torch
from prune_helpers import CASES, ConvNet, run_case
from torch import nn

import slimkit
from slimkit import FormatError, IncompatibleError, ModuleNameError, UnsupportedModelError
from tests.families import hf_model, timm_model

X = torch.randn(2, 3, 16, 16)


class ChannelCentering(nn.Module):
    """Subtracts the mean over channels: Torch-Pruning takes it for an element-wise op."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.c1 = nn.Conv2d(8, 16, 3)
        self.c2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c1(torch.relu(self.stem(x))))
        x = x - x.mean(1, keepdim=True)
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_an_op_that_cannot_be_coupled_is_named_with_the_exclude_fix():
    with pytest.raises(IncompatibleError) as info:
        slimkit.prepare(ChannelCentering(), {"prune": {"channels": 0.5}}, example_inputs=X)
    message = str(info.value)
    assert "group rooted at 'c1'" in message and "MeanBackward" in message
    assert "exclude: ['c1']" in message
    # the suggested fix works, and the rest of the model is still pruned
    model = ChannelCentering()
    slimkit.prepare(model, {"prune": {"channels": 0.5, "exclude": ["c1"]}}, example_inputs=X)
    small = slimkit.convert(model)
    assert small.c1.out_channels == 16 and small.c2.out_channels == 8


def test_an_excluded_name_that_does_not_exist():
    with pytest.raises(ModuleNameError) as info:
        slimkit.prepare(ConvNet(), {"prune": {"channels": 0.5, "exclude": ["conv_2"]}}, example_inputs=X)
    assert "prune.exclude: module 'conv_2'" in str(info.value) and "conv2" in str(info.value)


def test_heads_on_a_model_no_adapter_knows_lists_what_looks_like_attention():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.attn(h, h, h)[0].mean(1))

    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(Tiny(), {"prune": {"heads": 0.5}}, example_inputs=torch.randn(2, 5, 8))
    message = str(info.value)
    assert "knows no attention heads in Tiny" in message and "['attn']" in message
    assert "prune.heads: 0" in message


def test_heads_of_an_attention_that_cannot_lose_heads_exactly():
    kwargs = dict(embed_dim=64, num_heads=4, depth=1, img_size=32, patch_size=8, scale_attn_norm=True)
    model = timm_model("vit_tiny_patch16_224", **kwargs)
    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(model, {"prune": {"heads": 0.5}})
    assert "'blocks.0.attn'" in str(info.value) and "scale_norm" in str(info.value)
    assert "exclude: ['blocks.0.attn']" in str(info.value)


class NormalisedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


def test_a_model_without_any_prunable_channel_group():
    model = NormalisedMLP()
    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(model, {"prune": {"channels": 0.5}}, example_inputs=torch.randn(2, 4))
    assert "no channel group slimkit can prune exactly" in str(info.value)
    assert "is excluded" in str(info.value)


def test_a_plain_model_without_example_inputs():
    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(ConvNet(), {"prune": {"channels": 0.5}})
    assert "pass example_inputs=" in str(info.value)


def test_example_inputs_that_do_not_run_the_model():
    with pytest.raises(IncompatibleError) as info:
        slimkit.prepare(ConvNet(), {"prune": {"channels": 0.5}}, example_inputs=torch.randn(2, 5, 16, 16))
    assert "could not trace ConvNet" in str(info.value) and "example inputs" in str(info.value)


def test_a_manifest_that_does_not_fit_the_architecture(tmp_path):
    run_case(CASES["hf_gpt2"], tmp_path / "gpt2")
    file = tmp_path / "gpt2" / "config.json"
    config = json.loads(file.read_text())
    config["slimkit"]["pruning"]["tensors"]["transformer.h.9.mlp.c_fc.weight"] = [32, 64]
    file.write_text(json.dumps(config))
    with pytest.raises(FormatError) as info:
        slimkit.from_pretrained(tmp_path / "gpt2")
    assert "transformer.h.9.mlp.c_fc.weight" in str(info.value) and "another architecture" in str(info.value)


def test_heads_on_a_single_key_value_group_model_prune_nothing_but_channels():
    model = hf_model("llama")
    model.config.num_key_value_heads = 1  # the pruner reads the projections' shapes, not the config
    slimkit.prepare(model, {"prune": {"heads": 0.5, "channels": 0.5}})
    pruner = slimkit.methods_of(model)["prune"]
    assert pruner.heads.groups  # 2 key/value groups: one can go
    assert all(g.size == 2 for g in pruner.heads.groups)
