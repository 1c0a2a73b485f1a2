"""Model cards and summaries of what a model or folder holds."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .modules import SLIMKIT_ATTR


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model itself (not what slimkit attached), tied weights counted once."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if name.startswith(SLIMKIT_ATTR + "."):
            continue
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors save_pretrained writes."""
    from .hub import student_state_dict

    return sum(t.numel() * t.element_size() for t in student_state_dict(model).values())


def summary(model: nn.Module) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        "parameters": count_parameters(model),
        "size_bytes": tensor_bytes(model),
    }


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def model_card(model: nn.Module, config: dict[str, Any]) -> str:
    """README.md for a saved folder: base model, recipe and sizes."""
    block = config.get("slimkit", {})
    base = config.get("architecture") or (config.get("architectures") or [type(model).__name__])[0]
    stats = summary(model)
    lines = [
        f"# {base} (slimkit)",
        "",
        f"Saved by slimkit {block.get('version', '')} from a `{block.get('library', '?')}` "
        f"`{block.get('class', type(model).__name__)}`.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {_fmt_count(stats['parameters'])} |",
        f"| weights | {_fmt_bytes(stats['size_bytes'])} |",
    ]
    extra = getattr(model, "_slimkit_report", None) or {}
    for key, value in extra.items():
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "Load it with:",
        "",
        "```python",
        "import slimkit",
        'model = slimkit.from_pretrained("<this folder>")',
        "```",
    ]
    if "recipe" in block:
        lines += ["", "## Recipe", "", "```json", json.dumps(block["recipe"], indent=2), "```"]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (torch's FLOP counter / 2).

    Only ops the counter knows are counted (matmuls, convolutions, attention); INT8 kernels are
    not, so count MACs on the float architecture."""
    from torch.utils.flop_counter import FlopCounterMode

    from .adapters import call_model

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call_model(model, example_inputs)
    return counter.get_total_flops() // 2


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of one forward in milliseconds (inference mode)."""
    import statistics
    import time

    from .adapters import call_model

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call_model(model, example_inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
