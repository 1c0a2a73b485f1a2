"""The tensor a model's quality is judged by, and how close a changed model stays to it.

Shared by :func:`slimkit.sensitivity` and ``quant.keep_fp32``: both compare a changed model's
outputs with the original's, sample by sample, on the user's batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import call_model, get_logits
from .batches import model_inputs
from .distill.losses import mean_pool
from .errors import SlimkitError


def output_tensor(outputs: Any, role: str = "sensitivity") -> torch.Tensor:
    """The logits of ``outputs``, or the last hidden state of an encoder without a head."""
    logits = get_logits(outputs)
    if logits is None and hasattr(outputs, "get"):
        logits = outputs.get("last_hidden_state")
    if not isinstance(logits, torch.Tensor):
        raise SlimkitError(
            f"{role}: the model's outputs hold no logits or last_hidden_state tensor; pass metric=... "
            "(a callable metric(model, batches) -> float, higher is better)"
        )
    return logits


def _rows(output: torch.Tensor, inputs: Any, pool: str = "none") -> torch.Tensor:
    """The rows compared: one per sample, or for token outputs ``(batch, tokens, features)``
    with an attention mask, one per real token: padding positions hold states no user reads
    (mean pooling and heads skip them), and they would otherwise dominate the comparison.

    ``pool="mean"``: token outputs become one row per sample, the mean over its real tokens (the
    sentence embedding a mean-pooling encoder serves). Token states and their mean rank pruned
    copies differently: on all-MiniLM-L6-v2 at batch 32, widths chosen by the pooled rows kept
    0.003-0.019 more embedding cosine than those chosen by the token rows (README, ``pool``)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    matched = output.dim() == 3 and isinstance(mask, torch.Tensor) and mask.shape == output.shape[:2]
    if pool == "mean" and output.dim() == 3:
        return mean_pool(output, mask.to(output.device) if matched else None)
    if matched:
        return output[mask.to(output.device).bool()]
    return output.flatten(1)


@torch.no_grad()
def flat_outputs(model: nn.Module, batches: list, role: str = "sensitivity", pool: str = "none") -> list[torch.Tensor]:
    """One ``(rows, features)`` float tensor per batch: a row per sample, or per real token
    (``pool="mean"``: a row per sample, its tokens averaged; see :func:`_rows`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for batch in batches:
        inputs = model_inputs(batch, device)
        out.append(_rows(output_tensor(call_model(model, inputs), role).float(), inputs, pool))
    return out


def mean_cosine(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean cosine between each row of the outputs and the reference's (1.0: unchanged)."""
    sims = [F.cosine_similarity(a, b, dim=1) for a, b in zip(outputs, reference)]
    return float(torch.cat(sims).mean())
