"""The ``slimkit`` command line.

slimkit info DIR     what a hub-style folder holds: architecture, parameters, size,
                     what was pruned / quantized, the recipe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import SlimkitError
from .hub import CONFIG_NAME, WEIGHTS_NAME, read_config


def folder_info(path: str | Path) -> dict[str, Any]:
    """Facts about a folder read from its config and the safetensors header (no tensor is loaded)."""
    folder = Path(path)
    config = read_config(folder)
    block = config.get("slimkit") or {}
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise SlimkitError(f"{weights} is missing")
    params, dtypes = 0, Counter()
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(key)
                n = math.prod(sl.get_shape())
                dtypes[sl.get_dtype()] += n
                params += n
    except Exception as exc:  # safetensors raises its own error types
        raise SlimkitError(f"{weights} is not a readable safetensors file ({exc})") from None
    architecture = config.get("architecture") or (config.get("architectures") or ["?"])[0]
    return {
        "folder": str(folder),
        "architecture": architecture,
        "library": block.get("library") or ("transformers" if "model_type" in config else "timm"),
        "class": block.get("class", architecture),
        "format_version": block.get("format_version"),
        "slimkit_version": block.get("version"),
        "tensors": dict(dtypes),
        "parameters": params,
        "file_bytes": weights.stat().st_size,
        "pruning": block.get("pruning"),
        "quantization": block.get("quantization"),
        "recipe": block.get("recipe"),
        "report": block.get("report"),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_info(info: dict[str, Any]) -> str:
    rows = [
        ("folder", info["folder"]),
        ("architecture", f"{info['architecture']} ({info['library']} {info['class']})"),
        ("stored values", f"{_human(info['parameters'])} ({info['parameters']:,}: parameters and buffers)"),
        ("tensors", ", ".join(f"{k}: {_human(v)}" for k, v in sorted(info["tensors"].items()))),
        ("file size", _human(info["file_bytes"], "B")),
        ("slimkit format", str(info["format_version"] or "none (a plain folder)")),
    ]
    pruning, quant = info.get("pruning"), info.get("quantization")
    if isinstance(pruning, dict):
        text = f"{len(pruning.get('tensors', {}))} tensors resized"
        if pruning.get("heads"):
            counts = sorted({tuple(v) if isinstance(v, list) else (v,) for v in pruning["heads"].values()})
            text += f", heads per layer (query, key/value) {', '.join(str(list(c)) for c in counts)}"
        for stack, entry in (pruning.get("layers") or {}).items():
            text += f", {stack}: {len(entry['kept'])} of {entry['total']} blocks kept"
        if pruning.get("config"):
            text += f", config rewritten: {', '.join(sorted(pruning['config']))}"
        rows.append(("pruning", text))
    if isinstance(quant, dict):
        text = f"{len(quant.get('layers', {}))} int8 layers ({quant.get('backend', '?')} kernels)"
        if quant.get("folded_batchnorms"):
            text += f", {len(quant['folded_batchnorms'])} BatchNorms folded"
        if quant.get("embeddings"):
            text += f", {len(quant['embeddings'])} int8 embeddings (weight-only)"
        rows.append(("quantization", text))
    if info.get("report"):
        from .report import report_rows

        rows += report_rows(info["report"])
    if info.get("recipe"):
        rows.append(("recipe", ", ".join(sorted(info["recipe"]))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimkit", description="slimkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help=f"describe a hub-style folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    info.add_argument("folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        facts = folder_info(args.folder)
    except SlimkitError as exc:
        print(f"slimkit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
