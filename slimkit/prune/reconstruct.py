"""Reconstruction: refit the layers that read pruned units so their outputs stay as they were.

When units are removed, each consumer ``y = W z`` (``z``: its input columns, plus a constant 1
for the bias) loses some columns. Its kept columns ``K`` and bias are refit by least squares
on recorded inputs, ``min E||W z - W' z_K||^2``::

    W'_K = W C[:, K] (G[K, K] + lambda I)^-1

with ``G = E[z z^T]`` the Gram matrix of the inputs the layer now sees and ``C = E[z_ref z^T]``
the cross statistic with the inputs it *should* see (the dense model's, in sequential
reconstruction; ``C = G`` otherwise). ``lambda`` is ``damping`` times the mean diagonal of
``G[K, K]``, which keeps the solve well-posed when few tokens were seen or columns are
collinear. Conv consumers use unfolded patches (``W`` reshaped to ``[out, in * kh * kw]``).

After a one-shot point, BatchNorm running statistics are recomputed on the calibration
batches (:func:`recalibrate_batchnorms`), since every layer after a pruned one sees
slightly different inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .statistics import InputStats

logger = logging.getLogger("slimkit")


def _matrix(module: nn.Module, stats: InputStats) -> torch.Tensor:
    """The weight as [out, columns] in float64 (a view of what gets written back)."""
    weight = module.weight.detach()
    if stats.layout == "transposed":
        weight = weight.t()
    return weight.reshape(weight.shape[0], -1).double()


def _write(module: nn.Module, stats: InputStats, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
    weight = module.weight
    if stats.layout == "transposed":
        weight.data.copy_(matrix.t().to(weight.dtype))
    else:
        weight.data.copy_(matrix.reshape(weight.shape).to(weight.dtype))
    if bias is not None:
        module.bias.data.copy_(bias.to(module.bias.dtype))


@torch.no_grad()
def refit(
    module: nn.Module, stats: InputStats, removed: list[int], damping: float, source: nn.Module | None = None
) -> float:
    """Refit ``module``'s kept columns and bias; ``removed``: its pruned weight columns;
    ``source``: the layer whose outputs to match (default: ``module`` as it is now).

    Returns the relative output error left, ``E||W z - W' z_K||^2 / E||W z||^2`` on the
    recorded inputs (for logs and tests).
    """
    gram = stats.gram
    cross = stats.cross if stats.cross is not None else gram
    source = module if source is None else source
    weight = _matrix(source, stats)
    full = torch.cat([weight, source.bias.detach().double()[:, None]], 1) if stats.bias else weight
    size = full.shape[1]
    keep = torch.ones(size, dtype=torch.bool, device=gram.device)
    keep[torch.tensor(removed, dtype=torch.long, device=gram.device)] = False
    g_kk = gram[keep][:, keep]
    scale = float(g_kk.diagonal().mean()) if g_kk.numel() else 0.0
    lam = max(damping * scale, 1e-12 * max(scale, 1.0))
    rhs = full.to(gram.device) @ cross[:, keep]  # [out, K]: E[y z_K^T]
    eye = torch.eye(g_kk.shape[0], dtype=g_kk.dtype, device=g_kk.device)
    solution = torch.linalg.solve(g_kk + lam * eye, rhs.T).T
    new = torch.zeros_like(full, device=gram.device)
    new[:, keep] = solution
    error = _relative_error(full.to(gram.device), new, gram, cross, stats)
    new = new.to(weight.device)
    if stats.bias:
        _write(module, stats, new[:, :-1], new[:, -1])
    else:
        _write(module, stats, new, None)
    return error


def _relative_error(
    full: torch.Tensor, new: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, stats: InputStats
) -> float:
    """E||W z_ref - W' z||^2 / E||W z_ref||^2 from the statistics (z_ref = z when independent)."""
    if stats.cross is None:
        diff = full - new
        err = float(torch.einsum("oi,ij,oj->", diff, gram, diff))
        ref = float(torch.einsum("oi,ij,oj->", full, gram, full))
        return err / ref if ref > 0 else 0.0
    # with a reference: E||y||^2 is not recorded, report the error of the part z explains
    fitted = float(torch.einsum("oi,ij,oj->", new, gram, new))
    target = float(torch.einsum("oi,ij,oj->", full, cross, new))
    return max(0.0, 1.0 - target / fitted) if fitted > 0 else 0.0


def output_error(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, damping: float, refit: bool) -> float:
    """The output energy a consumer loses when only columns ``keep`` stay, with or without the
    least-squares refit (``weight``: [out, columns] incl. the bias column)."""
    if refit:
        removed = ~keep
        if not bool(removed.any()):
            return 0.0
        g_kk = gram[keep][:, keep]
        lam = damping * float(g_kk.diagonal().mean()) if g_kk.numel() else 0.0
        eye = torch.eye(g_kk.shape[0], dtype=g_kk.dtype, device=g_kk.device)
        # error = tr(W (G - G[:,K] (G_KK + lam)^-1 G[K,:]) W^T)
        g_k = gram[:, keep]
        schur = gram - g_k @ torch.linalg.solve(g_kk + lam * eye, g_k.T)
        return float(torch.einsum("oi,ij,oj->", weight, schur, weight))
    cut = weight * (~keep).to(weight.dtype)
    return float(torch.einsum("oi,ij,oj->", cut, gram, cut))


@torch.no_grad()
def recalibrate_batchnorms(
    model: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any], reduce: bool = True
) -> int:
    """Recompute every BatchNorm's running mean / variance on ``batches`` (cumulative average,
    other modules in eval mode), averaged over processes under DDP unless ``reduce`` is False
    (a copy only one process builds); returns how many BatchNorms were recalibrated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    modes = {id(m): m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module in model.modules():
            module.train(modes.get(id(module), was_training))
    if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        from .statistics import all_reduce_sum

        for norm in norms:
            norm.running_mean.copy_(all_reduce_sum(norm.running_mean.double()).div(world).to(norm.running_mean.dtype))
            norm.running_var.copy_(all_reduce_sum(norm.running_var.double()).div(world).to(norm.running_var.dtype))
    return len(norms)
