"""How much quality structured pruning keeps: importance scores, reconstruction, recovery, peers.

1. The real all-MiniLM-L6-v2 on ``stdlib-docs`` (plugins/data.py: calibration sentences from
   the training split, quality on the held-out split): one-shot 25% / 50% of heads + FFN
   neurons with every label-free importance (l1, l2, activation), with and without
   ``reconstruct`` (independent and sequential), global scope by sensitivity and by normalised
   scores; no training, and after a fixed short KD recovery. Quality: mean cosine of the
   mean-pooled sentence embeddings to the teacher's, and the Spearman correlation of all
   pairwise cosine similarities (what a search index ranks by). Peers at the same ratios and
   recovery: Torch-Pruning's own pruner (L2 magnitude and its activation importance), and the
   zero-effort baseline, onnxruntime ``quantize_dynamic`` of the teacher.
2. The digits CNN of ``prune_accuracy.py`` at 30 / 50 / 70% of channels one-shot, every
   importance with and without ``reconstruct``, before and after a fixed fine-tuning recovery,
   against Torch-Pruning's pruner (L2 magnitude, BatchNorm scale, Taylor).

Speed-ups are rough (interleaved medians on a shared machine); the integrator re-measures
them on a quiet one. Writes benchmarks/results/prune_quality.{json,png}.

    python benchmarks/prune_quality.py [--only minilm|digits] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import slimkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from digits_split import shuffled_digits  # noqa: E402
from prune_accuracy import DigitsCNN, accuracy, train_cnn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {
    "minilm_25_reconstruct_no_training": "cosine >= 0.95 and Spearman >= 0.95 (<= 512 calibration sentences)",
    "digits_50_reconstruct_no_training": "accuracy >= 0.95",
    "digits_70_reconstruct_no_training": "accuracy >= 0.85",
    "versus_torch_pruning": "never worse than Torch-Pruning at the same ratio and recovery",
}


# ----------------------------------------------------------------------------------------
# quality measures
# ----------------------------------------------------------------------------------------
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of the pairwise cosine similarities of two embedding sets."""
    i, j = torch.triu_indices(len(a), len(a), 1)
    x, y = (a @ a.T)[i, j].double(), (b @ b.T)[i, j].double()
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def quality(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    return {
        "cosine": round(float((embeddings * reference).sum(-1).mean()), 5),
        "spearman": round(spearman(embeddings, reference), 5),
    }


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([common.mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


# ----------------------------------------------------------------------------------------
# 1. MiniLM
# ----------------------------------------------------------------------------------------
def minilm_data(tokenizer, calibration: int):
    from slimkit.plugins.data import stdlib_docs

    data = stdlib_docs()

    def batches(texts: list[str], size: int, length: int) -> list[dict]:
        return [
            dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=length, return_tensors="pt"))
            for i in range(0, len(texts), size)
        ]

    train = list(data.train.inputs)
    return {
        "calibration": batches(train[:calibration], 32, 128),
        "recovery": batches(train, 16, 64),
        "eval": batches(list(data.eval.inputs), 64, 128),
        "sizes": {"train": len(train), "calibration": min(calibration, len(train)), "eval": len(data.eval.inputs)},
    }


def kd_recovery(model: nn.Module, batches: list[dict], steps: int, lr: float) -> None:
    """The fixed recovery: feature KD (MSE on every layer's token states) on training sentences."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = slimkit.compute_loss(model, model(**batch), attention_mask=batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slimkit.step(model)


KD = {"alpha": 0.0, "features": [{"student": "encoder.layer.*", "teacher": "encoder.layer.*", "loss": "mse"}]}


def slimkit_minilm(dense, data, ratio: float, section: dict, recovery_steps: int, lr: float):
    """(one-shot model, recovered model or None, seconds of prepare + calibrate + convert)."""
    out = []
    for recover in (False, True) if recovery_steps else (False,):
        model = copy.deepcopy(dense)
        recipe = {"prune": {"heads": ratio, "channels": ratio, **section}}
        if recover:
            recipe["distill"] = KD
        start = time.perf_counter()
        slimkit.prepare(
            model, recipe, teacher=copy.deepcopy(dense) if recover else None, example_inputs=data["eval"][0]
        )
        if slimkit.needs_calibration(model):
            slimkit.calibrate(model, data["calibration"])
        if recover:
            kd_recovery(model, data["recovery"], recovery_steps, lr)
        out.append(slimkit.convert_(model))
        if not recover:
            seconds = time.perf_counter() - start
    return out[0], (out[1] if len(out) > 1 else None), seconds


def torch_pruning_minilm(dense, data, ratio: float, importance: str) -> nn.Module:
    """Torch-Pruning's own pruner on the units slimkit prunes: whole heads and FFN neurons (the
    residual stream, embeddings and pooler stay whole)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    layers = model.encoder.layer
    ignored = [model.embeddings] + ([model.pooler] if getattr(model, "pooler", None) is not None else [])
    for layer in layers:
        ignored += [layer.attention.output.dense, layer.output.dense]
    heads = {}
    for layer in layers:
        attention = layer.attention.self
        for projection in (attention.query, attention.key, attention.value):
            heads[projection] = attention.num_attention_heads
    imp = tp.importance.ActivationImportance() if importance == "activation" else tp.importance.MagnitudeImportance(p=2)
    example = data["calibration"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            imp,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            output_transform=lambda out: out.last_hidden_state,
        )
        if importance == "activation":
            with imp.compute_importance(model), torch.no_grad():
                for batch in data["calibration"]:
                    model(**batch)
        pruner.step()
    for layer in layers:
        attention = layer.attention.self
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features
    return model.eval()


