"""Projectors that map a student feature onto the teacher's, and size alignment.

* vectors [B, C] and tokens [B, N, C]: ``nn.Linear(C_s, C_t)``;
* feature maps [B, C, H, W]: a 1x1 ``nn.Conv2d(C_s, C_t)``;
* equal widths need no projector (identity, no parameters).

After projection, token counts are matched by linear interpolation along the sequence and
spatial sizes by adaptive average pooling (student larger) or bilinear interpolation
(student smaller). Anything else (different ranks, different batch) cannot be aligned and
raises an ``IncompatibleError`` that names both modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleError


def _describe(shape: tuple[int, ...]) -> str:
    kind = {2: "[B, C] vectors", 3: "[B, N, C] tokens", 4: "[B, C, H, W] maps"}.get(len(shape), f"rank {len(shape)}")
    return f"{kind} {tuple(shape)}"


def check_alignable(student: tuple[int, ...], teacher: tuple[int, ...], names: tuple[str, str]) -> None:
    problem = None
    if len(student) != len(teacher):
        problem = "they have different ranks"
    elif len(student) not in (2, 3, 4):
        problem = "only [B, C], [B, N, C] and [B, C, H, W] features are supported"
    elif student[0] != teacher[0]:
        problem = "their batch sizes differ"
    if problem:
        raise IncompatibleError(
            f"feature KD: no projector can align student {names[0]!r} ({_describe(student)}) with "
            f"teacher {names[1]!r} ({_describe(teacher)}): {problem}. Pair modules of the same kind "
            "(token outputs with token outputs, feature maps with feature maps)."
        )


def build_projector(student: tuple[int, ...], teacher: tuple[int, ...], names: tuple[str, str]) -> nn.Module:
    """The learned projector from the student's width to the teacher's (identity when equal)."""
    check_alignable(student, teacher, names)
    if len(student) == 4:
        c_s, c_t = student[1], teacher[1]
        return nn.Identity() if c_s == c_t else nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
    c_s, c_t = student[-1], teacher[-1]
    return nn.Identity() if c_s == c_t else nn.Linear(c_s, c_t, bias=False)


def align(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Resize a projected student feature to the teacher's token count / spatial size."""
    if student.shape == teacher.shape:
        return student
    if student.dim() == 3 and student.shape[1] != teacher.shape[1]:
        x = student.transpose(1, 2)  # [B, C, N]
        x = F.interpolate(x, size=teacher.shape[1], mode="linear", align_corners=False)
        return x.transpose(1, 2)
    if student.dim() == 4 and student.shape[2:] != teacher.shape[2:]:
        h, w = teacher.shape[2:]
        if student.shape[2] >= h and student.shape[3] >= w:
            return F.adaptive_avg_pool2d(student, (h, w))
        return F.interpolate(student, size=(h, w), mode="bilinear", align_corners=False)
    return student
