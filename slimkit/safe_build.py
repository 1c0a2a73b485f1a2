"""Building a model from an untrusted folder with memory bounded by its weights file.

A ``config.json`` may declare any size: ``"vocab_size": 50000000`` or a pruning manifest
shape of ``[40000, 40000, 1, 1]`` would make a plain build allocate gigabytes before the
25 kB weights file is read. So the architecture is first built on PyTorch's ``meta`` device
(shapes only, no memory), every method block is replayed there, and the result is compared
with the safetensors *header* (names, shapes and dtypes, read without loading a tensor):

* every tensor the model keeps in its ``state_dict`` must be in the file with the same shape
  (tied weights once), and nothing else may be; integer tensors (int8 weights, zero-points)
  must be stored with their own dtype, so a float tensor is never cast into an int8 one;
* tensors the file does not hold (non-persistent buffers such as position ids or rotary
  frequencies) may take at most ``max(64 MiB, file size)``;
* the build itself may register at most ``4 x`` the file's tensors (+256): a config with a
  million layers is refused while it is being built, before its modules fill the memory.

Only then are tensors allocated: the file's tensors are loaded and *assigned* to the meta
model (no second copy), tied weights re-tied, and the non-persistent buffers computed by the
model family's own initialiser (transformers' ``initialize_weights`` for what the checkpoint
did not hold, timm's ``init_non_persistent_buffers``). A model whose construction leaves
tensors outside its ``state_dict`` is rebuilt on the CPU instead, only when its unpruned size
is at most ``16 x`` the file (+256 MiB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .errors import FormatError, SlimkitError
from .packing import is_packed, unpack, unpacked_layout
from .recipe_io import short_repr

NON_PERSISTENT_FLOOR = 64 << 20
REGISTRATION_FACTOR, REGISTRATION_SLACK = 4, 256
CPU_BUILD_FACTOR, CPU_BUILD_SLACK = 16, 256 << 20

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Header(dict):
    """``name -> (shape, safetensors dtype string)`` of a weights file, its size and metadata;
    ``layout`` says how its packed tensors split (:mod:`slimkit.packing`, set by ``unpack_header``)."""

    file: Path
    file_bytes: int
    metadata: dict[str, str]
    layout: dict[str, list[tuple[str, tuple[int, ...]]]]

    def tensor_count(self) -> int:
        """Tensors stored, each value of a packed tensor counted as one."""
        return sum(shape[0] if is_packed(key) and len(shape) == 1 else 1 for key, (shape, _) in self.items())

    def tensor_bytes(self) -> int:
        sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
        return sum(math.prod(shape) * sizes.get(dtype, 1) for shape, dtype in self.values())


def read_header(file: Path) -> Header:
    """Names, shapes and dtypes of a safetensors file without loading any tensor."""
    if not file.is_file():
        raise FormatError(f"{file} is missing; save the model again with slimkit.save_pretrained")
    header = Header()
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(key)
                header[key] = (tuple(piece.get_shape()), piece.get_dtype())
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{file} is not a readable safetensors file ({exc}); save the model again") from None
    header.file, header.file_bytes, header.metadata, header.layout = file, file.stat().st_size, metadata, {}
    return header


def unpack_header(header: Header, model: nn.Module) -> Header:
    """``header`` as if its packed tensors were stored one by one, their split checked against
    the (meta) model first (:mod:`slimkit.packing`); a header without packed tensors as it is."""
    if not any(is_packed(key) for key in header):
        return header
    layout = unpacked_layout(header, header.metadata, model, header.file)
    out = Header({key: value for key, value in header.items() if not is_packed(key)})
    for key, pieces in layout.items():
        for name, shape in pieces:
            if name in out:
                raise FormatError(f"{header.file}: {name} is stored twice, on its own and packed in {key}")
            out[name] = (shape, header[key][1])
    out.file, out.file_bytes, out.metadata, out.layout = header.file, header.file_bytes, header.metadata, layout
    return out


def load_state(header: Header) -> dict[str, torch.Tensor]:
    """The file's tensors, packed ones split into their keys (``header`` from ``unpack_header``)."""
    try:
        state = load_file(str(header.file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{header.file} is not a readable safetensors file ({exc}); save the model again") from None
    unpack(state, header.layout)
    return state


class _TooManyTensors(Exception):
    pass


@contextmanager
def _bounded_registrations(limit: int) -> Iterator[None]:
    """Raise inside the model's constructor once it registers more than ``limit`` tensors."""
    count = [0]

    def hook(module: nn.Module, name: str, value: Any) -> None:
        count[0] += 1
        if count[0] > limit:
            raise _TooManyTensors

    handles = [
        nn.modules.module.register_module_parameter_registration_hook(hook),
        nn.modules.module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def build_on_meta(
    build: Callable[[], nn.Module], rebuild: Callable[[nn.Module], nn.Module], header: Header, config_file: Path
) -> tuple[nn.Module, int]:
    """``rebuild(build())`` on the meta device, and the unpruned model's bytes."""
    limit = REGISTRATION_FACTOR * header.tensor_count() + REGISTRATION_SLACK
    try:
        with torch.device("meta"), _bounded_registrations(limit):
            model = build()
            base_bytes = _tensor_bytes(model.state_dict(keep_vars=True).values())
            model = rebuild(model)
    except _TooManyTensors:
        raise FormatError(
            f"{config_file} declares a model of more than {limit:,} tensors but {header.file.name} holds "
            f"{header.tensor_count():,}; the config and the weights do not belong together"
        ) from None
    except SlimkitError:
        raise
    except Exception as exc:  # whatever the model code raises on values it does not expect
        raise FormatError(
            f"{config_file}: the model cannot be built from this config ({type(exc).__name__}: "
            f"{short_repr(str(exc), 300)[1:-1]})"
        ) from None
    return model, base_bytes


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """state_dict keys grouped by the tensor object they name (tied weights share one)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return list(groups.values())


def _compatible(expected: torch.dtype, stored: str) -> bool:
    dtype = _DTYPES.get(stored)
    if dtype is None:
        return False
    return dtype == expected or (dtype.is_floating_point and expected.is_floating_point)


def check_against_header(model: nn.Module, header: Header) -> None:
    """The meta model's tensors and the file's, name for name (see the module docstring)."""
    file = header.file
    tensors = model.state_dict(keep_vars=True)
    unexpected = sorted(set(header) - set(tensors))
    if unexpected:
        raise FormatError(f"{file} holds tensors the model does not have: {unexpected[:5]}")
    for key, (shape, dtype) in header.items():
        want = tensors[key]
        if tuple(want.shape) != shape:
            raise FormatError(
                f"{file}: {key} has shape {shape} but the rebuilt model expects {tuple(want.shape)}; "
                "config.json and the weights do not belong together"
            )
        if not _compatible(want.dtype, dtype):
            raise FormatError(
                f"{file}: {key} is stored as {dtype} but the rebuilt model holds {want.dtype} there; a tensor "
                "is never converted between integer and floating point on load. Save the model again."
            )
    missing = [group[0] for group in _alias_groups(model) if not any(k in header for k in group)]
    if missing:
        raise FormatError(f"{file} lacks tensors the model needs: {missing[:5]}")
    extra = _tensor_bytes(_non_persistent(model))
    if extra > max(NON_PERSISTENT_FLOOR, header.file_bytes):
        raise FormatError(
            f"{file.parent / 'config.json'} declares {extra / 2**20:.0f} MiB of buffers the weights file does not "
            f"hold (more than its own {header.file_bytes / 2**20:.1f} MiB); refusing to allocate them"
        )


def _non_persistent(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name in module._non_persistent_buffers_set:
                yield buffer


class NeedsCpuBuild(Exception):
    """The model keeps tensors outside its state_dict: build it on the CPU instead."""


def materialize(model: nn.Module, header: Header, init_buffers: Callable[[nn.Module, set[str]], None]) -> nn.Module:
    """Load the file's tensors into the checked meta model (assigned, not copied)."""
    tensors = model.state_dict(keep_vars=True)
    groups = _alias_groups(model)
    state = load_state(header)
    for key, value in state.items():
        if value.dtype != tensors[key].dtype:  # float <-> float only (checked against the header)
            state[key] = value.to(tensors[key].dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for group in groups:  # tied weights: every name points at the one loaded tensor again
        source = next(k for k in group if k in state)
        loaded = _get(model, source)
        for key in group:
            if key != source:
                _set(model, key, loaded)
    for module in model.modules():  # computed by the family's initialiser below
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    init_buffers(model, set(state))
    for module in model.modules():
        if any(isinstance(v, torch.Tensor) and v.is_meta for v in vars(module).values()):
            raise NeedsCpuBuild
    return model


def _get(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]


def _set(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def check_cpu_build(base_bytes: int, header: Header) -> None:
    """A full CPU build of the unpruned model is allowed only when it is not far larger than the file."""
    limit = CPU_BUILD_FACTOR * header.file_bytes + CPU_BUILD_SLACK
    if base_bytes > limit:
        raise FormatError(
            f"{header.file.parent / 'config.json'} declares a {base_bytes / 2**20:.0f} MiB model before pruning, "
            f"more than {CPU_BUILD_FACTOR}x its {header.file_bytes / 2**20:.1f} MiB weights; refusing to allocate it"
        )


def check_plain_folder(model: nn.Module, header: Header) -> None:
    """A folder written by transformers or timm (loaded by their own loaders afterwards): names
    may differ from the model's (older checkpoints), so only the sizes are bounded here."""
    tensors = model.state_dict(keep_vars=True)
    for key, (shape, _) in header.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise FormatError(
                f"{header.file}: {key} has shape {shape} but config.json builds {tuple(tensors[key].shape)}; "
                "config.json and the weights do not belong together"
            )
    declared = _tensor_bytes(model.state_dict(keep_vars=True).values())
    declared += _tensor_bytes(_non_persistent(model))
    # 2x: a float16 / bfloat16 file is loaded as float32; 64 MiB: heads a checkpoint may lack.
    if declared > 2 * header.tensor_bytes() + NON_PERSISTENT_FLOOR:
        raise FormatError(
            f"{header.file.parent / 'config.json'} declares a {declared / 2**20:.0f} MiB model but "
            f"{header.file.name} holds {header.tensor_bytes() / 2**20:.1f} MiB; refusing to allocate it"
        )