def ort_dynamic(dense, data) -> torch.Tensor:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = slimkit.export_onnx(copy.deepcopy(dense), Path(tmp) / "fp32.onnx", data["eval"][0])
        session = common.ort_session(common.ort_dynamic_quantize(fp32, Path(tmp) / "dynamic.onnx"))
        names = {i.name for i in session.get_inputs()}
        out = []
        for batch in data["eval"]:
            hidden = session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0]
            out.append(common.mean_pool(torch.from_numpy(hidden), batch["attention_mask"]))
        timing = dict(data["timing"])
        runner = common.ort_runner(session, timing)
        speed = common.interleaved(
            {"teacher": lambda: dense(**timing), "ort_dynamic": runner}, rounds=data["rounds"], iters=1
        )
    return torch.cat(out), speed["teacher"]["median_s"] / speed["ort_dynamic"]["median_s"]


def minilm_configs(quick: bool) -> list[tuple[str, dict, bool]]:
    """(name, prune section, recover) of every slimkit row."""
    rows = [
        ("l1", {"importance": "l1"}, False),
        ("l2", {"importance": "l2"}, True),
        ("activation", {"importance": "activation"}, False),
        ("l1 + reconstruct", {"importance": "l1", "reconstruct": True, "sequential": False}, False),
        ("l2 + reconstruct", {"importance": "l2", "reconstruct": True, "sequential": False}, False),
        ("activation + reconstruct", {"importance": "activation", "reconstruct": True, "sequential": False}, True),
        (
            "activation + reconstruct (sequential)",
            {"importance": "activation", "reconstruct": True, "sequential": True},
            False,
        ),
        (
            "activation + reconstruct, global (sensitivity)",
            {"importance": "activation", "reconstruct": True, "sequential": False, "scope": "global"},
            False,
        ),
        (
            "activation + reconstruct, global (score)",
            {
                "importance": "activation",
                "reconstruct": True,
                "sequential": False,
                "scope": "global",
                "allocation": "score",
            },
            False,
        ),
    ]
    return rows[:3] + rows[5:6] if quick else rows


def selected(rows: list, names: list[str] | None) -> list:
    """The rows whose name is one of ``names`` (all when None)."""
    if names is None:
        return rows
    unknown = set(names) - {row[0] for row in rows}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {[row[0] for row in rows]}")
    return [row for row in rows if row[0] in names]


def depth_rows(dense, data, counts: list[int]) -> list[dict]:
    """Removed-layer rows: depth pruning (``prune.layers``) lands from another branch; once the
    recipe has the field, each count here is measured like the width rows."""
    if "layers" not in slimkit.PruneConfig.describe():
        return [{"layers": n, "skipped": "prune.layers is not in this slimkit yet"} for n in counts]
    rows = []
    for n in counts:
        model, _, seconds = slimkit_minilm(dense, data, 0.0, {"layers": n, "importance": "activation"}, 0, 0.0)
        rows.append({"layers": n, "one_shot": quality(embed(model, data["eval"]), data["reference"]), "model": model})
    return rows


