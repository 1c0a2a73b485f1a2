"""A speed-up target met by the INT8 model that ships: ``prune.target: {speedup: s, int8: true}``.

For the real all-MiniLM-L6-v2 (``stdlib-docs`` sentences), timm resnet50 and
mobilenetv3_large_100 (random weights, smooth images), at each batch and target it runs, with
no training (``slimkit.calibrate`` only):

* **slimkit**: ``prune.target: {speedup: s, batch: b, threads: 2, int8: true}`` with activation
  importance and reconstruction, and a ``quant`` section (static PTQ on the same calibration
  batches; eager kernels, or compiled with ``--compile``), converted: the INT8 model ``convert``
  returns, timed against the dense FP32 model (interleaved, independently of the solver's own
  check): is it within +-10% of s?
* **uniform + INT8**: every layer pruned at the one ratio whose INT8 model reaches the speed
  slimkit's reached (a few ratios timed, interpolated), same importance, reconstruction and quant;
* **Torch-Pruning + INT8**: Torch-Pruning 1.6's own pruner (its activation importance, widths
  rounded to 8, no refit: it has none) at the ratio whose INT8 model reaches the speed slimkit's
  reached, then the same quant section (Torch-Pruning has no INT8 path of its own);
* **INT8 alone**: the dense model with the same quant section (the speed INT8 gives by itself);
* **onnxruntime** ``quantize_dynamic`` of the dense model (and ``quantize_static`` for the CNNs):
  the zero-effort baseline.

Quality is measured on held-out batches against the dense FP32 model (MiniLM: embedding cosine and
the Spearman correlation of pairwise similarities; the CNNs: output cosine). Writes
benchmarks/results/targets_int8.json. Needs a quiet machine.

    python benchmarks/targets_int8.py [--models minilm resnet50] [--batches 32] [--speedups 3 4] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

import slimkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from targets import (  # noqa: E402
    RESULTS,
    example,
    model_and_data,
    ort_int8,
    outputs,
    quality_of,
    quality_text,
    ratio_at_speed,
    size_mb,
    speedups,
    torch_pruning_row,
    uniform_section,
)

QUANT = {
    "minilm": {"mode": "ptq"},  # no convolutions: compile 'auto' runs it eagerly
    "resnet50": {"mode": "ptq", "compile": "never"},  # eager oneDNN kernels (no torch.compile per copy)
    # its eager INT8 kernels run below FP32 (each activation site a float pass): every copy is
    # timed as the onnxruntime session of its QDQ export, the path `auto` keeps for it
    "mobilenetv3_large_100": {"mode": "ptq", "compile": "onnxruntime"},
}
GRID = (0.2, 0.4, 0.6, 0.8)


def int8_model(dense: nn.Module, prune: dict | None, quant: dict, data: dict) -> tuple[nn.Module, dict]:
    """``dense`` pruned by ``prune`` (if given) and quantized by ``quant``, calibrated, converted."""
    model = copy.deepcopy(dense)
    recipe = {"quant": quant, **({"prune": prune} if prune else {})}
    slimkit.prepare(model, recipe, example_inputs=data["calibration"][0])
    slimkit.calibrate(model, data["calibration"])
    summary = slimkit.prune.summary(model) if prune else {}
    return slimkit.convert_(model).eval(), summary


def point(model: nn.Module, dense: nn.Module, data: dict, inputs, rounds: int, reference, text: bool) -> dict:
    both = speedups(dense, model, inputs, rounds)
    return {
        "measured_speedup": round(both["median"], 3),
        "measured_speedup_min_rounds": round(both["min"], 3),
        **quality_of(outputs(model, data, text), reference, text),
    }


def run_model(name: str, args) -> dict:
    text, dense, data, heads = model_and_data(name, args)
    quant = {**QUANT[name], **({"compile": "always"} if args.compile else {})}
    reference = outputs(dense, data, text)
    out: dict = {"quant": quant}
    for batch in args.batches:
        inputs = example(data, batch)
        rounds = args.rounds if batch == 1 else max(3, args.rounds // 4)
        entry: dict = {"dense_size_mb": size_mb(dense)}
        entry["ort_dynamic"] = ort_int8(dense, dense, data, inputs, text, rounds, reference)
        if not text:
            entry["ort_static"] = ort_int8(dense, dense, data, inputs, text, rounds, reference, static=True)
        alone, _ = int8_model(dense, None, quant, data)
        entry["int8_alone"] = point(alone, dense, data, inputs, rounds, reference, text)
        del alone
        entry["targets"] = []
        for goal in args.speedups:
            target = {"speedup": goal, "batch": batch, "threads": common.THREADS, "int8": True}
            target["cache"] = str(args.cache)
            section = {"target": target, "importance": "activation", "reconstruct": True}
            if args.layers:  # whole blocks may go too (the solver chooses how many)
                section["layers"] = args.layers
            start = time.perf_counter()
            try:
                model, summary = int8_model(dense, section, quant, data)
            except slimkit.SlimkitError as exc:
                entry["targets"].append({"target": goal, "refused": str(exc)})
                print(f"{name} batch {batch} {goal}x INT8: refused: {exc}")
                continue
            solver = summary["target"]
            row = {"target": goal, "seconds": round(time.perf_counter() - start, 1)}
            row["slimkit"] = point(model, dense, data, inputs, rounds, reference, text)
            measured = row["slimkit"]["measured_speedup"]
            row["slimkit"].update(
                within_10pct=abs(measured / goal - 1) <= 0.10,
                solver_measured=round(solver["measured"], 3),
                solver_int8_dense=round(solver["int8_dense"], 3),
                solver_rounds=solver["rounds"],
                picked=solver["picked"],
                widths=solver["widths"],
                layers_removed=solver["layers"],
                depth_options=solver["depth"],
            )
            del model

            def build(ratio: float) -> nn.Module:
                return int8_model(dense, uniform_section(ratio, heads), quant, data)[0]

            ratio, grid = ratio_at_speed(build, dense, inputs, measured, rounds, GRID)
            same = uniform_section(ratio, heads, importance="activation", reconstruct=True)
            uniform, _ = int8_model(dense, same, quant, data)
            row["uniform_int8"] = {"ratio": ratio, "grid_speedups": grid}
            row["uniform_int8"].update(point(uniform, dense, data, inputs, rounds, reference, text))
            del uniform
            key = "spearman" if text else "cosine"
            row["quality_minus_uniform"] = round(row["slimkit"][key] - row["uniform_int8"][key], 5)
            if args.torch_pruning:
                row["torch_pruning_int8"] = torch_pruning_row(
                    name, dense, data, inputs, measured, rounds, GRID, reference,
                    finish=lambda m: int8_model(m, None, quant, data)[0],
                )  # fmt: skip
                if key in row["torch_pruning_int8"]:
                    theirs = row["torch_pruning_int8"][key]
                    row["quality_minus_torch_pruning"] = round(row["slimkit"][key] - theirs, 5)
            entry["targets"].append(row)
            s, u = row["slimkit"], row["uniform_int8"]
            print(
                f"{name:>10} b{batch:<3} INT8 target {goal:.1f}x: measured {s['measured_speedup']:.2f}x "
                f"(solver {s['solver_measured']:.2f}x) {quality_text(s, text)}"
                f" | uniform+INT8 r={ratio:.2f} {u['measured_speedup']:.2f}x {quality_text(u, text)}"
            )
            t = row.get("torch_pruning_int8", {})
            if "measured_speedup" in t:
                speed = f"r={t['ratio']:.2f} {t['measured_speedup']:.2f}x"
                print(f"{'':>10} Torch-Pruning+INT8 {speed} {quality_text(t, text)}")
        for key in ("int8_alone", "ort_dynamic", "ort_static"):
            if key in entry:
                o = entry[key]
                speed = o.get("measured_speedup", o.get("speedup"))
                print(f"{name:>10} b{batch:<3} {key}: {speed:.2f}x cosine {o['cosine']:.4f}")
        out[f"batch{batch}"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "resnet50"], choices=list(QUANT))
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--speedups", nargs="+", type=float, default=[3.0, 4.0])
    parser.add_argument("--size", type=int, default=224, help="image size of the CNNs")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds at batch 1 (a quarter at larger batches)")
    parser.add_argument(
        "--compile", action="store_true", help="quant.compile: always (every INT8 copy compiled, as it then ships)"
    )
    parser.add_argument(
        "--no-torch-pruning", dest="torch_pruning", action="store_false", help="skip the Torch-Pruning + INT8 rows"
    )
    parser.add_argument(
        "--layers", type=float, default=0, help="prune.layers of the target: the most blocks it may remove (0: none)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few batches and rounds")
    parser.add_argument("--output", type=Path, default=RESULTS / "targets_int8.json")
    args = parser.parse_args()
    args.cache = Path(tempfile.mkdtemp(prefix="slimkit-latency-"))
    if args.quick:
        args.size, args.rounds = 64, 5
    common.setup_machine()
    report = {"machine": common.machine_info(), "quick": args.quick, "models": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report["models"][name] = run_model(name, args)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
