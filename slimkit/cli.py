"""The ``slimkit`` command line.

slimkit info DIR     what a hub-style folder holds: architecture, parameters, size,
                     what was pruned / quantized, the recipe
slimkit sensitivity DIR --dataset NAME
                     the quality drop of each layer pruned / INT8 alone (slimkit.sensitivity)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import SlimkitError
from .folder_checks import architecture_of, check_slimkit_block, library_of
from .hub import CONFIG_NAME, WEIGHTS_NAME, read_config
from .methods import hub_blocks
from .report import load_instructions
from .safe_build import read_header


def folder_info(path: str | Path) -> dict[str, Any]:
    """Facts about a folder read from its config and the safetensors header (no tensor is loaded).

    Every field is type-checked first, so a malformed folder is a ``FormatError`` naming the
    file and the field (as in ``from_pretrained``), never a traceback."""
    folder = Path(path)
    config = read_config(folder)
    file = folder / CONFIG_NAME
    library = library_of(config, file)
    block = check_slimkit_block(config["slimkit"], file) if "slimkit" in config else {}
    for method in hub_blocks():  # every registered method's block: type-checked before it is shown
        if method.name in block:
            method.call("validate", block[method.name])
    header = read_header(folder / WEIGHTS_NAME)
    params, dtypes = 0, Counter()
    for shape, dtype in header.values():
        n = math.prod(shape)
        dtypes[dtype] += n
        params += n
    architecture = architecture_of(config) or "?"
    return {
        "folder": str(folder),
        "architecture": architecture,
        "library": library,
        "class": block.get("class", architecture),
        "format_version": block.get("format_version"),
        "slimkit_version": block.get("version"),
        "tensors": dict(dtypes),
        "parameters": params,
        "file_bytes": header.file_bytes,
        "load_with": load_instructions(library, block),
        **{method.name: block.get(method.name) for method in hub_blocks()},  # pruning, quantization, ...
        "recipe": block.get("recipe"),
        "report": block.get("report"),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_info(info: dict[str, Any]) -> str:
    rows = [("load with", info["load_with"])] if info.get("load_with") else []
    rows += [
        ("folder", info["folder"]),
        ("architecture", f"{info['architecture']} ({info['library']} {info['class']})"),
        ("stored values", f"{_human(info['parameters'])} ({info['parameters']:,}: parameters and buffers)"),
        ("tensors", ", ".join(f"{k}: {_human(v)}" for k, v in sorted(info["tensors"].items()))),
        ("file size", _human(info["file_bytes"], "B")),
        ("slimkit format", str(info["format_version"] or "none (a plain folder)")),
    ]
    for method in hub_blocks():
        if isinstance(info.get(method.name), dict) and method.summary is not None:
            rows.append((method.name, method.call("summary", info[method.name])))
    if info.get("report"):
        from .report import report_rows

        rows += report_rows(info["report"])
    if info.get("recipe"):
        rows.append(("recipe", ", ".join(sorted(info["recipe"]))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a hub-style folder (slimkit, transformers or timm)")
    parser.add_argument("--dataset", help="digits | stdlib-docs | a local path (default: by input kind)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--batches", type=int, default=8, help="batches measured on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--metric", choices=("cosine", "loss"), default="cosine")
    parser.add_argument("--importance", default="l2", help="prune.importance used for each layer")
    parser.add_argument("--no-prune", action="store_true", help="only the INT8 scan")
    parser.add_argument("--no-quant", action="store_true", help="only the pruning scan")
    parser.add_argument("--output", type=Path, help="folder for sensitivity.json / .png (default: print only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimkit", description="slimkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help=f"describe a hub-style folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    info.add_argument("folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    scan = sub.add_parser("sensitivity", help="quality drop per layer when pruned or INT8 alone, on a data set")
    _sensitivity_arguments(scan)
    args = parser.parse_args(argv)
    if args.command == "sensitivity":
        from slimkit.plugins import sensitivity_cli  # data sets and tokenizers live in the plugins

        try:
            sensitivity_cli.run(args)
        except SlimkitError as exc:
            print(f"slimkit: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        facts = folder_info(args.folder)
    except SlimkitError as exc:
        print(f"slimkit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