def minilm_experiment(args) -> dict:
    tokenizer, dense = common.minilm()
    data = minilm_data(tokenizer, args.calibration)
    data["reference"] = reference = embed(dense, data["eval"])
    texts = [f"slimkit benchmark sentence {i}: pruning with calibration data on a CPU" for i in range(32)]
    data["timing"] = dict(tokenizer(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
    data["rounds"] = args.rounds
    out: dict = {"data": data["sizes"], "recovery": {"steps": args.recovery_steps, "lr": args.lr, "kd": KD}}
    rows, models = [], {}
    for ratio in args.minilm_ratios:
        for name, section, recover in selected(minilm_configs(args.quick), args.rows):
            one_shot, recovered, seconds = slimkit_minilm(
                dense, data, ratio, section, args.recovery_steps if recover else 0, args.lr
            )
            row = {"method": f"slimkit {name}", "ratio": ratio, "seconds": round(seconds, 1)}
            row["one_shot"] = quality(embed(one_shot, data["eval"]), reference)
            if recovered is not None:
                row["kd_recovery"] = quality(embed(recovered, data["eval"]), reference)
            rows.append(row)
            models[(row["method"], ratio)] = one_shot
            print(f"  MiniLM {int(ratio * 100)}% {row['method']:50s} {row}", flush=True)
        for imp in ("l2", "activation"):
            row = {"method": f"Torch-Pruning {imp}", "ratio": ratio}
            try:
                pruned = torch_pruning_minilm(dense, data, ratio, imp)
                row["one_shot"] = quality(embed(pruned, data["eval"]), reference)
                models[(row["method"], ratio)] = pruned
                if imp == "l2" and args.recovery_steps:
                    student = copy.deepcopy(pruned)
                    slimkit.prepare(
                        student, {"distill": KD}, teacher=copy.deepcopy(dense), example_inputs=data["eval"][0]
                    )
                    kd_recovery(student, data["recovery"], args.recovery_steps, args.lr)
                    row["kd_recovery"] = quality(embed(slimkit.convert_(student), data["eval"]), reference)
            except Exception as exc:  # a peer that cannot prune this model is a result, not a crash
                row["failed"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(f"  MiniLM {int(ratio * 100)}% {row['method']:50s} {row}", flush=True)
    for row in depth_rows(dense, data, args.layers):
        model = row.pop("model", None)
        method = f"slimkit removed layers: {row['layers']}"
        if model is not None:
            models[(method, 0.0)] = model
        rows.append({"method": method, "ratio": 0.0, **row})
    embeddings, ort_speedup = ort_dynamic(dense, data)
    rows.append(
        {
            "method": "onnxruntime quantize_dynamic (teacher)",
            "ratio": 0.0,
            "no_training": quality(embeddings, reference),
        }
    )
    rows[-1]["speedup_b32x128"] = round(ort_speedup, 3)
    timing = data["timing"]
    speeds = common.interleaved(
        {"dense": lambda: dense(**timing), **{f"{k[0]}@{k[1]}": (lambda m=m: m(**timing)) for k, m in models.items()}},
        rounds=args.rounds,
        iters=1,
    )
    for row in rows:
        key = f"{row['method']}@{row.get('ratio', 0.0)}"
        if key in speeds:
            row["speedup_b32x128"] = round(speeds["dense"]["median_s"] / speeds[key]["median_s"], 3)
    out["rows"] = rows
    out["fisher_taylor"] = (
        "not applicable without training: all-MiniLM-L6-v2 has no head (no task loss), and KD from a copy of "
        "itself has zero gradient before any unit is removed"
    )
    return out


# ----------------------------------------------------------------------------------------
# 2. digits CNN
# ----------------------------------------------------------------------------------------
def torch_pruning_cnn(dense: nn.Module, ratio: float, importance: str, data) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    imp = {
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
    }[importance]()
    x, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model, x[:2], imp, pruning_ratio=ratio, ignored_layers=[model.classifier, model.stem[0]]
        )
        if importance == "taylor":
            model.zero_grad()
            for i in range(0, 512, 64):
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def finetune(model: nn.Module, data, steps: int) -> None:
    """The fixed recovery of every digits row: task-loss fine-tuning, masks held."""
    train_cnn(model, data, steps, 1e-3, seed=1)


def digits_experiment(args) -> dict:
    torch.manual_seed(0)
    train, test = shuffled_digits(held_out=500)
    dense = DigitsCNN()
    train_cnn(dense, train, args.cnn_steps, 2e-3)
    x, y = train
    calibration = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    out = {"dense_accuracy": accuracy(dense, test), "recovery_steps": args.cnn_recovery_steps, "rows": []}
    print(f"digits CNN: dense accuracy {out['dense_accuracy']:.4f}", flush=True)
    probe = test[0][:256]
    models = {}
    for ratio in (0.3, 0.5, 0.7):
        for imp in ("l1", "l2", "bn_scale", "activation", "fisher", "taylor"):
            for reconstruct in (False, True):
                row = {"method": f"slimkit {imp}{' + reconstruct' if reconstruct else ''}", "ratio": ratio}
                for recover in (False, True):
                    model = copy.deepcopy(dense)
                    recipe = {"prune": {"channels": ratio, "importance": imp, "reconstruct": reconstruct}}
                    slimkit.prepare(model, recipe, example_inputs=x[:2])
                    if slimkit.needs_calibration(model):
                        slimkit.calibrate(model, calibration)
                    if recover:
                        finetune(model, train, args.cnn_recovery_steps)
                    small = slimkit.convert_(model)
                    row["recovered" if recover else "one_shot"] = round(accuracy(small, test), 4)
                    if not recover:
                        models[(row["method"], ratio)] = small
                out["rows"].append(row)
                print(f"  digits {int(ratio * 100)}% {row}", flush=True)
        for imp in ("l2", "bn_scale", "taylor"):
            row = {"method": f"Torch-Pruning {imp}", "ratio": ratio}
            pruned = torch_pruning_cnn(dense, ratio, imp, train)
            row["one_shot"] = round(accuracy(pruned, test), 4)
            models[(row["method"], ratio)] = pruned
            tuned = copy.deepcopy(pruned)
            finetune(tuned, train, args.cnn_recovery_steps)
            row["recovered"] = round(accuracy(tuned, test), 4)
            out["rows"].append(row)
            print(f"  digits {int(ratio * 100)}% {row}", flush=True)
    speeds = common.interleaved(
        {"dense": lambda: dense(probe), **{f"{k[0]}@{k[1]}": (lambda m=m: m(probe)) for k, m in models.items()}},
        rounds=args.rounds,
        iters=3,
    )
    for row in out["rows"]:
        key = f"{row['method']}@{row.get('ratio', 0.0)}"
        row["speedup_b256"] = round(speeds["dense"]["median_s"] / speeds[key]["median_s"], 3)
    return out


# ----------------------------------------------------------------------------------------
# goals, plot, main
# ----------------------------------------------------------------------------------------
def _find(rows: list[dict], method: str, ratio: float) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["ratio"] == ratio), None)


