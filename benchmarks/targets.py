"""Compress to a speed-up target: does the measured speed-up land on the target, and at what quality?

For timm resnet50, mobilenetv3_large_100 and vit_small_patch16_224 (random weights from timm's
configs, BatchNorm statistics set on smooth random images) and the real all-MiniLM-L6-v2
(``stdlib-docs`` sentences, as ``prune_quality.py``), at batch 1 and batch 32 and speed-up targets
2x and 3x, it runs ``prune.target: {speedup: s, batch: b, threads: 2}`` with activation importance
and reconstruction (``slimkit.calibrate``, no training), then, in the same process:

* times the converted model against the dense one, interleaved A/B, independently of the
  solver's own check (ratio of medians, and of the fastest rounds, which the solver uses; on a
  quiet machine they agree); reports target vs measured and whether it is within +-10%;
* quality on held-out batches: output cosine to the dense model (MiniLM: embedding cosine and the
  Spearman correlation of pairwise similarities);
* uniform pruning (every layer the same ratio, the same importance and reconstruction) at the
  ratio that gives the speed-up the target reached (found by timing a few uniform ratios and
  interpolating), for the quality comparison at equal measured speed;
* Torch-Pruning 1.6 (the pruner a user would pick instead; it takes ratios, not a speed) at the
  ratio that gives the same measured speed-up, found the same way: activation importance on the
  calibration batches, no reconstruction (it has none), widths rounded to 8;
* onnxruntime ``quantize_dynamic`` of the dense model (and, for the vision models,
  ``quantize_static`` on the calibration batches): the zero-effort baselines, with the size of
  their INT8 files beside the FP32 size of each pruned model;
* the pruned model made INT8 (unless ``--no-int8``): by the baseline's own tool (``quantize_static``
  for the vision models, ``quantize_dynamic`` for MiniLM) and by slimkit (PTQ / dynamic, exported
  to QDQ ONNX, run by onnxruntime), timed against the dense FP32 model: does pruning add to INT8?

Writes benchmarks/results/targets.json and targets.png (quality vs measured speed-up).
Timings need a quiet machine (interleaving does not protect against contention); latency tables
go to a fresh folder each run unless ``--cache`` names one. A full run (4 models, 2 batches, 2
targets) takes over two hours on 2 cores, about 8 minutes a target at batch 1.

    python benchmarks/targets.py [--quick] [--models resnet50 minilm] [--batches 1 32] [--speedups 2 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import slimkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from prune_quality import embed, minilm_data, quality, torch_pruning_minilm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VISION = {
    "resnet50": {"heads": False},
    "mobilenetv3_large_100": {"heads": False},
    "vit_small_patch16_224": {"heads": True},
}
UNIFORM_GRID = (0.3, 0.5, 0.7, 0.85)


# ----------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------
def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random images whose neighbouring pixels correlate (as in real ones), plus some noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bilinear")
    return coarse + 0.1 * torch.randn(n, 3, size, size, generator=g)


def vision_model(name: str, size: int) -> nn.Module:
    import timm

    torch.manual_seed(0)
    extra = {"img_size": size} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **extra)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None  # statistics of the images below (random weights would explode otherwise)
    model.train()
    with torch.no_grad():
        for x in smooth_images(32, size, 1).split(8):
            model(x)
    return model.eval()


def vision_data(args) -> dict:
    n_cal, n_eval = (8, 8) if args.quick else (64, 64)
    return {
        "calibration": list(smooth_images(n_cal, args.size, 2).split(8)),
        "eval": list(smooth_images(n_eval, args.size, 3).split(8)),
    }


def text_data(args, tokenizer) -> dict:
    data = minilm_data(tokenizer, 64 if args.quick else 512)
    if args.quick:
        data["eval"] = data["eval"][:2]
    return data


# ----------------------------------------------------------------------------------------
# measures
# ----------------------------------------------------------------------------------------
def example(data: dict, batch: int):
    """The timing input: ``batch`` rows (tiled) of the first calibration batch."""
    from slimkit.prune.target import rebatched

    return rebatched(data["calibration"][0], batch)


def call(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@torch.no_grad()
def outputs(model: nn.Module, data: dict, text: bool) -> torch.Tensor:
    model.eval()
    if text:
        return embed(model, data["eval"])
    return torch.cat([model(x) for x in data["eval"]])


def quality_of(out: torch.Tensor, reference: torch.Tensor, text: bool) -> dict:
    if text:
        return quality(out, reference)
    return {"cosine": round(float(F.cosine_similarity(out.flatten(1), reference.flatten(1)).mean()), 5)}


def quality_text(q: dict, text: bool) -> str:
    """'cosine 0.9xxx' (and the Spearman for MiniLM) of one measured point, for the printout."""
    return f"cosine {q['cosine']:.4f}" + (f" spearman {q['spearman']:.4f}" if text else "")


def speedups(dense: nn.Module, model, inputs, rounds: int) -> dict[str, float]:
    """dense / candidate latency, interleaved (``model``: a module or a callable): the ratio of
    medians, and of the fastest rounds (what the solver itself compares). A round holds at least
    50 ms of calls: with one call a round, a pruned MiniLM's 3 ms forward at batch 1 shared its
    rounds with scheduler ticks, and the ratio of medians read 2.57x where the fastest rounds
    read 2.88x."""
    run = model if not isinstance(model, nn.Module) else (lambda: call(model, inputs))
    variants = {"dense": lambda: call(dense, inputs), "other": run}
    timing = common.interleaved(variants, rounds=rounds, iters=1, min_round_s=0.05)
    return {stat: timing["dense"][f"{stat}_s"] / timing["other"][f"{stat}_s"] for stat in ("median", "min")}


def speedup(dense: nn.Module, model, inputs, rounds: int) -> float:
    return speedups(dense, model, inputs, rounds)["median"]


def pruned(dense: nn.Module, section: dict, data: dict, example_inputs, calibrate: bool = True):
    model = copy.deepcopy(dense)
    slimkit.prepare(model, {"prune": section}, example_inputs=example_inputs)
    if calibrate:
        slimkit.calibrate(model, data["calibration"])
    summary = slimkit.prune.summary(model)
    return slimkit.convert_(model).eval(), summary


def uniform_section(ratio: float, heads: bool, **data_aware) -> dict:
    section = {"channels": ratio, "round_to": 8, **data_aware}
    if heads:
        section["heads"] = ratio
    return section


def ratio_at_speed(build, dense, inputs, speed: float, rounds: int, grid) -> tuple[float, list]:
    """The one ratio, applied to every layer, at which ``build(ratio)`` runs ``speed`` times faster
    than ``dense``: a grid, then up to two interpolated refinements, each point timed."""

    def timed(ratio: float) -> tuple[float, float]:
        return ratio, speedup(dense, build(ratio), inputs, rounds)

    def interpolate(points: list[tuple[float, float]]) -> float:
        points = sorted(points)
        for (r1, s1), (r2, s2) in zip(points, points[1:]):
            if min(s1, s2) <= speed <= max(s1, s2) and s2 != s1:
                return r1 + (r2 - r1) * (speed - s1) / (s2 - s1)
        return max(points, key=lambda p: p[1])[0] if speed > max(p[1] for p in points) else 0.01

    points = [(0.0, 1.0), *(timed(r) for r in grid)]
    ratio = min(max(round(interpolate(points), 3), 0.01), 0.9)
    for _ in range(2):
        point = timed(ratio)
        points.append(point)
        if abs(point[1] / speed - 1) <= 0.05:
            break
        ratio = min(max(round(interpolate(points), 3), 0.01), 0.9)
    return ratio, [[r, round(s, 3)] for r, s in sorted(points)]


def uniform_at(dense, data, inputs, heads: bool, speed: float, rounds: int, grid) -> dict:
    """Uniform pruning at the ratio that gives ``speed``: uniform widths do not depend on the
    scores, so the ratio is found with l2 (no calibration) and the model then built with the same
    importance and reconstruction as the target run."""

    def build(ratio: float) -> nn.Module:
        return pruned(dense, uniform_section(ratio, heads), data, data["calibration"][0], calibrate=False)[0]

    ratio, points = ratio_at_speed(build, dense, inputs, speed, rounds, grid)
    section = uniform_section(ratio, heads, importance="activation", reconstruct=True)
    model, _ = pruned(dense, section, data, data["calibration"][0])
    return {"ratio": ratio, "grid": points, "model": model}


def torch_pruning_vision(name: str, dense: nn.Module, data: dict, ratio: float) -> nn.Module:
    """Torch-Pruning's pruner as its examples run timm models: every layer the same ratio,
    activation importance on the calibration batches, widths rounded to 8, the classifier kept.
    CNNs: every coupled group, residual stream included (Torch-Pruning's default). ViT: heads
    and MLP neurons (the residual stream, patch embedding and position table kept whole, as
    slimkit prunes it; pruning them needs Torch-Pruning's unwrapped-parameter setup)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    ignored, heads, head_ratio = [model.get_classifier()], {}, 0.0
    vit = name.startswith("vit")
    if vit:
        ignored.append(model.patch_embed)
        for block in model.blocks:
            ignored += [block.attn.proj, block.mlp.fc2]
            heads[block.attn.qkv] = block.attn.num_heads
        # Torch-Pruning removes ceil(ratio * heads) heads; all of them would leave qkv whole and
        # num_heads at 0 (a reshape error): keep one
        n = model.blocks[0].attn.num_heads
        head_ratio = min(ratio, (n - 1.5) / n)
    imp = tp.importance.ActivationImportance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            data["calibration"][0][:1],
            imp,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=8,
            num_heads=heads,
            prune_num_heads=vit,
            prune_head_dims=False,
            head_pruning_ratio=head_ratio,
        )
        with imp.compute_importance(model), torch.no_grad():
            for batch in data["calibration"]:
                model(batch)
        pruner.step()
    if vit:  # timm's Attention reshapes by these attributes
        for block in model.blocks:
            block.attn.num_heads = pruner.num_heads[block.attn.qkv]
            block.attn.attn_dim = block.attn.qkv.out_features // 3
    return model.eval()


def onnx_point(path: Path, dense: nn.Module, data: dict, inputs, text: bool, rounds: int, reference) -> dict:
    """An onnxruntime session of ``path``: speed-up over the dense PyTorch model at this batch,
    quality against the dense model's held-out outputs, and the file's size."""
    session = common.ort_session(path)
    names = [i.name for i in session.get_inputs()]
    outs = []
    for batch in data["eval"]:
        feed = {k: v.numpy() for k, v in batch.items() if k in names} if text else {names[0]: batch.numpy()}
        result = torch.from_numpy(session.run(None, feed)[0])
        outs.append(common.mean_pool(result, batch["attention_mask"]) if text else result)
    speed = speedup(dense, common.ort_runner(session, inputs), inputs, rounds)
    size = path.stat().st_size / 2**20
    return {"speedup": round(speed, 3), "size_mb": round(size, 2), **quality_of(torch.cat(outs), reference, text)}


def ort_int8(model: nn.Module, dense: nn.Module, data: dict, inputs, text, rounds, reference, static=False) -> dict:
    """onnxruntime ``quantize_dynamic`` (or ``quantize_static`` on the calibration batches) of
    ``model`` (the dense model: the zero-effort baseline; a pruned one: pruning, then the same
    INT8 tool), timed against the dense PyTorch model."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = slimkit.export_onnx(copy.deepcopy(model), Path(tmp) / "fp32.onnx", inputs)
        if static:
            path = common.ort_static_quantize(fp32, Path(tmp) / "static.onnx", data["calibration"])
        else:
            path = common.ort_dynamic_quantize(fp32, Path(tmp) / "dynamic.onnx")
        return onnx_point(path, dense, data, inputs, text, rounds, reference)


def slimkit_int8(model: nn.Module, dense: nn.Module, data: dict, inputs, text, rounds, reference) -> dict:
    """slimkit's own INT8 of ``model`` (PTQ on the calibration batches for the vision models,
    dynamic for MiniLM, as its ORT baseline), exported to QDQ ONNX and run by onnxruntime: the
    fastest slimkit deployment path on these models (``int8_speed.json``)."""
    mode = "dynamic" if text else "ptq"
    quantized = copy.deepcopy(model)
    slimkit.prepare(quantized, {"quant": {"mode": mode}}, example_inputs=data["calibration"][0])
    if mode == "ptq":
        slimkit.calibrate(quantized, data["calibration"])
    int8 = slimkit.convert_(quantized)
    with tempfile.TemporaryDirectory() as tmp:
        path = slimkit.export_onnx(int8, Path(tmp) / "slimkit.onnx", inputs)
        return {"mode": mode, **onnx_point(path, dense, data, inputs, text, rounds, reference)}


def int8_points(model: nn.Module, dense: nn.Module, data: dict, inputs, text, rounds, reference) -> dict:
    """The pruned model made INT8 by the tool the dense baseline used, and by slimkit."""
    key = "ort_dynamic" if text else "ort_static"
    return {
        key: ort_int8(model, dense, data, inputs, text, rounds, reference, static=not text),
        "slimkit_onnx": slimkit_int8(model, dense, data, inputs, text, rounds, reference),
    }


def torch_pruning_row(name: str, dense, data, inputs, speed: float, rounds: int, grid, reference, finish=None) -> dict:
    """Torch-Pruning (no latency target of its own) at the ratio that gives the speed slimkit's
    target reached, measured like the other rows; a failure of the peer's tool on this model is
    recorded, not hidden. ``finish``: what is done to each pruned model before it is timed (e.g.
    made INT8; Torch-Pruning has no INT8 path of its own)."""
    text = name == "minilm"

    def build(ratio: float) -> nn.Module:
        if text:
            model = torch_pruning_minilm(dense, data, ratio, "activation")
        else:
            model = torch_pruning_vision(name, dense, data, ratio)
        return model if finish is None else finish(model)

    try:
        ratio, points = ratio_at_speed(build, dense, inputs, speed, rounds, grid)
        model = build(ratio)
    except Exception as exc:  # noqa: BLE001 -- the peer's own error, kept in the report
        print(f"{name}: Torch-Pruning failed: {exc!r}")
        return {"failed": repr(exc)}
    return {
        "ratio": ratio,
        "grid_speedups": points,
        "measured_speedup": round(speedup(dense, model, inputs, rounds), 3),
        "size_mb": size_mb(model),
        **quality_of(outputs(model, data, text), reference, text),
    }


def size_mb(model: nn.Module) -> float:
    """FP32 weights and buffers in MiB (what a float safetensors file of the model holds)."""
    tensors = [*model.parameters(), *model.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


# ----------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------
def model_and_data(name: str, args) -> tuple[bool, nn.Module, dict, bool]:
    """(is MiniLM, the dense model, its calibration / held-out batches, whether heads are pruned)."""
    if name == "minilm":
        tokenizer, dense = common.minilm()
        return True, dense, text_data(args, tokenizer), True
    return False, vision_model(name, args.size), vision_data(args), VISION[name]["heads"]


def run_model(name: str, args) -> dict:
    text, dense, data, heads = model_and_data(name, args)
    reference = outputs(dense, data, text)
    out: dict = {}
    for batch in args.batches:
        inputs = example(data, batch)
        rounds = args.rounds if batch == 1 else max(3, args.rounds // 4)
        baseline = (dense, dense, data, inputs, text, rounds, reference)
        entry: dict = {"dense_size_mb": size_mb(dense), "ort_dynamic": ort_int8(*baseline)}
        if not text:  # CNNs and ViT: onnxruntime's static INT8 is the baseline a vision user picks
            entry["ort_static"] = ort_int8(*baseline, static=True)
        entry["targets"] = []
        for goal in args.speedups:
            target = {"speedup": goal, "batch": batch, "threads": common.THREADS, "cache": str(args.cache)}
            section = {"target": target, "importance": "activation", "reconstruct": True}
            if text and args.pool != "none":  # judge plans by the sentence embedding, not token states
                target["pool"] = args.pool
            if args.layers:  # whole blocks may go too (the solver chooses how many)
                section["layers"] = args.layers
            start = time.perf_counter()
            try:
                model, summary = pruned(dense, section, data, data["calibration"][0])
            except slimkit.SlimkitError as exc:  # a target beyond reach is refused: record why
                entry["targets"].append({"target": goal, "refused": str(exc)})
                print(f"{name} batch {batch} {goal}x: refused: {exc}")
                continue
            seconds = time.perf_counter() - start
            both = speedups(dense, model, inputs, rounds)
            measured = both["median"]
            solver = summary["target"]
            row = {
                "target": goal,
                "slimkit": {
                    "measured_speedup": round(measured, 3),
                    "within_10pct": abs(measured / goal - 1) <= 0.10,
                    "measured_speedup_min_rounds": round(both["min"], 3),
                    "within_10pct_min_rounds": abs(both["min"] / goal - 1) <= 0.10,
                    "solver_predicted": round(solver["predicted"], 3),
                    "solver_measured": round(solver["measured"], 3),
                    "solver_rounds": solver["rounds"],
                    "layers_timed": solver["layers_measured"],
                    "dense_page_faults": solver["page_faults"],
                    "seconds": round(seconds, 1),
                    "widths": solver["widths"],
                    "size_mb": size_mb(model),
                    "picked": solver["picked"],
                    "compared": solver["compared"],
                    "layers_removed": solver["layers"],
                    "depth_options": solver["depth"],
                    **quality_of(outputs(model, data, text), reference, text),
                },
            }
            if args.int8:  # pruning is meant to add to INT8: the pruned model quantized, same run
                row["pruned_int8"] = int8_points(model, dense, data, inputs, text, rounds, reference)
            uniform = uniform_at(dense, data, inputs, heads, measured, rounds, args.grid)
            row["uniform"] = {
                "ratio": uniform["ratio"],
                "grid_speedups": uniform["grid"],
                "measured_speedup": round(speedup(dense, uniform["model"], inputs, rounds), 3),
                "size_mb": size_mb(uniform["model"]),
                **quality_of(outputs(uniform["model"], data, text), reference, text),
            }
            key = "spearman" if text else "cosine"
            row["quality_minus_uniform"] = round(row["slimkit"][key] - row["uniform"][key], 5)
            if args.torch_pruning:
                row["torch_pruning"] = torch_pruning_row(
                    name, dense, data, inputs, measured, rounds, args.grid, reference
                )
                if "measured_speedup" in row["torch_pruning"]:
                    theirs = row["torch_pruning"][key]
                    row["quality_minus_torch_pruning"] = round(row["slimkit"][key] - theirs, 5)
            entry["targets"].append(row)
            s, u = row["slimkit"], row["uniform"]
            print(
                f"{name:>22} b{batch:<3} target {goal:.1f}x  measured {s['measured_speedup']:.2f}x "
                f"(solver {s['solver_measured']:.2f}x)  {quality_text(s, text)}"
                f"  | uniform r={u['ratio']:.2f} {u['measured_speedup']:.2f}x cosine {u['cosine']:.4f}"
            )
            t = row.get("torch_pruning", {})
            if "measured_speedup" in t:
                print(
                    f"{name:>22} b{batch:<3} target {goal:.1f}x  Torch-Pruning r={t['ratio']:.2f} "
                    f"{t['measured_speedup']:.2f}x {quality_text(t, text)}"
                )
            for tool, q in row.get("pruned_int8", {}).items():
                line = f"{name:>22} b{batch:<3} target {goal:.1f}x + INT8 ({tool}) {q['speedup']:.2f}x"
                print(f"{line} {quality_text(q, text)}")
        for key in ("ort_dynamic", "ort_static"):
            if key in entry:
                o = entry[key]
                print(f"{name:>22} b{batch:<3} ORT {key[4:]} {o['speedup']:.2f}x cosine {o['cosine']:.4f}")
        out[f"batch{batch}"] = entry
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for batch_key, entry in report["models"][name].items():
            marker = "o" if batch_key == "batch1" else "s"
            for row in entry["targets"]:
                if "slimkit" not in row:
                    continue
                s, u = row["slimkit"], row["uniform"]
                ax.scatter(s["measured_speedup"], s["cosine"], color="tab:blue", marker=marker)
                ax.scatter(u["measured_speedup"], u["cosine"], color="tab:orange", marker=marker)
                ax.axvline(row["target"], color="0.85", linewidth=0.8, zorder=0)
                if "measured_speedup" in row.get("torch_pruning", {}):
                    t = row["torch_pruning"]
                    ax.scatter(t["measured_speedup"], t["cosine"], color="tab:brown", marker=marker)
                for tool, q in row.get("pruned_int8", {}).items():
                    color = "tab:purple" if tool == "slimkit_onnx" else "tab:red"
                    ax.scatter(q["speedup"], q["cosine"], color=color, marker=marker)
            for key, color in (("ort_dynamic", "tab:gray"), ("ort_static", "tab:green")):
                if key in entry:
                    ax.scatter(entry[key]["speedup"], entry[key]["cosine"], color=color, marker=marker)
        ax.set(xlabel="measured CPU speed-up vs dense", ylabel="output cosine to dense (held out)", title=name)
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="", label=t)
        for c, t in (
            ("tab:blue", "slimkit prune.target"),
            ("tab:orange", "uniform, same speed"),
            ("tab:brown", "Torch-Pruning, same speed"),
            ("tab:gray", "ORT quantize_dynamic"),
            ("tab:green", "ORT quantize_static (vision)"),
            ("tab:red", "prune.target, then the same ORT INT8"),
            ("tab:purple", "prune.target, then slimkit INT8 (ONNX)"),
        )
    ]
    handles += [
        plt.Line2D([], [], color="k", marker=m, linestyle="", label=t) for m, t in (("o", "batch 1"), ("s", "batch 32"))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*VISION, "minilm"], choices=[*VISION, "minilm"])
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 32 (--quick: 1)")
    parser.add_argument("--speedups", nargs="+", type=float, help="default: 2 3 (--quick: 2)")
    parser.add_argument("--size", type=int, default=224, help="image size of the vision models")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds at batch 1 (a quarter at larger batches)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip INT8 of the pruned models")
    parser.add_argument(
        "--no-torch-pruning", dest="torch_pruning", action="store_false", help="skip the Torch-Pruning rows"
    )
    parser.add_argument(
        "--layers", type=float, default=0, help="prune.layers of the target: the most blocks it may remove (0: none)"
    )
    parser.add_argument(
        "--pool", choices=("none", "mean"), default="none", help="MiniLM: prune.target.pool (what plans are judged by)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small images, batch 1, 2x, few rounds")
    parser.add_argument("--output", type=Path, default=RESULTS / "targets.json")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="latency tables to reuse (default: a fresh folder, so that tables timed on a busy machine never count)",
    )
    common.add_malloc_argument(parser)
    args = parser.parse_args()
    common.apply_malloc(args)
    if args.cache is None:
        args.cache = Path(tempfile.mkdtemp(prefix="slimkit-latency-"))
    args.grid = UNIFORM_GRID
    if args.quick:
        args.size, args.rounds, args.grid = 64, 5, (0.5, 0.8)
        if args.output == RESULTS / "targets.json":
            args.output = RESULTS / "targets_quick.json"
    args.batches = args.batches or ([1] if args.quick else [1, 32])
    args.speedups = args.speedups or ([2.0] if args.quick else [2.0, 3.0])
    common.setup_machine()
    report = {
        "machine": common.machine_info(),
        "quick": args.quick,
        "size": args.size,
        "pool": args.pool,
        "models": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # written after each model: a long run stopped early keeps what it measured
        report["models"][name] = run_model(name, args)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
