"""Training checkpoints without pickle: model, optimizer and RNG state as safetensors + JSON.

A checkpoint is a folder ``step-000123`` holding

* ``model.safetensors``: the model's whole ``state_dict`` (slimkit's state included: step,
  projectors, pruning masks and statistics, observer ranges);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and its param groups
  and scalar state;
* ``rng-<rank>.safetensors``: each process's torch RNG state;
* ``state.json``: the loop's own state (step, epoch, batch, loss curve, ...).

It is written under a temporary name and renamed into place when complete, so a run that is
killed or runs out of disk never leaves a half checkpoint under a ``step-*`` name, and
earlier checkpoints are only deleted after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .errors import FormatError

_STEP_DIR = re.compile(r"step-(\d+)\Z")


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


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step-*`` folder under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


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
    try:
        save_file({"torch": torch.get_rng_state()}, str(staging / f"rng-{rank}.safetensors"))
        if rank == 0:
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
        for file in staging.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving the same step: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
            os.replace(final, old / final.name)
            shutil.rmtree(old)
        os.replace(staging, final)
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for stale in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, rank: int = 0
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state; returns the loop state."""
    path = Path(path)
    for name in ("model.safetensors", "state.json"):
        if not (path / name).is_file():
            raise FormatError(f"{path / name} is missing; {path} is not a complete slimkit checkpoint")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise FormatError(
            f"{path / 'model.safetensors'} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta))
    rng = path / f"rng-{rank}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return json.loads((path / "state.json").read_text())
