"""Tiny models of every supported family and the one shared flow the pruning matrix runs
(peft style): prepare -> train a step -> masked forward == converted forward -> params and
MACs fall -> save -> load -> same outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimkit
from slimkit.prune import count_macs, count_parameters
from tests.families import IMAGE, ghostnet, hf_model, logits, timm_model, token_batch, train_steps


class ConvNet(nn.Module):
    """stem -> conv1 -> conv2 (optionally grouped) -> [flatten | pool] -> fc."""

    def __init__(self, widths=(24, 40), groups=1, flatten=False):
        super().__init__()
        w1, w2 = widths
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.flatten = flatten
        self.fc = nn.Linear(w2 * 16 if flatten else w2, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1) if self.flatten else x.mean((2, 3)))


def training_args(folder: Path, **overrides: Any):
    """TrainingArguments for the tiny Trainer runs: CPU, no reports, no checkpoints unless asked."""
    import transformers

    settings = dict(
        output_dir=str(folder),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**settings, **overrides})


@dataclasses.dataclass
class Case:
    """One model of the matrix: how to build it, feed it, and what pruning must leave."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    prune: dict[str, Any]
    expect: Callable[[nn.Module], None]  # asserts on the converted model's structure
    min_macs_ratio: float
    task: str = "classification"  # or "causal_lm"
    native_load: bool = False  # a plain transformers from_pretrained loads the pruned folder
    measure: bool = True  # measure the model at prepare (latency rounds: slow for the larger CNNs)


def _expect_resnet(m: nn.Module) -> None:
    assert m.layer1[0].conv1.out_channels == 32 and m.layer1[0].bn1.num_features == 32
    assert m.layer1[0].conv2.out_channels == 64  # the stem's residual group is excluded (stem)
    assert m.layer4[1].conv2.out_channels == 256 and m.layer4[0].downsample[0].out_channels == 256
    assert m.fc.in_features == 256 and m.num_features == 256


def _expect_mobilenet(m: nn.Module) -> None:
    depthwise = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    block = m.blocks[2][0]  # inverted residual: expand -> depthwise -> squeeze-excite -> project
    se = block.se
    assert se.conv_reduce.in_channels == se.conv_expand.out_channels == block.conv_dw.out_channels
    assert block.conv_pw.out_channels == block.conv_dw.out_channels == block.conv_pwl.in_channels
    assert m.conv_head.out_channels == m.classifier.in_features == 512  # the head's hidden layer halves


def _expect_convnext(m: nn.Module) -> None:
    block = m.stages[0].blocks[0]  # convnext_atto's MLP is two 1x1 convs (conv_mlp)
    assert block.mlp.fc1.out_channels == block.mlp.fc2.in_channels == 32
    assert block.conv_dw.out_channels == 16  # the LayerNorm'd residual stream stays whole


def _expect_timm_vit(m: nn.Module) -> None:
    attn = m.blocks[0].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 16 and attn.proj.in_features == 32
    assert m.blocks[0].mlp.fc1.out_features == 128


def _expect_bert(m: nn.Module) -> None:
    attn = m.bert.encoder.layer[0].attention
    assert attn.self.num_attention_heads == 2 and attn.self.query.out_features == 16
    assert attn.output.dense.in_features == 16
    assert m.bert.encoder.layer[1].intermediate.dense.out_features == 32


def _expect_hf_vit(m: nn.Module) -> None:
    attn = m.vit.layers[0].attention
    assert attn.q_proj.out_features == 16 and attn.o_proj.in_features == 16
    assert m.config.num_attention_heads == 2 and m.config.head_dim == 8 and m.config.intermediate_size == 32


def _expect_gpt2(m: nn.Module) -> None:
    attn = m.transformer.h[0].attn
    assert attn.num_heads == 2 and attn.split_size == 16 and attn.c_attn.weight.shape == (32, 48)
    assert m.transformer.h[0].mlp.c_fc.nf == 64 and m.transformer.h[0].mlp.c_proj.weight.shape == (64, 32)


def _expect_llama(m: nn.Module) -> None:
    attn = m.model.layers[0].self_attn
    # 2 key/value groups of 2 query heads; one group goes with both of its query heads
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16
    assert m.config.num_attention_heads == 2 and m.config.num_key_value_heads == 1
    assert m.model.layers[1].mlp.gate_proj.out_features == m.model.layers[1].mlp.up_proj.out_features == 32


def _expect_encoder(layer: Callable[[nn.Module], nn.Module], attn: str, ffn: str, heads: str = "num_attention_heads"):
    """Heads 4 -> 2 (q rows 32 -> 16, output columns 32 -> 16) and FFN 64 -> 32 in every layer."""

    def expect(m: nn.Module) -> None:
        for block in layer(m):
            attention = block.get_submodule(attn)
            assert getattr(attention, heads) == 2
            q = next(getattr(attention, n) for n in ("query", "q_lin", "q", "query_proj") if hasattr(attention, n))
            assert q.out_features == 16
            assert block.get_submodule(ffn).out_features == 32

    return expect


def _expect_ghostnet(m: nn.Module) -> None:
    ghost = m.blocks[1][0].ghost1  # cat([primary(x), cheap(primary(x))]): both halves lose the same channels
    primary, cheap = ghost.primary_conv[0], ghost.cheap_operation[0]
    assert primary.out_channels == cheap.in_channels == cheap.out_channels == cheap.groups < 24
    assert m.blocks[1][0].conv_dw.in_channels == 2 * primary.out_channels


