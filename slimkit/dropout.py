"""Turning dropout off in a student (``distill.dropout: off`` or :func:`disable_dropout`).

Distilling the features of a pre-trained encoder works better without dropout in the student:
the teacher runs in eval mode, and the student's dropout only adds noise to the features it
must match. Dropout lives in ``nn.Dropout`` modules and in plain float attributes that
attention implementations and heads read in ``forward`` (transformers' ``attention_dropout``,
timm's ``drop_rate`` and DropPath's ``drop_prob``); all of them are set to 0.
"""

from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> list[str]:
    """Set every dropout probability of ``model`` to 0 (in place); returns what changed,
    e.g. ``["bert.embeddings.dropout.p", "bert.encoder.layer.0.attention.self.dropout.p"]``."""
    changed = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed.append(f"{prefix}p")
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or "drop" not in attr or isinstance(value, bool):
                continue
            if isinstance(value, float) and 0.0 < value < 1.0:
                setattr(module, attr, 0.0)
                changed.append(f"{prefix}{attr}")
    return changed