def goals(report: dict) -> dict:
    met = {}
    minilm = report.get("minilm")
    if minilm:
        row = _find(minilm["rows"], "slimkit activation + reconstruct", 0.25)
        q = row["one_shot"]
        met["minilm_25_reconstruct_no_training"] = {**q, "met": q["cosine"] >= 0.95 and q["spearman"] >= 0.95}
    digits = report.get("digits_cnn")
    if digits:
        for ratio, need in ((0.5, 0.95), (0.7, 0.85)):
            best = max(
                (r for r in digits["rows"] if r["ratio"] == ratio and r["method"].endswith("+ reconstruct")),
                key=lambda r: r["one_shot"],
            )
            met[f"digits_{int(ratio * 100)}_reconstruct_no_training"] = {
                "best": best["method"],
                "accuracy": best["one_shot"],
                "met": best["one_shot"] >= need,
            }
    met["versus_torch_pruning"] = versus_torch_pruning(report)
    return met


def versus_torch_pruning(report: dict) -> dict:
    """The best slimkit row against the best Torch-Pruning row, per model, ratio and recovery."""
    out = {}
    for name, key_list in (("minilm", ("one_shot", "kd_recovery")), ("digits_cnn", ("one_shot", "recovered"))):
        part = report.get(name)
        if not part:
            continue
        for ratio in sorted({r["ratio"] for r in part["rows"] if r["ratio"]}):
            for key in key_list:

                def score(r, key=key):
                    value = r.get(key)
                    return None if value is None else (value["spearman"] if isinstance(value, dict) else value)

                ours = [score(r) for r in part["rows"] if r["ratio"] == ratio and r["method"].startswith("slimkit")]
                theirs = [score(r) for r in part["rows"] if r["ratio"] == ratio and r["method"].startswith("Torch")]
                ours, theirs = [v for v in ours if v is not None], [v for v in theirs if v is not None]
                if ours and theirs:
                    out[f"{name} {ratio} {key}"] = {"slimkit": max(ours), "torch_pruning": max(theirs)}
                    out[f"{name} {ratio} {key}"]["met"] = max(ours) >= max(theirs)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("minilm", "digits_cnn") if p in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = report[name]["rows"]
        for row in rows:
            if "speedup_b32x128" not in row and "speedup_b256" not in row:
                continue
            x = row.get("speedup_b32x128", row.get("speedup_b256"))
            for key, marker in (("one_shot", "x"), ("no_training", "*"), ("kd_recovery", "o"), ("recovered", "o")):
                value = row.get(key)
                if value is None:
                    continue
                y = value["spearman"] if isinstance(value, dict) else value
                color = "tab:red" if row["method"].startswith("Torch") else "tab:green"
                color = "tab:gray" if row["method"].startswith("onnx") else color
                if "reconstruct" in row["method"]:
                    color = "tab:blue"
                ax.scatter([x], [y], marker=marker, color=color, s=28)
        ax.set(
            xlabel="rough CPU speed-up vs FP32 dense (shared machine)",
            ylabel="Spearman of pairwise similarities" if name == "minilm" else "test accuracy",
            title="all-MiniLM-L6-v2, heads + FFN" if name == "minilm" else "digits CNN, channels",
        )
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="", label=t)
        for c, t in (
            ("tab:blue", "slimkit + reconstruct"),
            ("tab:green", "slimkit, no reconstruct"),
            ("tab:red", "Torch-Pruning"),
            ("tab:gray", "ORT quantize_dynamic"),
        )
    ]
    handles += [
        plt.Line2D([], [], color="k", marker="x", linestyle="", label="one-shot, no training"),
        plt.Line2D([], [], color="k", marker="o", linestyle="", label="after recovery"),
    ]
    axes[0][0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("minilm", "digits"))
    p.add_argument("--calibration", type=int, default=512, help="MiniLM calibration sentences")
    p.add_argument("--recovery-steps", type=int, default=200, help="MiniLM KD recovery steps (batch 16)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--layers", type=int, nargs="*", default=[1, 2, 3], help="removed-layer rows (prune.layers)")
    p.add_argument("--cnn-steps", type=int, default=800)
    p.add_argument("--cnn-recovery-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: few rows, few steps (numbers not meaningful)")
    p.add_argument("--rows", nargs="+", help="MiniLM: only these slimkit rows (names as printed, e.g. 'l2')")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="MiniLM heads + FFN ratios")
    p.add_argument("--output", type=Path, default=RESULTS / "prune_quality.json")
    args = p.parse_args()
    args.minilm_ratios = tuple(args.ratios)
    if args.quick:
        args.calibration, args.recovery_steps, args.cnn_steps, args.cnn_recovery_steps, args.rounds = 64, 4, 60, 5, 2
        args.minilm_ratios, args.layers = (0.25,), [1]
    common.setup_machine()
    report: dict = {"machine": common.machine_info(), "settings": {k: str(v) for k, v in vars(args).items()}}
    report["goals"] = GOALS
    previous = json.loads(args.output.read_text()) if args.output.exists() and args.only else {}
    if args.only in (None, "digits"):
        report["digits_cnn"] = digits_experiment(args)
    elif "digits_cnn" in previous:
        report["digits_cnn"] = previous["digits_cnn"]
    if args.only in (None, "minilm"):
        report["minilm"] = minilm_experiment(args)
    elif "minilm" in previous:
        report["minilm"] = previous["minilm"]
    report["measured_goals"] = goals(report)
    report["load_average_at_end"] = os.getloadavg()[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print("\ngoals (measured):")
    for name, value in report["measured_goals"].items():
        print(f"  {name}: {GOALS.get(name, '')} -> {value}")
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
