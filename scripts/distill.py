#!/usr/bin/env python
"""Distil (and prune / quantize, as the recipe says) a student from a teacher with accelerate.

    accelerate launch scripts/distill.py --teacher T --student S --recipe R --output-dir D \
        [--dataset X] [--max-steps N]

T and S are hub-style folders (slimkit, transformers or timm) or timm model names (built
with random weights, never downloaded). X is 'digits' (images, the default for image models),
'stdlib-docs' (text, the default for text models) or a local data set that the ``datasets``
library loads (a saved folder, an image folder, or a .csv/.json/.jsonl/.parquet file).

It runs on one process or many: ``accelerate launch --multi_gpu --num_processes 2 ...``
starts two CPU processes (gloo) on a machine without GPUs. D receives the converted student
as a hub-style folder and ``metrics.json`` (teacher and student accuracy, parameters, the loss
curve, the processes that ran).

This script only reads the flags: the run is ``slimkit.plugins.distill_run.run_distillation``.
"""

from __future__ import annotations

import argparse
import sys

from slimkit.errors import SlimkitError
from slimkit.plugins.distill_run import DistillOptions, run_distillation

D = DistillOptions  # the library's defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: a hub-style folder or a timm model name")
    p.add_argument("--student", required=True, help="student: a hub-style folder or a timm model name")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml / .json)")
    p.add_argument("--output-dir", required=True, help="where the student folder and metrics.json go")
    p.add_argument("--dataset", default=None, help="'digits', 'stdlib-docs' or a local data set (default: by model)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=float, default=D.epochs, help="epochs when --max-steps is not given")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="batch size per process")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 images, 1e-4 text)")
    p.add_argument("--image-size", type=int, default=D.image_size, help="image side for models without a fixed size")
    p.add_argument("--max-length", type=int, default=D.max_length, help="token length for text models")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--lr-schedule",
        choices=("cosine", "constant"),
        default=D.lr_schedule,
        help="cosine: 5%% linear warm-up, then cosine decay to 0 at the last step",
    )
    p.add_argument("--shift", type=int, default=D.shift, help="images: random translation of up to this many pixels")
    p.add_argument(
        "--checkpoint-every", type=int, default=D.checkpoint_every, help="write a checkpoint every N steps (0: never)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="how many checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    p.add_argument(
        "--dropout",
        choices=("keep", "off"),
        default=D.dropout,
        help="off: no dropout in the student (helps feature KD from a pre-trained encoder)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=D.calibration_batches,
        help="batches of the training split given to slimkit.calibrate when the recipe prunes with data at "
        "step 0 (importance activation / fisher / taylor, reconstruct, global scope by sensitivity)",
    )
    p.add_argument("--seed", type=int, default=D.seed)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run_distillation(DistillOptions(**vars(parse_args(argv))))


if __name__ == "__main__":
    try:
        main()
    except SlimkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
