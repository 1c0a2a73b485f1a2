"""Model cards and summaries of what a model or folder holds."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from .adapters import call_model
from .folder_checks import architecture_of, library_of
from .modules import SLIMKIT_ATTR


def count_parameters(model: nn.Module) -> int:
    """Weights of the model itself (not what slimkit attached), tied weights counted once.

    INT8 layers keep their weights and biases as buffers, which count too."""
    seen, total = set(), 0
    tensors = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("weight", "bias")]
    for name, t in tensors:
        if name.startswith(SLIMKIT_ATTR + ".") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel()
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


def _fmt_ms(ms: float) -> str:
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


_ROWS = (
    ("parameters", "parameters", _fmt_count),
    ("macs", "MACs per forward", _fmt_count),
    ("size_bytes", "weights", _fmt_bytes),
    ("latency_ms", "CPU latency", _fmt_ms),
)


def _change(before: float, after: float, key: str) -> str:
    if not after:
        return "removed"
    factor = before / after
    better, worse = ("faster", "slower") if key == "latency_ms" else ("smaller", "larger")
    return f"{factor:.2f}x {better}" if factor >= 1 else f"{1 / factor:.2f}x {worse}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NATIVE = {
    "transformers": "transformers' AutoModel...from_pretrained",
    "timm": "timm.create_model('local-dir:...')",
}


def loads_natively(library: str, block: dict[str, Any]) -> bool:
    """Whether the base library's own loader reads the folder (recorded at save; inferred for
    folders saved before slimkit recorded it)."""
    native = block.get("native_load")
    if isinstance(native, bool):
        return native
    pruning = block.get("pruning") or {}
    uniform = library == "transformers" and bool(pruning.get("config"))
    return not block.get("quantization") and (not pruning or uniform)


def why_slimkit_only(library: str, block: dict[str, Any]) -> str:
    reasons = []
    if block.get("pruning"):
        reasons.append("its pruned layer widths")
    if block.get("quantization"):
        reasons.append("its INT8 layers")
    why = " and ".join(reasons) or "its architecture"
    call = _NATIVE.get(library, "its library's loader")
    return f"{why} cannot be expressed in the {library} config, so {call} fails on this folder (size mismatch)"


def load_instructions(library: str, block: dict[str, Any]) -> str | None:
    """How to load a slimkit folder, said first by the model card and ``slimkit info``: a folder
    whose architecture its base library's config cannot express loads only with slimkit."""
    if not block:
        return None
    if loads_natively(library, block):
        return f"slimkit.from_pretrained(folder), or {_NATIVE.get(library, 'its library loader')}"
    return f"slimkit.from_pretrained(folder) only: {why_slimkit_only(library, block)}"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a report block: before -> after (x), method results, metrics."""
    rows = []
    if not isinstance(report, dict):
        return rows
    before, after = report.get("before") or {}, report.get("after") or {}
    before = before if isinstance(before, dict) else {}
    after = after if isinstance(after, dict) else {}
    for key, label, fmt in _ROWS:
        if _number(after.get(key)):
            if key == "latency_ms" and isinstance(report.get("latency"), dict):
                lat = report["latency"]
                label = f"{label} (batch {lat.get('batch')}, {lat.get('threads')} threads, {lat.get('device')})"
            if _number(before.get(key)) and before[key]:
                rows.append(
                    (label, f"{fmt(before[key])} -> {fmt(after[key])} ({_change(before[key], after[key], key)})")
                )
            else:
                rows.append((label, fmt(after[key])))
    methods, metrics = report.get("methods") or {}, report.get("metrics") or {}
    rows += [(str(k), str(v)[:200]) for k, v in (methods.items() if isinstance(methods, dict) else ())]
    for k, v in metrics.items() if isinstance(metrics, dict) else ():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    return rows


def _paths_that_ran(model: nn.Module) -> str:
    """What the INT8 runtime did on the input shapes seen before saving ("" if none): the path
    and, where it ran eagerly, why (slimkit.quant.runtime_report)."""
    from .quant.runtime import runtime_report

    signatures = (runtime_report(model) or {}).get("signatures", [])
    if not signatures:
        return ""
    ran = "; ".join(
        s["path"] + (f" ({s['reason'][:120].replace('|', '/')})" if s.get("reason") else "") for s in signatures
    )
    return f"; ran on {len(signatures)} input shape(s) before saving: {ran}"


def model_card(model: nn.Module, config: dict[str, Any]) -> str:
    """README.md for a saved folder: base model, recipe, before -> after, metrics."""
    block = config.get("slimkit", {})
    base = architecture_of(config) or type(model).__name__
    report = block.get("report") or {}
    if not report.get("after"):
        report = {**report, "after": summary(model)}
    library = library_of(config, "config.json")
    lines = [f"# {base} (slimkit)", ""]
    if not loads_natively(library, block):
        lines += [
            f"**Load this folder with `slimkit.from_pretrained(folder)`**: {why_slimkit_only(library, block)}.",
            "",
        ]
    lines += [
        f"Saved by slimkit {block.get('version', '')} from a `{library}` "
        f"`{block.get('class', type(model).__name__)}`"
        + (f", made with the recipe below ({', '.join(block['recipe'])})." if block.get("recipe") else "."),
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {label} | {value} |" for label, value in report_rows(report)]
    if block.get("quantization"):
        quant = block["quantization"]
        kinds: dict[str, int] = {}
        for entry in quant.get("layers", {}).values():
            key = f"{entry.get('kind')} ({entry.get('activations')})"
            kinds[key] = kinds.get(key, 0) + 1
        listed = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        lines.append(
            f"| int8 layers | {listed}: real int8 kernels (names in the `quantization` block of config.json) |"
        )
        path = {
            "auto": "compiled or onnxruntime, whichever the first inference call of each input shape measures faster"
            if any(e.get("kind") == "conv2d" for e in quant.get("layers", {}).values())
            else "eager oneDNN kernels",
            "always": "compiled on first inference call",
            "never": "eager oneDNN kernels",
            "onnxruntime": "onnxruntime session of slimkit's QDQ export, built on first inference call",
        }
        lines.append(
            f"| int8 path | {path.get(quant.get('compile', 'never'), 'eager oneDNN kernels')} "
            f"(quant.compile: {quant.get('compile', 'never')}){_paths_that_ran(model)} |"
        )
    if report.get("kept", {}).get("channels") or report.get("kept", {}).get("heads"):
        lines += ["", "Channels and heads kept per layer:", "", "![kept per layer](kept.png)"]
    lines += [
        "",
        "Load it with:",
        "",
        "```python",
        "import slimkit",
        'model = slimkit.from_pretrained("<this folder>")'
        if library != "torch"
        else f'model = slimkit.from_pretrained("<this folder>", model={block.get("class", "MyNet")}(...))',
        "```",
        *_sentence_transformers_lines(block),
        "",
        "`slimkit info <this folder>` prints the same table.",
    ]
    if "recipe" in block:
        lines += ["", "## Recipe", "", "```json", json.dumps(block["recipe"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _sentence_transformers_lines(block: dict[str, Any]) -> list[str]:
    if not block.get("sentence_transformers"):
        return []
    return [
        "",
        "As a sentence-transformers model (pooling and normalisation as the original):",
        "",
        "```python",
        "from slimkit.plugins.sentence_transformers import load_sentence_transformer",
        'model = load_sentence_transformer("<this folder>")  # a SentenceTransformer',
        "```",
    ]


def measure(model: nn.Module, example_inputs: Any, *, macs: int | None = None, latency: bool = True) -> dict[str, Any]:
    """Parameters, MACs, stored bytes and latency of ``model`` on ``example_inputs``."""
    was_training = model.training
    model.eval()
    try:
        out = {
            "parameters": count_parameters(model),
            "macs": count_macs(model, example_inputs) if macs is None else macs,
            "size_bytes": tensor_bytes(model),
        }
        if latency:
            out["latency_ms"] = round(measure_latency(model, example_inputs), 4)
    finally:
        model.train(was_training)
    return out


def latency_setting(example_inputs: Any) -> dict[str, Any]:
    first = example_inputs
    if isinstance(first, dict):
        first = next(iter(first.values()))
    elif isinstance(first, (tuple, list)):
        first = first[0]
    return {"batch": int(first.shape[0]), "threads": torch.get_num_threads(), "device": str(first.device)}


def layer_widths(model: nn.Module, transposed: dict | None = None) -> dict[str, int]:
    """Output width of every conv / linear layer (GPT-2's Conv1D stores [in, out])."""
    from .modules import user_named_modules

    transposed = transposed or {}
    widths = {}
    for name, module in user_named_modules(model):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            widths[name] = int(weight.shape[0])
        elif type(module) in transposed:
            widths[name] = int(weight.shape[1])
    return widths


def kept_layers(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    """Layers whose width changed: name -> [before, after]."""
    return {k: [before[k], after[k]] for k in before if k in after and after[k] != before[k]}


def plot_kept(kept: dict[str, dict[str, list[int]]], path) -> bool:
    """A PNG of the channels and heads kept per layer; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = [(title, kept.get(key) or {}) for key, title in (("channels", "channels / neurons"), ("heads", "heads"))]
    parts = [(title, data) for title, data in parts if data]
    if not parts:
        return False
    fig, axes = plt.subplots(len(parts), 1, figsize=(max(6, 0.25 * max(len(d) for _, d in parts)), 3.2 * len(parts)))
    axes = [axes] if len(parts) == 1 else list(axes)
    for ax, (title, data) in zip(axes, parts):
        names = list(data)
        before = [data[n][0] for n in names]
        after = [data[n][1] for n in names]
        xs = range(len(names))
        ax.bar(xs, before, color="#d0d7de", label="before")
        ax.bar(xs, after, color="#1f6feb", label="kept")
        ax.set_title(f"{title} kept per layer")
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@torch.no_grad()
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (torch's FLOP counter / 2).

    Only ops the counter knows are counted (matmuls, convolutions, attention); INT8 kernels are
    not, so count MACs on the float architecture."""
    from torch.utils.flop_counter import FlopCounterMode

    from .adapters import call_model

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_inputs)
    except AssertionError:
        # torch's module tracker cannot hook a parameter passed as a module's input under no_grad
        # (DeBERTa-v2 feeds its relative embedding table to its position projections)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_inputs)
    return counter.get_total_flops() // 2


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of one forward in milliseconds (inference mode)."""
    from .adapters import call_model

    # A converted INT8 model compiles itself on its first inference call (slimkit.quant.runtime);
    # the card measures its eager kernels so that convert and save stay quick.
    runtime = model.__dict__.get("forward")
    eager = getattr(runtime, "eager", None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call_model(model if eager is None else eager, example_inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def warm_up(models: dict[str, nn.Module], inputs: Any) -> None:
    """Eval mode and one call each (oneDNN primitives, the allocator) before anything is timed."""
    for model in models.values():
        model.eval()
        call_model(model, inputs)


@torch.inference_mode()  # inference, as served: an INT8 model runs its compiled / onnxruntime path only there
def round_robin_ms(models: dict[str, nn.Module], inputs: Any, rounds: int) -> dict[str, list[float]]:
    """Each model's forward time (ms) in each of ``rounds`` rounds, one call per model per round,
    the order reversed every other round, so that drift (another process, CPU clocks) hits all
    of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds):
        for name in list(models) if i % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            call_model(models[name], inputs)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_latencies(models: dict[str, nn.Module], inputs: Any, rounds: int = 15) -> dict[str, float]:
    """Median forward time (ms) of each model on ``inputs`` (a tensor or a dict of kwargs),
    timed interleaved (:func:`round_robin_ms`) after one warm-up call each."""
    warm_up(models, inputs)
    return {name: statistics.median(v) for name, v in round_robin_ms(models, inputs, rounds).items()}
