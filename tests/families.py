"""The one place tests get their models from: tiny timm and Hugging Face models built from configs
(random weights, no downloads), their inputs, and the one plain-loop ``train_steps``.

``timm_model(kind)`` and ``hf_model(kind)`` take keyword overrides of the tiny defaults (a wider
teacher, a different label count); ``FAMILIES`` names the families the test matrix
(tests/test_matrix.py) runs every method on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import slimkit

IMAGE = (2, 3, 32, 32)
VOCAB = 128

# timm presets: (model name, tiny keyword arguments); any other kind is a timm model name
TIMM_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("resnet18", dict(channels=(8, 16, 32, 64))),
    "resnet-wide": ("resnet18", dict(channels=(16, 32, 64, 128))),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)),
}


def timm_model(kind: str, seed: int = 0, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """A timm model with random weights: a preset of TIMM_PRESETS (tiny), or any timm name."""
    import timm

    name, args = TIMM_PRESETS.get(kind, (kind, {}))
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **{**args, **overrides})


def settle_batchnorm(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Set the BatchNorm statistics from ``inputs``, so that a deep CNN with random weights gives
    sane outputs in eval mode (with the default statistics they grow by orders of magnitude)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None  # a plain average of the batches below
    model.train()
    with torch.no_grad():
        model(inputs)
    for bn in norms:
        bn.momentum = 0.1
    return model


def ghostnet() -> nn.Module:
    """timm's ghostnet_050 (GhostModules: a conv's output concatenated with a depthwise conv of
    it), its BatchNorm statistics set from a random batch."""
    return settle_batchnorm(timm_model("ghostnet_050"), torch.randn(4, 3, 64, 64))


def mobilenetv3(seed: int = 0, **overrides: Any) -> nn.Module:
    """timm's mobilenetv3_small_050, its BatchNorm statistics set from a random batch."""
    model = timm_model("mobilenetv3", seed=seed, **overrides)
    return settle_batchnorm(model, torch.randn(8, *IMAGE[1:], generator=torch.Generator().manual_seed(seed)))


def tiny_bert_config(**overrides: Any):
    import transformers

    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertConfig(**{**base, **overrides})


def _hf_config(kind: str, overrides: dict[str, Any]):
    import transformers as T

    encoder = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_labels=3)
    encoder.update(num_hidden_layers=2, intermediate_size=64)
    tiny_gpt2 = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    tiny_gpt2.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    tiny_vit = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2)
    tiny_vit.update(num_attention_heads=4, intermediate_size=64, num_labels=5)
    tiny_llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    tiny_llama.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # GQA: 2 groups
    deberta = dict(encoder, relative_attention=True, pos_att_type=["p2c", "c2p"])
    table: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "bert": (T.BertConfig, T.BertForSequenceClassification, {}),
        "bert-base": (T.BertConfig, T.BertModel, {}),
        "vit": (T.ViTConfig, T.ViTForImageClassification, tiny_vit),
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, tiny_gpt2),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, tiny_llama),
        "distilbert": (
            T.DistilBertConfig,
            T.DistilBertForSequenceClassification,
            dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3),
        ),
        "albert": (
            T.AlbertConfig,
            T.AlbertForSequenceClassification,
            dict(encoder, embedding_size=16),
        ),  # one shared layer
        # DeBERTa-v3's layout: relative attention both ways, shared key projections
        "deberta_v2": (
            T.DebertaV2Config,
            T.DebertaV2ForSequenceClassification,
            dict(deberta, position_buckets=8, max_relative_positions=16, share_att_key=True, norm_rel_ebd="layer_norm"),
        ),
        "deberta_v2_pos_proj": (  # separate position projections
            T.DebertaV2Config,
            T.DebertaV2ForSequenceClassification,
            dict(deberta, share_att_key=False),
        ),
        "electra": (T.ElectraConfig, T.ElectraForSequenceClassification, dict(encoder, embedding_size=16)),
        "mpnet": (T.MPNetConfig, T.MPNetForSequenceClassification, encoder),
        "xlm_roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, dict(encoder, pad_token_id=1)),
    }
    if kind not in table:
        raise KeyError(f"no tiny HF model {kind!r}; known: {sorted(table)}")
    config_cls, model_cls, base = table[kind]
    if config_cls is T.BertConfig:
        return model_cls, tiny_bert_config(**overrides)
    return model_cls, config_cls(**{**base, **overrides})


