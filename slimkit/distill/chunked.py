"""Logit KD and cross-entropy over large vocabularies, in chunks of rows (tokens).

The unchunked KD loss keeps several ``[tokens, vocabulary]`` fp32 tensors alive for backward
(both log-softmaxes, the teacher's probabilities, their difference, the product), and a task
cross-entropy next to it keeps its own log-softmax and gradients: at 32k vocabulary x 1k
tokens each of those is 125 MiB. :func:`chunked_logit_losses` is one autograd function that
computes both losses chunk by chunk of rows and keeps only its inputs; backward recomputes
each chunk's softmaxes and writes the gradient straight into one ``[tokens, vocabulary]``
buffer in the student logits' dtype. The loss and gradient are those of the unchunked form
(tested against it): ``d(T^2 KL)/dz_s = T (softmax(z_s/T) - softmax(z_t/T))`` and
``d(CE)/dz = softmax(z) - onehot(y)``.

Everything inside runs in fp32 whatever the logits' dtype (bf16 under autocast): each chunk is
upcast on its own, so no fp32 copy of the whole logits is made either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# At most 4M logits per chunk (a 16 MiB fp32 temporary: 128 tokens at 32k vocabulary), and at
# least 8 chunks once the logits pass 1M values, so that the handful of temporaries a chunk
# needs stay a fraction of the logits themselves. Classification heads: one chunk.
CHUNK_ELEMENTS = 1 << 22
SINGLE_CHUNK_ELEMENTS = 1 << 20
MIN_CHUNKS = 8


def rows_per_chunk(rows: int, vocabulary: int, chunk_rows: int | None = None) -> int:
    if chunk_rows:
        return int(chunk_rows)
    vocabulary = max(1, vocabulary)
    if rows * vocabulary <= SINGLE_CHUNK_ELEMENTS:
        return max(1, rows)
    return max(1, min(CHUNK_ELEMENTS // vocabulary, -(-rows // MIN_CHUNKS)))


def _kd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(softmax(t/T) || softmax(s/T)) of one chunk, and log softmax(s/T)."""
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return torch.sub(log_p_t, log_p_s).mul_(log_p_t.exp()).sum(-1), log_p_s


class _ChunkedLogitLosses(torch.autograd.Function):
    """(sum of KL over kd rows, sum of CE over ce rows) for logits [P, V]; see the module doc."""

    @staticmethod
    def forward(ctx, student, teacher, kd_rows, target, ce_rows, temperature, chunk):  # type: ignore[override]
        kd_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        with torch.no_grad():
            for a in range(0, student.shape[0], chunk):
                s = student[a : a + chunk].float()
                log_p_s = None
                if teacher is not None:
                    kl, log_p_s = _kd_rows(s, teacher[a : a + chunk].float(), temperature)
                    # where, not a product: padded rows may hold anything, inf and NaN included
                    kd_sum += torch.where(kd_rows[a : a + chunk], kl, 0.0).sum(dtype=torch.float64)
                if target is not None:
                    log_p = log_p_s if log_p_s is not None and temperature == 1.0 else F.log_softmax(s, -1)
                    y = target[a : a + chunk]
                    nll = -log_p.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
                    ce_sum += torch.where(ce_rows[a : a + chunk], nll, 0.0).sum(dtype=torch.float64)
        ctx.save_for_backward(student, teacher, kd_rows, target, ce_rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        return kd_sum.float(), ce_sum.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd, grad_ce):  # type: ignore[override]
        student, teacher, kd_rows, target, ce_rows = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(student)
        # In place where possible: about three chunk-sized temporaries at a time.
        for a in range(0, student.shape[0], chunk):
            s = student[a : a + chunk].float()
            g = None
            if teacher is not None and grad_kd is not None:
                g = torch.softmax(s / T, -1)
                g.sub_(torch.softmax(teacher[a : a + chunk].float() / T, -1)).mul_(grad_kd / T)
                g.masked_fill_(~kd_rows[a : a + chunk, None], 0.0)
            if target is not None and grad_ce is not None:
                p = torch.softmax(s, -1)
                y = target[a : a + chunk]
                p.scatter_add_(1, y.clamp_min(0)[:, None], torch.full_like(p[:, :1], -1.0))
                p.mul_(grad_ce).masked_fill_(~ce_rows[a : a + chunk, None], 0.0)
                g = p if g is None else g.add_(p)
            if g is None:
                grad[a : a + chunk] = 0
            else:
                grad[a : a + chunk] = g
        return grad, None, None, None, None, None, None


def chunked_logit_losses(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    kd_rows: torch.Tensor | None,
    temperature: float,
    target: torch.Tensor | None = None,
    ce_rows: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_r KL_r, sum_r CE_r)`` over flattened logits ``[P, V]`` (fp32 scalars).

    ``kd_rows`` / ``ce_rows`` are boolean ``[P]`` masks of the rows that count (None: all);
    ``target`` the class of each row for the cross-entropy (None: no CE). Without a teacher the
    KD sum is 0; without a target the CE sum is 0. The KL is not multiplied by T^2 here.
    """
    rows = student.shape[0]
    everything = torch.ones(rows, dtype=torch.bool, device=student.device)
    kd_rows = everything if kd_rows is None else kd_rows.to(student.device)
    ce_rows = everything if ce_rows is None else ce_rows.to(student.device)
    if teacher is not None:
        teacher = teacher.detach()
    if target is not None:
        target = target.to(student.device)
        ce_rows = ce_rows & (target >= 0)
    chunk = rows_per_chunk(rows, student.shape[-1], chunk_rows)
    return _ChunkedLogitLosses.apply(student, teacher, kd_rows, target, ce_rows, float(temperature), chunk)
