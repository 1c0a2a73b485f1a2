#!/usr/bin/env python
"""`make demo`: the whole pipeline on scikit-learn's digits, on CPU, in a few minutes.

1. trains a teacher (timm ResNet-18 layout, 2.8M parameters, 1 input channel, 32x32 digits);
2. trains the student (the same layout at a quarter of the width: 15x fewer parameters) alone,
   as the baseline;
3. runs ONE recipe, ``recipes/digits_pipeline.yaml``, as ``scripts/distill.py`` would:
   knowledge distillation, then channel pruning on a cubic schedule with KD recovery, then
   quantization-aware training, then conversion to a real INT8 model (oneDNN kernels);
4. prints a table of every stage (accuracy on the held-out split, parameters, weight bytes and
   CPU latency measured side by side in this process; the INT8 model as loaded, which on its
   first inference call keeps the faster of its compiled graph and its onnxruntime session, and
   on its eager kernels) and leaves the folders in
   --output-dir.

This script only reads the flags: the demo is ``slimkit.plugins.digits_demo.run_demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimkit.plugins.digits_demo import run_demo

ROOT = Path(__file__).resolve().parent.parent


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
    return run_demo(args.output_dir, args.recipe, args.teacher_steps, args.kd_steps, args.steps, args.shift, args.seed)


if __name__ == "__main__":
    main()
