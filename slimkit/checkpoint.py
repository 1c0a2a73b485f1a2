"""Training checkpoints without pickle: model, optimizer and RNG state as safetensors + JSON.

A checkpoint is a folder ``step-000123`` holding

* ``model.safetensors``: the model's whole ``state_dict`` (slimkit's state included: step,
  projectors, pruning masks and statistics, observer ranges);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and its param groups
  and scalar state;
* ``rng-<rank>.safetensors``: each process's torch RNG state;
* ``state.json``: the loop's own state (step, epoch, batch, loss curve, ...);
* ``checksums.json``: the SHA-256 of every other file, written last.

A model sharded by FSDP2 (``fully_shard``) is saved as a *full* state dict, gathered by every
process and written by rank 0: ``model.safetensors`` is then the same file a DDP or single-process
run writes, and ``optimizer.safetensors`` holds torch's full optimizer state dict, keyed by
parameter name (``<parameter name>.<field>``; param groups and JSON scalars in
``optimizer.json``). Resuming reads the files on every process and loads each process's shards
from them (``set_model_state_dict``), so the processes need the same file system.
``torch.distributed.checkpoint`` would write sharded files without gathering, but its metadata
file is a pickle, which slimkit never writes or reads.

It is written under a temporary name and renamed into place when complete, so a run that is
killed or runs out of disk never leaves a half checkpoint under a ``step-*`` name, and
earlier checkpoints are only deleted after a newer one is complete. Checkpoints are ordered
by their step *number* (``step-1000000`` is newer than ``step-999000``). Loading verifies the
checksums first and names a damaged or missing file; :func:`latest_intact_checkpoint` skips
damaged checkpoints, saying which file is damaged, and returns the newest intact one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .atomic import ordinary_permissions, sha256_file
from .errors import FormatError

_STEP_DIR = re.compile(r"step-(\d+)\Z")
CHECKSUMS = "checksums.json"
_REQUIRED = ("model.safetensors", "state.json")


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _sharded_to_files(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Full model and optimizer state of an FSDP2 model (a collective; rank 0 gets the values)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    # nested, keyed by parameter name (torch 2.14's flatten_optimizer_state_dict=True output
    # does not load back: KeyError 'param_groups.0.params.0')
    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    tensors, scalars = {}, {}
    for name, values in full.get("state", {}).items():
        for field, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{field}"] = value.detach().contiguous()
            else:
                scalars[f"{name}.{field}"] = value
    # tied parameters appear under each name; safetensors stores one copy (the model re-ties them)
    seen: set[tuple] = set()
    storages: set[int] = set()
    for name in list(weights):
        tensor = weights[name].detach()
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())) if tensor.numel() else (name,)
        if key in seen:
            del weights[name]
            continue
        seen.add(key)
        storage = tensor.untyped_storage().data_ptr()
        weights[name] = tensor.clone() if storage in storages and tensor.numel() else tensor.contiguous()
        storages.add(storage)
    meta = {"layout": "full", "param_groups": full.get("param_groups", []), "scalars": scalars}
    return weights, tensors, meta


def _sharded_from_files(model: nn.Module, optimizer: Any, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = _read_tensors(path / "model.safetensors")
    names = dict(model.named_parameters(remove_duplicate=False))
    expected = set(model.state_dict())
    for name in expected - set(weights):  # a tied copy safetensors stored once
        twin = next((n for n in weights if n in names and names[n] is names.get(name)), None)
        if twin is not None:
            weights[name] = weights[twin]
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise FormatError(
            f"{path / 'model.safetensors'} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    set_model_state_dict(model, weights, options=_full_options())
    if optimizer is not None:
        meta = _read_json(path / "optimizer.json")
        if meta.get("layout") != "full":
            raise FormatError(
                f"{path / 'optimizer.json'} holds a per-process optimizer state (written without FSDP2); "
                "resume it without fully_shard, or start the sharded run from model.safetensors alone"
            )
        state: dict[str, dict[str, Any]] = {}
        for key, value in [*_read_tensors(path / "optimizer.safetensors").items(), *meta["scalars"].items()]:
            name, field = key.rsplit(".", 1)  # parameter names have dots, state fields none
            state.setdefault(name, {})[field] = value
        try:
            set_optimizer_state_dict(
                model, optimizer, {"state": state, "param_groups": meta["param_groups"]}, options=_full_options()
            )
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise FormatError(f"{path / 'optimizer.json'} does not fit the optimizer ({exc})") from None


def _step_dirs(root: Path) -> list[Path]:
    """The complete ``step-*`` folders under ``root``, oldest first, by step number."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step-*`` folder under ``root`` (None if there is none), unverified."""
    found = _step_dirs(Path(root))
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> None:
    """Raise a ``FormatError`` naming the first missing, truncated or altered file of a
    checkpoint (checked against its ``checksums.json``)."""
    path = Path(path)
    for name in _REQUIRED:
        if not (path / name).is_file():
            raise FormatError(f"{path / name} is missing; {path} is not a complete slimkit checkpoint")
    listing = path / CHECKSUMS
    if not listing.is_file():
        warnings.warn(
            f"{path} has no {CHECKSUMS} (written by an older slimkit); its files cannot be verified",
            stacklevel=2,
        )
        return
    try:
        files = json.loads(listing.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise FormatError(f"{listing} is damaged (not the JSON slimkit writes)") from None
    for name, digest in sorted(files.items()):
        file = path / name
        if "/" in name or "\\" in name or name.startswith("."):
            raise FormatError(f"{listing} lists {name!r}, which is not a checkpoint file name")
        if not file.is_file():
            raise FormatError(f"{file} is missing (listed in {CHECKSUMS}); the checkpoint is incomplete")
        if sha256_file(file) != digest:
            raise FormatError(f"{file} is damaged: its SHA-256 differs from the one in {CHECKSUMS}")


def latest_intact_checkpoint(root: str | Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` whose files match their checksums.

    Each damaged newer checkpoint is skipped with a message (to ``report``, default a
    warning) naming the damaged file and the checkpoint used instead."""
    report = report or (lambda message: warnings.warn(message, stacklevel=3))
    found = _step_dirs(Path(root))
    for index in range(len(found) - 1, -1, -1):
        try:
            verify_checkpoint(found[index])
        except FormatError as exc:
            fallback = next((p.name for p in reversed(found[:index])), None)
            report(
                f"slimkit: skipping damaged checkpoint {found[index].name}: {exc}. "
                + (f"Trying {fallback}." if fallback else "No older checkpoint is left.")
            )
            continue
        return found[index]
    return None


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root``; every process calls it (rank 0 writes the shared
    files, each rank its RNG state). ``barrier`` synchronises processes (e.g.
    ``accelerator.wait_for_everyone``). Keeps the newest ``keep`` checkpoints."""
    root = Path(root)
    barrier = barrier or (lambda: None)
    final = root / f"step-{step:06d}"
    staging = root / f".step-{step:06d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".step-*.partial"):  # from a save that was killed or ran out of disk
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
    barrier()
    from .distributed import is_sharded

    sharded = _sharded_to_files(model, optimizer) if is_sharded(model) else None  # every process gathers
    try:
        save_file({"torch": torch.get_rng_state()}, str(staging / f"rng-{rank}.safetensors"))
        if rank == 0:
            if sharded is not None:
                weights, tensors, meta = sharded
                save_file(weights, str(staging / "model.safetensors"))
            else:
                save_model(model, str(staging / "model.safetensors"))
                tensors, meta = _optimizer_to_files(optimizer)
            save_file(tensors, str(staging / "optimizer.safetensors"))
            (staging / "optimizer.json").write_text(json.dumps(meta))
            (staging / "state.json").write_text(json.dumps({**loop_state, "step": step, "world_size": world_size}))
    except BaseException:
        if rank == 0:  # free the space the partial files hold; earlier checkpoints are untouched
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        checksums = {}
        for file in sorted(staging.iterdir()):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            ordinary_permissions(file)
            checksums[file.name] = sha256_file(file)
        (staging / CHECKSUMS).write_text(json.dumps({"format": 1, "files": checksums}, indent=1))
        ordinary_permissions(staging / CHECKSUMS)
        ordinary_permissions(staging, directory=True)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
            os.replace(final, old / final.name)
            shutil.rmtree(old)
        os.replace(staging, final)
        complete = _step_dirs(root)  # by step number: step-1000000 is newer than step-999000
        for stale in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int = 0,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state; returns the loop state.

    With ``verify`` (default) every file is checked against ``checksums.json`` first; a
    damaged or missing file is a ``FormatError`` that names it."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    for name in _REQUIRED:
        if not (path / name).is_file():
            raise FormatError(f"{path / name} is missing; {path} is not a complete slimkit checkpoint")
    state = _read_json(path / "state.json")
    rng = path / f"rng-{rank}.safetensors"
    if not rng.is_file():
        raise FormatError(
            f"{rng} is missing: the checkpoint was written by {state.get('world_size', '?')} process(es) and this "
            f"is process {rank}. Resume with the same number of processes."
        )
    from .distributed import is_sharded

    if is_sharded(model):  # FSDP2: full files, each process keeps its shards
        _sharded_from_files(model, optimizer, path)
        torch.set_rng_state(_read_tensors(rng)["torch"])
        return state
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise FormatError(f"{path / 'model.safetensors'} cannot be read ({exc})") from None
    if missing or unexpected:
        raise FormatError(
            f"{path / 'model.safetensors'} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if optimizer is not None:
        meta = _read_json(path / "optimizer.json")
        if meta.get("layout") == "full":
            raise FormatError(
                f"{path / 'optimizer.json'} holds the optimizer state of an FSDP2 run (keyed by parameter "
                "name); resume it with the model sharded by fully_shard, or pass optimizer=None to start a "
                "new optimizer from model.safetensors"
            )
        tensors = _read_tensors(path / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{path / 'optimizer.json'} does not fit the optimizer ({exc})") from None
    torch.set_rng_state(_read_tensors(rng)["torch"])
    return state


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise FormatError(f"{file} is missing; the checkpoint is incomplete") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is damaged (not valid JSON: {exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{file} is damaged (not a JSON object)")
    return value


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise FormatError(f"{file} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{file} is damaged (not a readable safetensors file: {exc})") from None
