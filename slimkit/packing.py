"""INT8 folders store their small tensors packed: one 1-D tensor per dtype.

An INT8 layer keeps, beside its int8 weight, a bias, per-channel weight scales and two 0-d
tensors (the input scale and zero-point); activation sites add two more. Stored as one
safetensors entry each, their header entries (about 85 bytes of JSON apiece) outweigh small
values: of the 67 kB INT8 file of ``make demo``'s digits CNN, 14.4 kB was header, and the
file was 0.312x its FP32 file while its tensors alone were 0.259x.

Format 2 (written for models with a ``quantization`` block) stores every tensor of at most
``MAX_PACKED_NUMEL`` elements in ``slimkit.packed.<DTYPE>``: the tensors of that dtype,
flattened and concatenated in sorted key order. No name is stored: the loader rebuilds the
model on the meta device anyway (slimkit.safe_build), so it knows which tensors are small,
their shapes and their order. The metadata records, per packed tensor, the SHA-256 of the
joined names, so a folder whose rebuilt model would place the values under other names is
refused instead of loading silently wrong values.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .errors import FormatError
from .modules import attached_by_slimkit

PACKED_PREFIX = "slimkit.packed."
MAX_PACKED_NUMEL = 4096

# safetensors' dtype names (the header's), for the dtypes slimkit's INT8 models hold.
_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def small_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The keys to pack, by safetensors dtype name, each list sorted."""
    out: dict[str, list[str]] = {}
    for key, tensor in tensors.items():
        if math.prod(tensor.shape) <= MAX_PACKED_NUMEL and tensor.dtype in _NAMES:
            out.setdefault(_NAMES[tensor.dtype], []).append(key)
    return {dtype: sorted(keys) for dtype, keys in sorted(out.items())}


def pack(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with its small tensors packed, and the safetensors metadata that checks them."""
    out = dict(state)
    metadata: dict[str, str] = {}
    for dtype, keys in small_tensors(state).items():
        out[PACKED_PREFIX + dtype] = torch.cat([out.pop(key).reshape(-1) for key in keys])
        metadata[PACKED_PREFIX + dtype] = _names_digest(keys)
    return out, metadata


def is_packed(key: str) -> bool:
    return key.startswith(PACKED_PREFIX)


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a save of ``model`` writes, by key: one name per tensor object (the first, as
    ``hub.student_state_dict`` keeps it), without what slimkit attached. Works on meta models."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not attached_by_slimkit(key) and id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor
    return out


def unpacked_layout(
    header: dict[str, tuple[tuple[int, ...], str]], metadata: dict[str, str], model: nn.Module, file: object
) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """For each packed tensor of the header: the ``(key, shape)`` pieces it holds, in order.

    Checked against the (meta) model before anything is loaded: its small tensors of that dtype
    must be exactly the ones the folder packed (the names' digest), and their sizes must add up
    to the packed tensor's length."""
    tensors = expected_tensors(model)
    wanted = small_tensors(tensors)
    layout: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, (shape, dtype) in header.items():
        if not is_packed(key):
            continue
        name = key[len(PACKED_PREFIX) :]
        if name != dtype or len(shape) != 1:
            raise FormatError(
                f"{file}: {key} is stored as {dtype} with shape {shape}; a packed tensor is 1-D and of the dtype "
                "its name says. Save the model again."
            )
        keys = wanted.get(dtype, [])
        if metadata.get(key) != _names_digest(keys):
            raise FormatError(
                f"{file}: {key} packs other tensors than the rebuilt model's {len(keys)} small {dtype} tensors "
                "(the names' SHA-256 differs); config.json and the weights do not belong together. Save the "
                "model again."
            )
        pieces = [(k, tuple(tensors[k].shape)) for k in keys]
        values = sum(math.prod(s) for _, s in pieces)
        if values != shape[0]:
            raise FormatError(
                f"{file}: {key} holds {shape[0]:,} values but the rebuilt model's small {dtype} tensors take "
                f"{values:,}; config.json and the weights do not belong together"
            )
        layout[key] = pieces
    return layout


def unpack(state: dict[str, torch.Tensor], layout: dict[str, list[tuple[str, tuple[int, ...]]]]) -> None:
    """Split the packed tensors of a loaded ``state`` into their keys, in place (each piece its
    own storage: a saved model's tensors must not share memory)."""
    for key, pieces in layout.items():
        flat, offset = state.pop(key), 0
        for name, shape in pieces:
            size = math.prod(shape)
            state[name] = flat[offset : offset + size].reshape(shape).clone()
            offset += size
