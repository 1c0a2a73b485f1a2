"""Short hashes of a model's state, to check that distributed processes agree.

Every process of a data-parallel run must reach the same pruning masks (they are decided from
all-reduced statistics) and, after ``convert``, the same architecture; a run gathers these
hashes from each process and records them (``metrics.json`` of ``scripts/distill.py``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .modules import SLIMKIT_ATTR


def fingerprint(values: dict[str, Any]) -> str:
    """A 16-hex-digit hash of named values: tensors by their bytes, anything else by ``repr``
    (a shape, a number). The key order does not matter."""
    digest = hashlib.sha256()
    for key in sorted(values):
        value = values[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def method_state_fingerprint(model: nn.Module, section: str) -> str:
    """The hash of a prepared model's checkpointed state of one method (``"prune"``: which
    units are masked, its statistics), as its ``state_dict`` holds it."""
    prefix = f"{SLIMKIT_ATTR}.{section}."
    return fingerprint({k: v for k, v in model.state_dict().items() if k.startswith(prefix)})


def architecture_fingerprint(model: nn.Module) -> str:
    """The hash of a model's tensor names and shapes (not their values)."""
    return fingerprint({k: tuple(v.shape) for k, v in model.state_dict().items()})