def hf_model(kind: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny HF model with random weights: bert (sequence classification), bert-base (no head),
    vit, gpt2, llama (GQA: 4 query heads, 2 key/value heads), distilbert, albert, deberta_v2,
    deberta_v2_pos_proj, electra, mpnet, xlm_roberta; ``overrides`` go to its config."""
    model_cls, config = _hf_config(kind, overrides)
    torch.manual_seed(seed)
    return model_cls(config)


def token_batch(batch: int = 2, length: int = 12, seed: int = 1, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def image_batch(shape: tuple[int, ...] = IMAGE, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# calling and training
# ----------------------------------------------------------------------------------------------
def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits on ``inputs`` in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        out = call(model, inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def labels_for(inputs: Any, task: str) -> torch.Tensor:
    """Targets for a batch: the ids themselves for a causal LM (HF shifts them), else 0, 1, 0, ..."""
    if isinstance(inputs, dict) and task == "causal_lm":
        return inputs["input_ids"]
    n = len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
    return torch.arange(n) % 2


def loss_of(model: nn.Module, batch: Any, task: str = "classification") -> torch.Tensor:
    """The loss to backpropagate: ``(x, y)`` pairs and bare inputs (targets from ``labels_for``);
    through ``slimkit.compute_loss`` on a prepared model, so that KD mixes in its terms."""
    inputs, labels = batch if isinstance(batch, tuple) else (batch, labels_for(batch, task))
    if isinstance(inputs, dict):
        out = model(**inputs, labels=labels)  # HF: the task loss (the KD mix with distill) in out.loss
    else:
        out = model(inputs)
    if slimkit.methods_of(model):
        return slimkit.compute_loss(model, out, labels=labels)
    return out.loss if hasattr(out, "loss") else nn.functional.cross_entropy(out, labels)


def train_steps(
    model: nn.Module,
    batches: Any,
    steps: int = 1,
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    task: str = "classification",
    lr: float = 1e-2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Plain-loop training, ``slimkit.step`` after each optimizer step (when prepared).

    ``batches``: one batch, or a list of them taken in turn; a batch is inputs or ``(inputs,
    labels)``. ``loss(model, batch)`` defaults to ``loss_of``. SGD over every trainable parameter
    unless ``optimizer`` is given. Returns the losses; leaves the model in eval mode."""
    batches = batches if isinstance(batches, list) else [batches]
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    model.train()
    for i in range(steps):
        batch = batches[i % len(batches)]
        value = loss(model, batch) if loss is not None else loss_of(model, batch, task)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        if slimkit.methods_of(model):
            slimkit.step(model)
        losses.append(float(value.detach()))
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# the families of the matrix
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """One model family of the test matrix: how to build it (``seed``, config overrides), its
    inputs, its task, what pruning can take from it, and the overrides of a smaller student."""

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[[], Any]
    task: str = "classification"
    prune: dict[str, float] = dataclasses.field(default_factory=lambda: {"channels": 0.5})
    smaller: dict[str, Any] = dataclasses.field(default_factory=dict)
    ptq_cosine: float = 0.99  # the least cosine of INT8 (PTQ) logits to float logits

    def batches(self, n: int = 4, size: int = 4) -> list[Any]:
        """``n`` other batches of ``size`` inputs of the family's kind (calibration, training)."""
        one = self.inputs()
        if isinstance(one, dict) and "input_ids" in one:
            return [token_batch(size, seed=10 + i) for i in range(n)]
        if isinstance(one, dict):
            shape = (size, *one["pixel_values"].shape[1:])
            return [{"pixel_values": image_batch(shape, seed=10 + i)} for i in range(n)]
        return [image_batch((size, *one.shape[1:]), seed=10 + i) for i in range(n)]


def _timm(kind: str) -> Callable[..., nn.Module]:
    return lambda seed=0, **overrides: timm_model(kind, seed=seed, **overrides)


def _hf(kind: str) -> Callable[..., nn.Module]:
    return lambda seed=0, **overrides: hf_model(kind, seed=seed, **overrides)


HEADS = {"channels": 0.5, "heads": 0.5}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("timm_resnet", _timm("resnet"), image_batch, smaller=dict(channels=(8, 8, 16, 32))),
        Family(  # depthwise convs and hard-swish with random weights: PTQ costs more than elsewhere (0.955)
            "timm_mobilenetv3", mobilenetv3, image_batch, smaller=dict(depth_multiplier=0.5), ptq_cosine=0.9
        ),
        Family("timm_convnext", _timm("convnext"), image_batch, smaller=dict(dims=(8, 16, 16, 32))),
        Family("timm_vit", _timm("vit"), image_batch, prune=HEADS, smaller=dict(depth=1)),
        Family("hf_bert", _hf("bert"), token_batch, prune=HEADS, smaller=dict(num_hidden_layers=1)),
        Family("hf_gpt2", _hf("gpt2"), token_batch, "causal_lm", HEADS, dict(n_layer=1)),
        Family("hf_llama_gqa", _hf("llama"), token_batch, "causal_lm", HEADS, dict(num_hidden_layers=1)),
        Family(
            "hf_vit",
            _hf("vit"),
            lambda: {"pixel_values": image_batch((2, 3, 16, 16))},
            prune=HEADS,
            smaller=dict(num_hidden_layers=1),
        ),
    ]
}
