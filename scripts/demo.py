#!/usr/bin/env python
"""`make demo`: the whole pipeline on scikit-learn's digits, on CPU, in a few minutes.

1. trains a teacher (timm ResNet-18 layout, 2.8M parameters, 1 input channel, 32x32 digits);
2. trains the student (the same layout at a quarter of the width: 15x fewer parameters) alone,
   as the baseline;
3. runs ONE recipe, ``recipes/digits_pipeline.yaml``, through ``scripts/distill.py``:
   knowledge distillation, then channel pruning on a cubic schedule with KD recovery, then
   quantization-aware training, then conversion to a real INT8 model (oneDNN kernels);
4. prints a table of every stage (accuracy on the held-out split, parameters, weight bytes and
   CPU latency measured side by side in this process; the INT8 model as loaded, which compiles
   itself on its first inference call, and on its eager kernels) and leaves the folders in
   --output-dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit.hub import build_architecture
from slimkit.plugins.data import digits
from slimkit.report import count_parameters, tensor_bytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import distill  # noqa: E402  (scripts/distill.py: the accelerate entry point and its training helpers)

TEACHER_CHANNELS = (32, 64, 128, 256)
STUDENT_CHANNELS = (8, 16, 32, 64)
BATCH = 32


def make_model(channels: tuple[int, ...]) -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=channels)


def train_alone(model: torch.nn.Module, data, steps: int, shift: int, seed: int, lr: float = 1e-3) -> None:
    """Plain supervised training with the same data order, augmentation and schedule as distill.py."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(data.train.inputs, data.train.labels), batch_size=BATCH, shuffle=True, generator=generator
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        generator.manual_seed(seed + epoch)
        for x, y in loader:
            distill.set_lr(optimizer, lr * distill.lr_factor(step, steps, "cosine"))
            x = distill.random_shift(x, shift, seed, step) if shift else x
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= steps:
                break
        epoch += 1


@torch.no_grad()
def accuracy(model: torch.nn.Module, data) -> float:
    model.eval()
    return float((model(data.eval.inputs).argmax(-1) == data.eval.labels).float().mean())


@torch.inference_mode()
def latencies(models: dict[str, torch.nn.Module], inputs, rounds: int = 15) -> dict[str, float]:
    """Median forward time (ms) of each model on ``inputs`` (a tensor or a dict of kwargs),
    interleaved round by round, the order reversed every other round, so drift hits all alike."""

    def run(model):
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    for m in models.values():
        m.eval()
        run(m)  # warm-up: oneDNN primitives, allocator
    times = {name: [] for name in models}
    for i in range(rounds):
        for name in list(models) if i % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            run(models[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="out/demo")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_pipeline.yaml"))
    p.add_argument("--teacher-steps", type=int, default=360, help="teacher training steps (8 epochs)")
    p.add_argument("--kd-steps", type=int, default=270, help="steps of the recipe's KD-only phase (6 epochs)")
    p.add_argument("--steps", type=int, default=990, help="steps of the whole recipe run (22 epochs)")
    p.add_argument("--shift", type=int, default=2, help="random translation of up to this many pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    data = digits(channels=1, size=(32, 32), seed=args.seed)
    seconds = {}

    start = time.perf_counter()
    teacher = make_model(TEACHER_CHANNELS)
    train_alone(teacher, data, args.teacher_steps, args.shift, args.seed)
    slimkit.save_pretrained(teacher, out / "teacher", report={"accuracy": accuracy(teacher, data)})
    seconds["teacher"] = time.perf_counter() - start

    # Both students start from the same weights, so the difference is the teacher's.
    torch.manual_seed(args.seed + 1)
    slimkit.save_pretrained(make_model(STUDENT_CHANNELS), out / "student_init")
    start = time.perf_counter()
    alone = slimkit.from_pretrained(out / "student_init")
    train_alone(alone, data, args.kd_steps, args.shift, args.seed)
    seconds["alone"] = time.perf_counter() - start

    start = time.perf_counter()
    metrics = distill.main(
        [
            "--teacher",
            str(out / "teacher"),
            "--student",
            str(out / "student_init"),
            "--recipe",
            args.recipe,
            "--output-dir",
            str(out / "student"),
            "--dataset",
            "digits",
            "--max-steps",
            str(args.steps),
            "--shift",
            str(args.shift),
            "--batch-size",
            str(BATCH),
            "--seed",
            str(args.seed),
        ]
    )
    seconds["pipeline"] = time.perf_counter() - start

    stages = {s["stage"]: s for s in metrics["stages"]}
    recipe = slimkit.Recipe.from_file(args.recipe)
    # as loaded, the INT8 CNN compiles itself on its first inference call (quant.compile: auto):
    # oneDNN int8 convs with fused requantization and ReLU; the eager kernels for comparison
    int8 = slimkit.from_pretrained(out / "student")
    eager = slimkit.quant.set_compile(slimkit.from_pretrained(out / "student"), "never")
    pruned_float = build_architecture(out / "student", blocks=("pruning",))  # for its speed and size
    models = {"teacher": teacher, "alone": alone, "pruned": pruned_float, "int8": int8, "eager": eager}
    speed = {b: latencies(models, data.eval.inputs[:b]) for b in (1, BATCH)}
    rows = [
        ("teacher (fp32)", accuracy(teacher, data), teacher, "teacher"),
        ("student alone (fp32)", accuracy(alone, data), alone, "alone"),
        ("student distilled (fp32)", stages["distilled"]["accuracy"], alone, "alone"),
        (f"+ pruned {recipe.prune.channels:.0%} channels (fp32)", stages["pruned"]["accuracy"], pruned_float, "pruned"),
        ("+ QAT -> INT8 (as loaded)", accuracy(int8, data), int8, "int8"),
        ("  INT8, eager kernels", accuracy(eager, data), eager, "eager"),
    ]
    table = []
    print(f"\ndigits: {len(data.train)} train / {len(data.eval)} held-out images (32x32); recipe {args.recipe}")
    print(f"{'stage':<30}{'accuracy':>9}{'params':>10}{'weights':>11}{'ms b=1':>9}{'ms b=32':>9}")
    for name, acc, model, key in rows:
        params, size = count_parameters(model), tensor_bytes(model)
        table.append(
            {
                "stage": name,
                "accuracy": acc,
                "parameters": params,
                "weight_bytes": size,
                "latency_ms_b1": speed[1][key],
                "latency_ms_b32": speed[BATCH][key],
            }
        )
        print(f"{name:<30}{acc:>9.2%}{params:>10,}{size / 1024:>9.1f}kB{speed[1][key]:>9.2f}{speed[BATCH][key]:>9.2f}")
    print(
        f"\nstudent: {count_parameters(teacher) / count_parameters(alone):.1f}x fewer parameters than the teacher; "
        f"final INT8 weights {tensor_bytes(teacher) / tensor_bytes(int8):.0f}x smaller than the teacher's, "
        f"{tensor_bytes(alone) / tensor_bytes(int8):.1f}x smaller than the fp32 student's"
    )
    print(
        f"time: teacher {seconds['teacher']:.0f} s, student alone {seconds['alone']:.0f} s, "
        f"pipeline {seconds['pipeline']:.0f} s; folders in {out}/"
    )
    summary = {"stages": table, "seconds": seconds, "threads": torch.get_num_threads(), "recipe": args.recipe}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
