"""Tiny models and helpers shared by the quantization tests (no downloads, small inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 with a residual, a conv with bias feeding a BN, a pooled Linear head."""

    def __init__(self, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def tiny_bert(num_labels: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batch(batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of equal argmaxes over the last axis, largest absolute logit difference)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return same, (a - b).abs().max().item()


def train_steps(model: nn.Module, batches, loss_fn, steps: int, lr: float = 1e-2) -> None:
    """Plain-loop training with slimkit.step after each optimizer step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        batch = batches[i % len(batches)]
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(model)
    model.eval()


def cnn_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def convert_copy(model: nn.Module) -> nn.Module:
    return slimkit.convert(model, inplace=False)
