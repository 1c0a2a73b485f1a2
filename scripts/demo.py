#!/usr/bin/env python
"""`make demo`: distil a small CNN from a larger one on scikit-learn's digits, on CPU.

1. trains a teacher (timm ResNet-18 layout, 1 input channel, 32x32 digits) and saves it;
2. trains the student (the same layout at a quarter of the width: >= 4x fewer parameters)
   alone, as the baseline;
3. distils the student from the teacher with ``scripts/distill.py`` (logit KD + projected
   feature KD, the recipe in ``recipes/digits_kd.yaml``) on one accelerate process;
4. prints a table and leaves the student's hub-style folder in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit.plugins.data import digits
from slimkit.report import count_parameters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import distill  # noqa: E402  (scripts/distill.py: the accelerate entry point)

TEACHER_CHANNELS = (32, 64, 128, 256)
STUDENT_CHANNELS = (8, 16, 32, 64)


def make_model(channels: tuple[int, ...]) -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=channels)


def train_alone(model: torch.nn.Module, data, epochs: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(data.train.inputs, data.train.labels),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data) -> float:
    model.eval()
    return float((model(data.eval.inputs).argmax(-1) == data.eval.labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="out/demo")
    p.add_argument("--epochs", type=int, default=12, help="epochs for every model")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_kd.yaml"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    out = Path(args.output_dir)
    data = digits(channels=1, size=(32, 32), seed=args.seed)
    timings = {}

    start = time.perf_counter()
    teacher = make_model(TEACHER_CHANNELS)
    train_alone(teacher, data, args.epochs, 1e-3, args.seed)
    slimkit.save_pretrained(teacher, out / "teacher")
    timings["teacher"] = time.perf_counter() - start

    # Both students start from the same weights, so the difference is the teacher's.
    torch.manual_seed(args.seed)
    slimkit.save_pretrained(make_model(STUDENT_CHANNELS), out / "student_init")
    start = time.perf_counter()
    alone = slimkit.from_pretrained(out / "student_init")
    train_alone(alone, data, args.epochs, 1e-3, args.seed)
    timings["student alone"] = time.perf_counter() - start

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
            "--epochs",
            str(args.epochs),
            "--seed",
            str(args.seed),
        ]
    )
    timings["student distilled"] = time.perf_counter() - start

    rows = [
        ("teacher", count_parameters(teacher), accuracy(teacher, data)),
        ("student alone", count_parameters(alone), accuracy(alone, data)),
        ("student distilled", metrics["student"]["parameters"], metrics["student"]["accuracy"]),
    ]
    print(f"\ndigits ({len(data.train)} train / {len(data.eval)} held-out images, 32x32), {args.epochs} epochs each")
    print(f"{'model':<20}{'params':>12}{'accuracy':>10}{'train s':>10}")
    for name, params, acc in rows:
        print(f"{name:<20}{params:>12,}{acc:>10.2%}{timings[name]:>10.1f}")
    print(f"\nparameter reduction: {rows[0][1] / rows[2][1]:.1f}x; student folder: {out / 'student'}")
    summary = {name: {"parameters": params, "accuracy": acc, "seconds": timings[name]} for name, params, acc in rows}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