CHANNELS = {"channels": 0.5}
BOTH = {"channels": 0.5, "heads": 0.5}

CASES = {
    c.name: c
    for c in [
        Case(
            "timm_resnet18",
            lambda: timm_model("resnet18"),
            lambda: torch.randn(IMAGE),
            CHANNELS,
            _expect_resnet,
            2.0,
        ),
        Case(
            "timm_mobilenetv3",
            lambda: timm_model("mobilenetv3_small_050"),
            lambda: torch.randn(IMAGE),
            CHANNELS,
            _expect_mobilenet,
            2.0,
        ),
        Case(
            "timm_convnext",
            lambda: timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
            lambda: torch.randn(IMAGE),
            CHANNELS,
            _expect_convnext,
            1.5,
        ),
        Case(
            "timm_vit",
            lambda: timm_model("vit_tiny_patch16_224", embed_dim=64, num_heads=4, depth=2, img_size=32, patch_size=8),
            lambda: torch.randn(IMAGE),
            BOTH,
            _expect_timm_vit,
            1.5,
        ),
        Case("hf_bert", lambda: hf_model("bert"), token_batch, BOTH, _expect_bert, 1.5),
        Case(
            "hf_vit",
            lambda: hf_model("vit"),
            lambda: {"pixel_values": torch.randn(2, 3, 16, 16)},
            BOTH,
            _expect_hf_vit,
            1.5,
            native_load=True,
        ),
        Case("hf_gpt2", lambda: hf_model("gpt2"), token_batch, BOTH, _expect_gpt2, 1.4, task="causal_lm"),
        Case(
            "timm_ghostnet",
            ghostnet,
            lambda: torch.randn(2, 3, 64, 64),
            CHANNELS,
            _expect_ghostnet,
            1.5,
            measure=False,
        ),
        Case(
            "hf_distilbert",
            lambda: hf_model("distilbert"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.distilbert.transformer.layer, "attention", "ffn.lin1", heads="n_heads"),
            1.4,
        ),
        Case(
            "hf_albert_shared",
            lambda: hf_model("albert"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.albert.encoder.albert_layer_groups[0].albert_layers, "attention", "ffn"),
            1.4,
        ),
        Case(
            "hf_deberta_v2",
            lambda: hf_model("deberta_v2"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.deberta.encoder.layer, "attention.self", "intermediate.dense"),
            1.4,
        ),
        Case(
            "hf_deberta_v2_pos_proj",
            lambda: hf_model("deberta_v2_pos_proj"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.deberta.encoder.layer, "attention.self", "intermediate.dense"),
            1.4,
        ),
        Case(
            "hf_electra",
            lambda: hf_model("electra"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.electra.encoder.layer, "attention.self", "intermediate.dense"),
            1.4,
        ),
        Case(
            "hf_mpnet",
            lambda: hf_model("mpnet"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.mpnet.encoder.layer, "attention.attn", "intermediate.dense"),
            1.4,
        ),
        Case(
            "hf_xlm_roberta",
            lambda: hf_model("xlm_roberta"),
            token_batch,
            BOTH,
            _expect_encoder(lambda m: m.roberta.encoder.layer, "attention.self", "intermediate.dense"),
            1.4,
        ),
        Case(
            "hf_llama_gqa",
            lambda: hf_model("llama"),
            token_batch,
            BOTH,
            _expect_llama,
            1.4,
            task="causal_lm",
            native_load=True,
        ),
    ]
}


def masked_tensors_are_zero(model: nn.Module) -> bool:
    """Every weight / bias slice the pruner masks is exactly zero."""
    plan = slimkit.methods_of(model)["prune"]._plan  # built by the last slimkit.step
    assert plan, "the pruner masks nothing"
    return all(float((t.detach() * (keep == 0)).abs().max()) == 0.0 for t, keep in plan)


def run_case(case: Case, folder: Path) -> dict[str, Any]:
    """The matrix flow (vary a case with ``dataclasses.replace``); returns what it measured."""
    model = case.build()
    inputs = case.inputs()
    params_before, macs_before = count_parameters(model), count_macs(model, inputs)
    slimkit.prepare(model, {"prune": case.prune}, example_inputs=inputs, measure=case.measure)
    pruner = slimkit.methods_of(model)["prune"]
    assert count_parameters(model) == params_before  # masks only while training

    train_steps(model, inputs, task=case.task)
    assert masked_tensors_are_zero(model), "a masked weight moved during the optimizer step"
    logged = slimkit.log_values(model)
    masked = logits(model, inputs)

    cls = type(model)
    small = slimkit.convert(model)
    assert type(small) is cls and "slimkit" not in dict(small.named_children())
    converted = logits(small, inputs)
    torch.testing.assert_close(converted, masked, rtol=1e-5, atol=1e-5)
    case.expect(small)

    params_after, macs_after = count_parameters(small), count_macs(small, inputs)
    assert params_after < params_before
    assert macs_before / macs_after >= case.min_macs_ratio, (macs_before, macs_after)

    slimkit.save_pretrained(small, folder)
    again = slimkit.from_pretrained(folder)
    assert type(again) is cls
    torch.testing.assert_close(logits(again, inputs), converted, rtol=0, atol=1e-6)
    assert count_parameters(again) == params_after
    return {
        "model": small,
        "again": again,
        "inputs": inputs,
        "logged": logged,
        "pruner": pruner,
        "params": (params_before, params_after),
        "macs": (macs_before, macs_after),
    }
