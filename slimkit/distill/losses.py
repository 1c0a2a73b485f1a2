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
from .chunked import chunked_logit_losses

IGNORE_INDEX = -100


def fp32_losses(tensor: torch.Tensor):
    """A context with autocast off on ``tensor``'s device: KD terms are computed in fp32 even
    when the forward runs under ``torch.autocast`` (the Trainer's ``bf16=True``)."""
    return torch.autocast(tensor.device.type, enabled=False)


def row_masks(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logits as ``[P, C]`` rows (a view, never a copy), the boolean mask of rows that count,
    and the target class of each row (None without labels).

    ``[B, C]`` logits: every sample counts (unless its label is -100). ``[B, L, C]`` logits:
    positions labelled -100 and padding (attention_mask == 0) do not count. Causal LMs predict
    token t+1 at position t, so position t's target and mask are those of token t+1 and the
    last position counts for nothing, exactly as transformers' causal LM loss shifts them.
    Shifting the small label and mask tensors instead of the logits keeps the logits a view.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if logits.dim() == 2:
        mask = torch.ones(flat.shape[0], dtype=torch.bool, device=logits.device)
        # class labels only: multi-label / regression targets neither mask rows nor make a CE
        is_class = labels is not None and not labels.is_floating_point() and labels.numel() == flat.shape[0]
        target = labels.reshape(-1).to(logits.device) if is_class else None
        if target is not None:
            mask &= target != IGNORE_INDEX
        return flat, mask, target
    if causal:
        labels = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if attention_mask is not None and attention_mask.shape == logits.shape[:2]:
            attention_mask = F.pad(attention_mask[:, 1:], (0, 1), value=0)
    mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if causal:
        mask[:, -1] = False
    if labels is not None:
        mask &= labels.to(logits.device) != IGNORE_INDEX
    if attention_mask is not None and attention_mask.shape == mask.shape:
        mask &= attention_mask.to(logits.device).bool()
    target = None if labels is None else labels.reshape(-1)
    return flat, mask.reshape(-1), target


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over valid positions.

    Computed from log-softmax on both sides, so it is finite for any logits. The T^2 factor
    keeps the gradient's scale independent of T (Hinton et al., 2015). Computed in chunks of
    ``chunk_rows`` positions (:mod:`slimkit.distill.chunked`), in fp32.
    """
    kd, count, _, _ = logit_kd_and_ce(
        student_logits, teacher_logits, temperature, labels, attention_mask, causal, chunk_rows=chunk_rows
    )
    return kd, count


def logit_kd_and_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    with_ce: bool = False,
    ce_attention_mask: bool = True,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T^2 KL sum, KD positions, CE sum, CE positions)`` in one chunked pass over the logits.

    ``with_ce`` adds the task cross-entropy against ``labels`` (-100 ignored; shifted for causal
    LMs); ``ce_attention_mask=False`` counts every labelled position whatever the attention
    mask, as transformers' own loss does.
    """
    if teacher_logits is not None and student_logits.shape != teacher_logits.shape:
        raise IncompatibleError(
            f"logit KD: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models need the same classes / vocabulary. "
            "Set distill.alpha: 0 to distil features only."
        )
    with fp32_losses(student_logits):
        flat, mask, target = row_masks(student_logits, labels, attention_mask, causal)
        ce_rows = mask if ce_attention_mask else row_masks(student_logits, labels, None, causal)[1]
        if not with_ce or target is None:
            target, ce_rows = None, None
        teacher = None if teacher_logits is None else teacher_logits.reshape(flat.shape)
        kd, ce = chunked_logit_losses(flat, teacher, mask, temperature, target, ce_rows, chunk_rows)
        kd_count = mask.sum() if teacher is not None else torch.zeros((), dtype=torch.long, device=flat.device)
        ce_count = (ce_rows & (target >= 0)).sum() if target is not None else torch.zeros_like(kd_count)
        return kd * temperature**2, kd_count, ce, ce_count


def task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over valid positions (the task loss for models that return logits only)."""
    _, _, ce, count = logit_kd_and_ce(
        logits, None, 1.0, labels, attention_mask, causal, with_ce=True, chunk_rows=chunk_rows
    )
    return ce, count


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    token_mask: torch.Tensor | None = None,
    pool: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE, 1 - cosine, or the relation loss between aligned features of the same shape.

    Features are [B, C], [B, N, C] (tokens; ``token_mask`` [B, N] drops padding) or
    [B, C, H, W] (maps). The channel axis is the last one, except for maps (axis 1).
    ``pool="mean"`` first averages each sample over its valid tokens or spatial positions (the
    sentence embedding of a mean-pooling encoder), so the loss compares one vector per sample.
    ``kind="relation"`` compares the batch's pairwise cosine similarities instead of the
    features themselves (similarity-preserving KD, Tung & Mori 2019): the squared difference of
    the student's and the teacher's [B, B] similarity matrices, which is what ranking by
    embedding similarity depends on. It needs no projector and sees only the local batch.
    Returns (sum over positions of the per-position loss, number of positions); MSE averages
    over channels within a position, the relation loss counts the B * B pairs.
    """
    with fp32_losses(student):  # bf16 features under autocast: the MSE itself in fp32
        student, teacher = student.float(), teacher.detach().float()
        if pool == "mean":
            student, teacher = mean_pool(student, token_mask), mean_pool(teacher, token_mask)
            token_mask = None
        if kind == "relation":
            return _relation_loss(student, teacher, token_mask)
        channel_dim = 1 if student.dim() == 4 else -1
        if kind == "cosine":
            per_pos = 1.0 - F.cosine_similarity(student, teacher, dim=channel_dim, eps=1e-8)
        else:
            per_pos = (student - teacher).pow(2).mean(dim=channel_dim)
        if token_mask is not None and student.dim() == 3 and token_mask.shape == per_pos.shape:
            per_pos = per_pos[token_mask.bool()]
        return per_pos.sum(), torch.tensor(per_pos.numel(), device=per_pos.device)


def mean_pool(features: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per sample: [B, N, C] averaged over the tokens ``token_mask`` keeps (all when
    it is None or does not match), [B, C, H, W] over positions, [B, C] as it is."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() != 3:
        return features
    if token_mask is None or token_mask.shape != features.shape[:2]:
        return features.mean(dim=1)
    keep = token_mask.to(features.dtype).unsqueeze(-1)
    return (features * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def _relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if token_mask is not None and student.dim() == 3 and token_mask.shape == student.shape[:2]:
        keep = token_mask.to(student.dtype).unsqueeze(-1)  # padding must not make two samples alike
        student, teacher = student * keep, teacher * keep
    s = F.normalize(student.flatten(1), dim=1, eps=1e-8)
    t = F.normalize(teacher.flatten(1), dim=1, eps=1e-8)
    diff = (s @ s.T - t @ t.T).pow(2)
    return diff.sum(), torch.tensor(diff.numel(), device=diff.device)


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
    with fp32_losses(s):
        s, t = s.float(), t.float()  # before the head average: bf16 maps under autocast
        if heads == "average" or not same_heads:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1)  # [B, H, Q]
        if query_mask is not None and query_mask.shape == (kl.shape[0], kl.shape[2]):
            kl = kl * query_mask[:, None, :].to(kl.dtype)
            count = query_mask.bool().sum() * kl.shape[1]
        else:
            count = torch.tensor(kl.numel(), device=kl.device)
        return kl.sum(), count
