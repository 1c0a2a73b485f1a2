"""Tiny timm and Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def tiny_bert_config(**overrides):
    import transformers

    base = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base.update(overrides)
    return transformers.BertConfig(**base)


def tiny_hf(kind: str, seed: int = 0, **overrides):
    """Tiny HF models: bert (sequence classification), vit, gpt2, llama (GQA), bert-base (no head)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertForSequenceClassification(tiny_bert_config(**overrides))
    if kind == "bert-base":
        return transformers.BertModel(tiny_bert_config(**overrides))
    if kind == "vit":
        cfg = dict(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
        )
        cfg.update(overrides)
        return transformers.ViTForImageClassification(transformers.ViTConfig(**cfg))
    if kind == "gpt2":
        cfg = dict(
            vocab_size=128,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cfg.update(overrides)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    if kind == "llama":
        cfg = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        cfg.update(overrides)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    raise ValueError(kind)


def tiny_timm(kind: str, seed: int = 0, num_classes: int = 10, **overrides):
    """Tiny timm models (random weights): resnet, convnext, vit."""
    import timm

    torch.manual_seed(seed)
    if kind == "resnet":
        args = dict(channels=(8, 16, 32, 64))
    elif kind == "resnet-wide":
        args = dict(channels=(16, 32, 64, 128))
    elif kind == "convnext":
        args = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    elif kind == "vit":
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    else:
        raise ValueError(kind)
    args.update(overrides)
    name = {"resnet": "resnet18", "resnet-wide": "resnet18", "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224"}
    return timm.create_model(name[kind], pretrained=False, num_classes=num_classes, **args)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def accelerate_launch(
    script: Path, args: list[str], processes: int, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` for real: ``--multi_gpu`` with 2+ processes, which on a machine
    without GPUs starts that many CPU processes over gloo (``--cpu`` would start only one)."""
    multi = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
