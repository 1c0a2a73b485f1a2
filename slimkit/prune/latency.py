"""Latency on this machine: per-layer tables at candidate widths, cached per machine, and A/B
timing of whole models.

A :class:`LayerShape` is what the time of one conv / linear layer depends on (its kind, kernel,
stride, groups, the shape of its input at the target's batch size). :class:`LatencyTable` times
it at given input / output widths with random weights, and keeps every figure in a JSON file
named after the machine key (CPU model, core count, torch threads, torch version, batch): a
later run on the same machine with the same threads reuses the figures, another machine or
thread count gets a file of its own. ``measured`` / ``reused`` count what a table did.

Whole models are timed interleaved (:func:`interleaved_ms`): every round runs each model once,
the order reversed every other round, so drift and other processes hit them alike; like the
layer figures, the fastest round counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..adapters import call_model
from ..report import round_robin_ms, warm_up

logger = logging.getLogger("slimkit")

_FORMAT = 1
_RUNS = 5  # timed runs per figure; the fastest counts (other processes only ever add time)
_MIN_RUN_S = 0.002  # each run repeats the call until it lasts about this long


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_key(threads: int, batch: int) -> dict[str, Any]:
    """What a latency figure is valid for: a figure measured under another key is not reused."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": int(threads),
        "torch": torch.__version__,
        "batch": int(batch),
    }


def cache_folder(folder: str | Path | None = None) -> Path:
    """``folder``, else ``$SLIMKIT_CACHE/latency``, else ``~/.cache/slimkit/latency``."""
    if folder is not None:
        return Path(folder).expanduser()
    root = os.environ.get("SLIMKIT_CACHE")
    return Path(root).expanduser() / "latency" if root else Path.home() / ".cache" / "slimkit" / "latency"


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: as they are)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class LayerShape:
    """One conv / linear layer as its latency sees it (widths apart)."""

    kind: str  # "linear", "conv1d" or "conv2d"
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]  # at the target batch; the feature / channel dim at `feature_dim`
    feature_dim: int  # -1 for linear, 1 for convs
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @property
    def depthwise(self) -> bool:
        return self.kind != "linear" and self.groups > 1 and self.groups == self.in_features

    def sized(self, in_features: int, out_features: int) -> tuple[int, int, int]:
        """Valid (in, out, groups) near the asked widths: a depthwise conv keeps in == out ==
        groups, a grouped conv keeps its groups (widths rounded down to multiples of them)."""
        in_features, out_features = max(int(in_features), 1), max(int(out_features), 1)
        if self.depthwise:
            width = min(in_features, out_features) if in_features != self.in_features else out_features
            return width, width, width
        g = self.groups
        return max(g, in_features // g * g), max(g, out_features // g * g), g

    def key(self, in_features: int, out_features: int) -> str:
        in_features, out_features, groups = self.sized(in_features, out_features)
        fields = asdict(self)
        fields.update(in_features=in_features, out_features=out_features, groups=groups)
        return json.dumps(fields, sort_keys=True, default=list)


@torch.inference_mode()
def time_layer(shape: LayerShape, in_features: int, out_features: int) -> float:
    """Milliseconds of one call of the layer at these widths, random weights (fastest of runs)."""
    n_in, n_out, groups = shape.sized(in_features, out_features)
    size = list(shape.input_shape)
    size[shape.feature_dim] = n_in
    x = torch.randn(size)
    bias = torch.randn(n_out) if shape.bias else None
    if shape.kind == "linear":
        weight = torch.randn(n_out, n_in)

        def call():
            return F.linear(x, weight, bias)
    else:
        weight = torch.randn(n_out, n_in // groups, *shape.kernel)
        conv = F.conv2d if shape.kind == "conv2d" else F.conv1d

        def call():
            return conv(x, weight, bias, shape.stride, shape.padding, shape.dilation, groups)

    call()  # warm-up: kernel selection, allocator
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    repeats = max(1, min(200, int(_MIN_RUN_S / once)))
    best = float("inf")
    for _ in range(_RUNS):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


class LatencyTable:
    """Layer latencies (ms) of one machine key, read from and written to its cache file."""

    def __init__(self, machine: dict[str, Any], folder: str | Path | None = None) -> None:
        self.machine = dict(machine)
        digest = hashlib.sha1(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_folder(folder) / f"latency-{digest}.json"
        self.entries: dict[str, float] = {}
        self.measured = 0  # figures timed by this table
        self.reused = 0  # figures taken from the cache file
        self._dirty = False
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if data.get("format") == _FORMAT and data.get("machine") == self.machine:
                self.entries = {str(k): float(v) for k, v in data.get("entries", {}).items()}

    def ms(self, shape: LayerShape, in_features: int, out_features: int) -> float:
        key = shape.key(in_features, out_features)
        if key in self.entries:
            self.reused += 1
            return self.entries[key]
        value = time_layer(shape, in_features, out_features)
        self.entries[key] = value
        self.measured += 1
        self._dirty = True
        return value

    def save(self) -> None:
        """Write the file (atomically: a reader never sees half of it); a failure only logs."""
        if not self._dirty:
            return
        data = {"format": _FORMAT, "machine": self.machine, "entries": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            logger.warning(
                "prune.target: could not write the latency cache %s (%s); it is measured again next time",
                self.path,
                exc,
            )


@torch.inference_mode()
def interleaved_ms(models: dict[str, torch.nn.Module], inputs: Any, budget_s: float = 2.0) -> dict[str, float]:
    """Forward time (ms) of each model, interleaved round by round (order alternating), for about
    ``budget_s`` seconds in all (at least 5 rounds): the fastest round, as for the layer tables
    (other processes only ever add time, so the least-disturbed round is the most comparable)."""
    warm_up(models, inputs)
    start = time.perf_counter()
    for model in models.values():
        call_model(model, inputs)
    per_round = max(time.perf_counter() - start, 1e-6)
    rounds = max(5, min(50, int(budget_s / per_round)))
    return {name: min(v) for name, v in round_robin_ms(models, inputs, rounds).items()}
