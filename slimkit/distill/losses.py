"""Distillation losses.

Each loss returns a ``(total, count)`` pair: the sum over valid positions and how many there
were. The caller divides by ``count`` (a mean) or by the number of label tokens of the whole
accumulated batch, which is what transformers' Trainer passes as ``num_items_in_batch``, so
that the KD terms are normalised exactly like the task loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IncompatibleError

IGNORE_INDEX = -100


def valid_positions(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten logits to [P, C] and the boolean mask of positions that count.

    ``[B, C]`` logits: every sample counts (unless its label is -100). ``[B, L, C]`` logits:
    positions labelled -100 and padding (attention_mask == 0) do not count. Causal LMs predict
    token t+1 at position t, so logits drop the last position and labels / mask the first,
    exactly as the task loss shifts them.
    """
    if logits.dim() == 2:
        mask = None if labels is None else labels.reshape(-1) != IGNORE_INDEX
        return logits, mask
    if causal:
        logits = logits[:, :-1]
        labels = None if labels is None else labels[:, 1:]
        attention_mask = None if attention_mask is None else attention_mask[:, 1:]
    mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if labels is not None:
        mask &= labels != IGNORE_INDEX
    if attention_mask is not None and attention_mask.shape == mask.shape:
        mask &= attention_mask.bool()
    return logits.reshape(-1, logits.shape[-1]), mask.reshape(-1)


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over valid positions.

    Computed from log-softmax on both sides, so it is finite for any logits. The T^2 factor
    keeps the gradient's scale independent of T (Hinton et al., 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise IncompatibleError(
            f"logit KD: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models need the same classes / vocabulary. "
            "Set distill.alpha: 0 to distil features only."
        )
    s, mask = valid_positions(student_logits, labels, attention_mask, causal)
    t, _ = valid_positions(teacher_logits.detach(), labels, attention_mask, causal)
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.sum() * temperature**2, torch.tensor(kl.numel(), device=kl.device)


def task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over valid positions (the task loss for models that return logits only)."""
    flat, mask = valid_positions(logits, labels, attention_mask, causal)
    target = labels[:, 1:] if causal and logits.dim() == 3 else labels
    target = target.reshape(-1)
    if mask is not None:
        flat, target = flat[mask], target[mask]
    return F.cross_entropy(flat.float(), target, reduction="sum"), torch.tensor(target.numel(), device=flat.device)


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE (or 1 - cosine) between aligned features of the same shape.

    Features are [B, C], [B, N, C] (tokens; ``token_mask`` [B, N] drops padding) or
    [B, C, H, W] (maps). The channel axis is the last one, except for maps (axis 1).
    Returns (sum over positions of the per-position loss, number of positions); MSE averages
    over channels within a position.
    """
    teacher = teacher.detach().to(student.dtype)
    channel_dim = 1 if student.dim() == 4 else -1
    if kind == "cosine":
        per_pos = 1.0 - F.cosine_similarity(student, teacher, dim=channel_dim, eps=1e-8)
    else:
        per_pos = (student - teacher).pow(2).mean(dim=channel_dim)
    if token_mask is not None and student.dim() == 3 and token_mask.shape == per_pos.shape:
        per_pos = per_pos[token_mask.bool()]
    return per_pos.sum(), torch.tensor(per_pos.numel(), device=per_pos.device)


def attention_kd(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    heads: str = "auto",
    query_mask: torch.Tensor | None = None,
    names: tuple[str, str] = ("student", "teacher"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) between attention distributions [B, H, Q, K], per query row.

    With equal head counts and ``heads`` in (auto, per_head) each head is matched to the same
    head; otherwise both sides are averaged over heads first (the mean of distributions is a
    distribution). Returns (sum over rows, number of rows) with padded query rows dropped.
    """
    s, t = student_probs, teacher_probs.detach()
    if s.dim() != 4 or t.dim() != 4:
        raise IncompatibleError(f"attention KD: expected [B, H, Q, K] probabilities, got {tuple(s.shape)}")
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise IncompatibleError(
            f"attention KD: {names[0]} maps {tuple(s.shape)} and {names[1]} maps {tuple(t.shape)} cover "
            "different tokens; map layers that see the same sequence (same tokenizer / patch size)."
        )
    same_heads = s.shape[1] == t.shape[1]
    if heads == "per_head" and not same_heads:
        raise IncompatibleError(
            f"attention KD heads=per_head: {names[0]} has {s.shape[1]} heads and {names[1]} has "
            f"{t.shape[1]}; use heads: average"
        )
    if heads == "average" or not same_heads:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    s, t = s.float(), t.float()
    kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1)  # [B, H, Q]
    if query_mask is not None and query_mask.shape == (kl.shape[0], kl.shape[2]):
        kl = kl * query_mask[:, None, :].to(kl.dtype)
        count = query_mask.bool().sum() * kl.shape[1]
    else:
        count = torch.tensor(kl.numel(), device=kl.device)
    return kl.sum(), count
