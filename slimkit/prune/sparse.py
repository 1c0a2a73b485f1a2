"""Unstructured magnitude masks and N:M semi-structured masks (weights stay dense).

These masks zero weights but never change a shape: the saved model holds dense tensors with
zeros. On CPU the zeros bring no speed-up (dense kernels multiply them anyway); they pay off
only with a sparse kernel: 2:4 on NVIDIA Ampere+ GPUs through torch's semi-structured sparse
tensors, or a sparse inference runtime.

* unstructured, ``local`` scope: every weight tensor loses the target fraction of its smallest
  magnitudes; ``global`` scope: one magnitude threshold over all prunable weights.
* N:M: in every run of M consecutive weights along a layer's input dimension, the N largest
  magnitudes are kept (2:4 is what GPU sparse tensor cores run). Layers whose input size is not a
  multiple of M are left dense.
"""

from __future__ import annotations

import torch
from torch import nn

from .units import is_transposed_linear


def input_dim(module: nn.Module, transposed: dict) -> int:
    """The weight dimension that runs over a layer's inputs."""
    if is_transposed_linear(module, transposed):
        return 0
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return 0
    return 1


def magnitude_masks(
    weights: list[torch.Tensor], keep: list[torch.Tensor], target: float, scope: str
) -> list[torch.Tensor]:
    """Keep masks with ``target`` of all weights pruned; pruned weights stay pruned."""
    if scope == "global":
        total = sum(w.numel() for w in weights)
        want = int(target * total + 1e-9) - sum(int((~k).sum()) for k in keep)
        if want <= 0:
            return [k.clone() for k in keep]
        alive = torch.cat([w.detach().abs().flatten()[k.flatten()].float().cpu() for w, k in zip(weights, keep)])
        want = min(want, alive.numel())
        threshold = torch.kthvalue(alive, want).values
        new = []
        budget = want
        for w, k in zip(weights, keep):
            below = (w.detach().abs().float() < threshold.to(w.device)) & k
            new.append(k & ~below)
            budget -= int(below.sum())
        # Ties at the threshold: prune them in order until the count is exact.
        for w, k in zip(weights, new):
            if budget <= 0:
                break
            ties = ((w.detach().abs().float() == threshold.to(w.device)) & k).flatten().nonzero().flatten()
            take = ties[:budget]
            k.view(-1)[take] = False
            budget -= take.numel()
        return new
    out = []
    for w, k in zip(weights, keep):
        want = int(target * w.numel() + 1e-9) - int((~k).sum())
        if want <= 0:
            out.append(k.clone())
            continue
        score = w.detach().abs().float().flatten().clone()
        score[~k.flatten()] = float("inf")
        drop = torch.topk(score, want, largest=False).indices
        new = k.clone().flatten()
        new[drop] = False
        out.append(new.view_as(k))
    return out


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor | None:
    """Keep the N largest of every M consecutive weights along ``dim`` (None: not a multiple of M)."""
    if weight.shape[dim] % m:
        return None
    w = weight.detach().abs().float().movedim(dim, -1)
    shape = w.shape
    groups = w.reshape(-1, m)
    top = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(shape).movedim(-1, dim).contiguous()
