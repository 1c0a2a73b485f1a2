"""Helpers for plain ``accelerate`` loops (what :mod:`slimkit.plugins.distill_run` uses).

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

import sys
import time
from collections.abc import Callable
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


def save_student(
    accelerator: Accelerator,
    model: nn.Module,
    path: str | Path,
    extra_files: Callable[[Path], Any] | None = None,
    *,
    report: dict[str, Any] | Callable[[nn.Module], dict[str, Any]] | None = None,
    files_from: str | Path | None = None,
) -> nn.Module:
    """Convert the (unwrapped) student on every process and save it from the main one.

    Every process converts, so that all of them hold the same final architecture; only the
    main process writes. ``report`` (measured values for the model card and ``config.json``)
    is a dict, or a function of the converted model run on the main process only (e.g. its
    held-out accuracy); ``files_from`` is a folder whose extra files (sentence-transformers'
    ``modules.json`` and pooling) are copied along (see ``slimkit.save_pretrained``).
    ``extra_files`` is a callable ``f(path)`` run on the main process after the save (e.g. a
    tokenizer's ``save_pretrained``). Returns the converted model.
    """
    accelerator.wait_for_everyone()
    small = slimkit.convert_(accelerator.unwrap_model(model))  # in place: no second copy of the model
    if accelerator.is_main_process:
        values = report(small) if callable(report) else report
        slimkit.save_pretrained(small, path, report=values, files_from=files_from)
        if extra_files is not None:
            extra_files(Path(path))
    accelerator.wait_for_everyone()
    return small


class LineProgress:
    """Progress for logs that are not a terminal: one plain line about every tenth of the run
    (and at least every ``interval`` seconds), instead of a tqdm bar redrawn on every step,
    which a log file keeps as thousands of lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", interval: float = 60.0, disable: bool = False):
        self.total, self.n, self.desc, self.interval, self.disable = total, initial, desc, interval, disable
        self.every = max(1, total // 10)
        self.started = self.last = time.perf_counter()
        self.start_n = initial
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n % self.every == 0 or self.n == self.total or now - self.last > self.interval:
            self.last = now
            if not self.disable:
                rate = (now - self.started) / max(1, self.n - self.start_n)
                extra = f", {self.postfix}" if self.postfix else ""
                print(
                    f"{self.desc}: {self.n}/{self.total} steps, {rate:.2f} s/step{extra}", file=sys.stderr, flush=True
                )

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False) -> Any:
    """A tqdm bar on a terminal, :class:`LineProgress` in a log file or pipe."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=disable)
    return LineProgress(total, initial, desc, disable=disable)
