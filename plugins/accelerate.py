"""Helpers for plain ``accelerate`` loops (what ``scripts/distill.py`` uses).

The loop itself is slimkit's plain-loop API; accelerate only wraps and places things:

    from accelerate import Accelerator
    import slimkit
    from slimkit.plugins.accelerate import gather_mean, save_student

    accelerator = Accelerator()
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=x)   # before the optimizer
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)          # includes the projectors
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)  # not the teacher
    for x, y in loader:
        loss = slimkit.compute_loss(student, student(x), labels=y)
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()
        slimkit.step(student)                                              # schedules
        print(gather_mean(accelerator, loss))
    save_student(accelerator, student, "out/")                            # convert + save on rank 0

The teacher is deliberately not passed to ``accelerator.prepare``: it is frozen, so DDP has
nothing to synchronise; slimkit moves it to the student's device on first use. Checkpoints
written by ``accelerator.save_state`` hold slimkit's state (step, projectors, masks, observers)
because it lives in the student's ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

import slimkit


def gather_mean(accelerator: Accelerator, value: torch.Tensor | float) -> float:
    """The mean of a scalar over all processes."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).detach().reshape(1)
    return float(accelerator.gather(tensor).mean())


def gather_log_values(accelerator: Accelerator, model: nn.Module) -> dict[str, float]:
    """slimkit's averaged loss terms and method state, averaged over processes."""
    values = slimkit.log_values(model)
    return {k: gather_mean(accelerator, v) for k, v in sorted(values.items())}


def save_student(accelerator: Accelerator, model: nn.Module, path: str | Path, extra_files: Any = None) -> nn.Module:
    """Convert the (unwrapped) student on every process and save it from the main one.

    Every process converts, so that all of them hold the same final architecture; only the
    main process writes. ``extra_files`` is a callable ``f(path)`` run on the main process after
    the save (e.g. a tokenizer's ``save_pretrained``). Returns the converted model.
    """
    accelerator.wait_for_everyone()
    small = slimkit.convert(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        slimkit.save_pretrained(small, path)
        if extra_files is not None:
            extra_files(path)
    accelerator.wait_for_everyone()
    return small
