"""Which multi-process setups of ``transformers.Trainer`` / ``accelerate`` slimkit runs under.

* DDP (``accelerate launch --multi_gpu``, or ``torchrun`` with the Trainer): supported.
* FSDP2 (``fully_shard``): supported in the plain-loop API under ``torchrun`` on CPU and GPU
  (tests/test_fsdp.py). Through the Trainer's ``fsdp`` arguments or ``accelerate launch
  --use_fsdp --fsdp_version 2`` it needs an accelerator: accelerate turns FSDP on only on one
  (on CPU every process would silently train a whole, unsharded copy), so it is refused on CPU.
* FSDP1 (``FlatParameter``): refused; pruning masks and fake-quant need each parameter whole
  or as a DTensor shard, not flattened into one buffer with other parameters.
* DeepSpeed ZeRO: refused. ZeRO-3 partitions parameters (slimkit would see empty
  placeholders); ZeRO-1/2 keep fp32 master weights in the optimizer and copy them over the
  model's weights after every step, which undoes the pruning masks slimkit re-applies.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from slimkit.errors import IncompatibleError

DOCS = "docs/scale.md"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def has_accelerator() -> bool:
    """A CUDA / XPU / MPS / other accelerator torch can train on in this process."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()  # pragma: no cover - older torch


def check_setup(*, fsdp: bool, fsdp_version: int | None, deepspeed: bool, on_cpu: bool, where: str) -> None:
    """Raise an :class:`IncompatibleError` for a setup slimkit cannot train correctly."""
    if deepspeed:
        raise IncompatibleError(
            f"{where}: DeepSpeed is not supported by slimkit. ZeRO-3 partitions the parameters (slimkit would "
            "trace, mask and fake-quantize empty placeholders) and ZeRO-1/2 copy the optimizer's fp32 master "
            "weights over the model after every step, undoing the pruning masks. Use DDP (accelerate launch "
            f"--multi_gpu, or torchrun), or FSDP2 (fully_shard) for models that do not fit; see {DOCS}."
        )
    if not fsdp:
        return
    if fsdp_version is not None and fsdp_version < 2:
        raise IncompatibleError(
            f"{where}: FSDP version {fsdp_version} flattens parameters into shared buffers, which slimkit's masks "
            "and fake-quant cannot address. Use FSDP2: fsdp_config={'version': 2} in TrainingArguments, or "
            f"accelerate launch --use_fsdp --fsdp_version 2; see {DOCS}."
        )
    if on_cpu:
        raise IncompatibleError(
            f"{where}: FSDP through the Trainer / accelerate needs an accelerator (GPU): accelerate enables FSDP "
            "only on accelerators, so on CPU every process would train a whole, unsharded copy. On CPU, "
            "shard with torch's fully_shard in a plain training loop (slimkit.prepare, then fully_shard, "
            f"slimkit.compute_loss / slimkit.step) started by torchrun --nproc_per_node N; see {DOCS}. Or "
            "drop the fsdp arguments to train with DDP."
        )


def check_trainer_args(args: Any) -> None:
    """The checks of :func:`check_setup` for a ``transformers.TrainingArguments``."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    fsdp = bool(plugin_args) or bool(getattr(args, "fsdp", None)) or _env_true("ACCELERATE_USE_FSDP")
    version = None
    if plugin_args:
        version = int(plugin_args.get("fsdp_version", 2))
    elif os.environ.get("FSDP_VERSION"):
        version = int(os.environ["FSDP_VERSION"])
    deepspeed = (
        bool(getattr(args, "deepspeed", None))
        or getattr(args, "deepspeed_plugin", None) is not None
        or _env_true("ACCELERATE_USE_DEEPSPEED")
    )
    on_cpu = bool(getattr(args, "use_cpu", False)) or not has_accelerator()
    check_setup(fsdp=fsdp, fsdp_version=version, deepspeed=deepspeed, on_cpu=on_cpu, where="TrainingArguments")


def check_accelerator(accelerator: Any) -> None:
    """The checks of :func:`check_setup` for an ``accelerate.Accelerator`` (plain loops)."""
    state = accelerator.state
    # accelerate on CPU sets no FSDP plugin at all (reading it raises AttributeError)
    plugin = getattr(state, "fsdp_plugin", None) if "fsdp_plugin" in vars(state) else None
    fsdp = plugin is not None or _env_true("ACCELERATE_USE_FSDP")
    version = getattr(plugin, "fsdp_version", None)
    if version is None and os.environ.get("FSDP_VERSION"):
        version = int(os.environ["FSDP_VERSION"])
    deepspeed = bool(vars(state).get("deepspeed_plugins")) or _env_true("ACCELERATE_USE_DEEPSPEED")
    on_cpu = accelerator.device.type == "cpu"
    check_setup(fsdp=fsdp, fsdp_version=version, deepspeed=deepspeed, on_cpu=on_cpu, where="accelerate")
