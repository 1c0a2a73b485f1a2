"""Weight-only INT8 embeddings (``quant.embeddings: true``).

An ``nn.Embedding``'s table is often the largest tensor of a transformer (half of MiniLM's
weights) and a lookup does no arithmetic, so its weight is stored as ``int8 [V, D]`` with one
symmetric scale per row (``float32 [V]``); a lookup gathers the int8 rows and their scales and
multiplies them, so the output is float and the next layer sees no difference in dtype.

Per row rather than per column: a lookup touches whole rows, so a row's scale is gathered
with it and each vector keeps its own range (rare tokens' rows are much smaller than frequent
ones'). The scale is always the row's absolute maximum / 127, so nothing is ever clipped;
``quant.weights`` (observer, granularity) applies to layers, not to embeddings.

The fake-quant and INT8 forwards compute ``round(w / s) * s`` with the same float32 ops, so
they agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _own_forward
from .numerics import quantize_weight, weight_scale_from_amax
from .state import (
    EmbeddingState,
    QuantMixin,
    attach_state,
    clear,
    original_class,
    restore_class,
    state_of,
    subclass,
    swap_class,
)


def row_scale(weight: torch.Tensor) -> torch.Tensor:
    """float32 ``[rows]``: each row's absolute maximum / 127 (an all-zero row gets EPS)."""
    return weight_scale_from_amax(weight.detach().abs().amax(dim=-1))


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 rows for per-row ``scale`` (round half to even, like every other weight)."""
    return quantize_weight(weight.float(), scale.unsqueeze(-1), axis=None)


def fake_quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 fake-quant of ``rows [..., D]``, straight-through gradient.

    Rounds with :func:`quantize_rows` and rescales like the INT8 forward (not with
    ``torch.fake_quantize_per_channel_affine``, which multiplies by ``1 / s``), so that the
    converted model returns exactly these numbers. The range is the row's own maximum, so no
    value is clipped and the gradient is 1 everywhere.
    """
    scale = row_scale(rows)
    levels = quantize_rows(rows.detach(), scale).float()
    quantized = (levels * scale.unsqueeze(-1)).to(rows.dtype)
    return rows + (quantized - rows).detach()


def embedding_problem(module: nn.Module) -> str | None:
    """Why an ``nn.Embedding`` cannot be quantized, or None when it can."""
    if _own_forward(module, nn.Embedding):
        return f"{type(module).__name__} overrides Embedding.forward, so fake-quant of its weight would be bypassed"
    if module.max_norm is not None:
        return (
            f"max_norm={module.max_norm}: the lookup renormalizes (and rewrites) the float rows in place, "
            "which an int8 table cannot do"
        )
    if module.sparse:
        return "sparse=True: sparse gradients of a fake-quantized table are not supported"
    return None


class QATEmbedding(QuantMixin):
    """Mixin placed in front of an ``nn.Embedding`` class: look up, then fake-quantize the rows.

    The rows are fake-quantized after the lookup: a row's scale depends on that row alone, so
    this equals looking up in a fake-quantized table, at the cost of the looked-up rows only.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        if not state_of(self).embedding.weight_fake_quant:
            return rows
        return fake_quantize_rows(rows)


class Int8Embedding(QuantMixin):
    """Mixin placed in front of an ``nn.Embedding`` class: buffers ``weight`` (int8 ``[V, D]``)
    and ``weight_scale`` (float32 ``[V]``); gather int8 rows and scales, multiply.

    Plain aten ops (embedding / index gather, cast, mul), so the same code runs eager, under
    ``torch.compile`` and under ``torch.export`` (ONNX: Gather, Cast, Mul)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight)
        scales = F.embedding(input, self.weight_scale.unsqueeze(-1))
        return rows.float() * scales

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8=embedding (weight-only, per row)"


def attach(module: nn.Module) -> None:
    """Make ``module`` a fake-quant embedding (in place; its Parameters stay the same)."""
    swap_class(module, QATEmbedding, "QAT")
    attach_state(module).embedding = EmbeddingState()


def detach(module: nn.Module) -> None:
    clear(module, "embedding")
    restore_class(module)


def set_fake_quant(module: nn.Module, on: bool) -> None:
    state_of(module).embedding.weight_fake_quant = on


def _embedding_state(module: nn.Module) -> EmbeddingState | None:
    state = state_of(module)
    return None if state is None else state.embedding


def is_qat_embedding(module: nn.Module) -> bool:
    embedding = _embedding_state(module)
    return embedding is not None and not embedding.int8


def is_int8_embedding(module: nn.Module) -> bool:
    embedding = _embedding_state(module)
    return embedding is not None and embedding.int8


def make_int8(module: nn.Module, weight_int8: torch.Tensor, scale: torch.Tensor, original_class: type) -> None:
    """Give ``module`` the int8 table and per-row scales and the Int8 class of ``original_class``."""
    module._parameters.pop("weight", None)
    module._buffers.pop("weight", None)
    module.register_buffer("weight", weight_int8.contiguous())
    module.register_buffer("weight_scale", scale.detach().float().reshape(weight_int8.shape[0]).contiguous())
    attach_state(module).embedding = EmbeddingState(int8=True)
    module.__class__ = subclass(Int8Embedding, original_class, "Int8")


@torch.no_grad()
def convert(module: nn.Module) -> None:
    """Fake-quant embedding -> INT8 embedding, with the integers the fake-quant forward used."""
    weight = module.weight.detach()
    scale = row_scale(weight)
    weight_int8 = quantize_rows(weight, scale)
    original = original_class(module)
    detach(module)
    make_int8(module, weight_int8, scale, original)


def empty_int8_like(module: nn.Module) -> None:
    """INT8 structure (zeros) on a freshly built float embedding, for loading saved weights."""
    shape = tuple(module.weight.shape)
    device = module.weight.device
    weight_int8 = torch.zeros(shape, dtype=torch.int8, device=device)
    make_int8(module, weight_int8, torch.ones(shape[0], device=device), type(module))


__all__ = [
    "attach",
    "convert",
    "detach",
    "embedding_problem",
    "empty_int8_like",
    "fake_quantize_rows",
    "is_int8_embedding",
    "is_qat_embedding",
    "make_int8",
    "quantize_rows",
    "row_scale",
]
