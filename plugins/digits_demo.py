"""The digits demo (``make demo``) as a library call: the whole pipeline on scikit-learn's
digits, on CPU, in a few minutes.

:func:`run_demo` trains a teacher (timm ResNet-18 layout, 2.8M parameters, 1 input channel,
32x32 digits); trains the student (the same layout at a quarter of the width: 15x fewer
parameters) alone, as the baseline; runs ONE recipe (``recipes/digits_pipeline.yaml``: KD, then
channel pruning with KD recovery, then QAT, then real INT8) through
:func:`slimkit.plugins.distill_run.run_distillation`; and prints a table of every stage
(held-out accuracy, parameters, weight bytes, CPU latency measured side by side). The pieces
(:func:`make_model`, :func:`train_alone`, :func:`accuracy`) are shared by the benchmarks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit.hub import build_architecture
from slimkit.plugins.data import TaskData, digits
from slimkit.plugins.distill_run import DistillOptions, run_distillation
from slimkit.plugins.training import lr_factor, random_shift, set_lr
from slimkit.report import count_parameters, interleaved_latencies, tensor_bytes

TEACHER_CHANNELS = (32, 64, 128, 256)
STUDENT_CHANNELS = (8, 16, 32, 64)
BATCH = 32


def make_model(channels: tuple[int, ...]) -> torch.nn.Module:
    """A timm ResNet-18 layout with the given stage widths, for 1-channel digits (10 classes),
    random weights."""
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=channels)


def train_alone(model: torch.nn.Module, data: TaskData, steps: int, shift: int, seed: int, lr: float = 1e-3) -> None:
    """Plain supervised training with the same data order, augmentation and learning-rate
    schedule as :func:`~slimkit.plugins.distill_run.run_distillation` (the baseline a user
    would train instead of distilling)."""
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
            set_lr(optimizer, lr * lr_factor(step, steps, "cosine"))
            x = random_shift(x, shift, seed, step) if shift else x
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= steps:
                break
        epoch += 1


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TaskData) -> float:
    """Held-out accuracy (the model is left in eval mode)."""
    model.eval()
    return float((model(data.eval.inputs).argmax(-1) == data.eval.labels).float().mean())


def run_demo(
    output_dir: str | Path,
    recipe: str | Path,
    teacher_steps: int = 360,
    kd_steps: int = 270,
    steps: int = 990,
    shift: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the demo, print its table, write ``demo.json`` in ``output_dir`` and return it.

    ``teacher_steps`` trains the teacher, ``kd_steps`` the student alone (the length of the
    recipe's KD-only phase), ``steps`` the whole recipe run. Returns ``{"stages": [...],
    "seconds": ..., ...}``: per stage its accuracy, parameters, weight bytes and latencies."""
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    out = Path(output_dir)
    data = digits(channels=1, size=(32, 32), seed=seed)
    seconds = {}

    start = time.perf_counter()
    teacher = make_model(TEACHER_CHANNELS)
    train_alone(teacher, data, teacher_steps, shift, seed)
    slimkit.save_pretrained(teacher, out / "teacher", report={"accuracy": accuracy(teacher, data)})
    seconds["teacher"] = time.perf_counter() - start

    # Both students start from the same weights, so the difference is the teacher's.
    torch.manual_seed(seed + 1)
    slimkit.save_pretrained(make_model(STUDENT_CHANNELS), out / "student_init")
    start = time.perf_counter()
    alone = slimkit.from_pretrained(out / "student_init")
    train_alone(alone, data, kd_steps, shift, seed)
    seconds["alone"] = time.perf_counter() - start

    start = time.perf_counter()
    options = DistillOptions(
        teacher=str(out / "teacher"),
        student=str(out / "student_init"),
        recipe=str(recipe),
        output_dir=str(out / "student"),
        dataset="digits",
        max_steps=steps,
        shift=shift,
        batch_size=BATCH,
        seed=seed,
    )
    metrics = run_distillation(options)
    seconds["pipeline"] = time.perf_counter() - start

    stages = {s["stage"]: s for s in metrics["stages"]}
    prune = slimkit.Recipe.from_file(recipe).prune
    # as loaded, the INT8 CNN runs as the recipe's quant.compile says (the default, auto: per input
    # shape, its compiled graph or its onnxruntime session, whichever its first calls measure
    # faster); the eager oneDNN kernels for comparison
    int8 = slimkit.from_pretrained(out / "student")
    eager = slimkit.quant.set_compile(slimkit.from_pretrained(out / "student"), "never")
    pruned_float = build_architecture(out / "student", blocks=("pruning",))  # for its speed and size
    models = {"teacher": teacher, "alone": alone, "pruned": pruned_float, "int8": int8, "eager": eager}
    speed = {b: interleaved_latencies(models, data.eval.inputs[:b]) for b in (1, BATCH)}
    rows = [
        ("teacher (fp32)", accuracy(teacher, data), teacher, "teacher"),
        ("student alone (fp32)", accuracy(alone, data), alone, "alone"),
        ("student distilled (fp32)", stages["distilled"]["accuracy"], alone, "alone"),
        (f"+ pruned {prune.channels:.0%} channels (fp32)", stages["pruned"]["accuracy"], pruned_float, "pruned"),
        ("+ QAT -> INT8 (as loaded)", accuracy(int8, data), int8, "int8"),
        ("  INT8, eager kernels", accuracy(eager, data), eager, "eager"),
    ]
    table = []
    print(f"\ndigits: {len(data.train)} train / {len(data.eval)} held-out images (32x32); recipe {recipe}")
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
    summary = {"stages": table, "seconds": seconds, "threads": torch.get_num_threads(), "recipe": str(recipe)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
