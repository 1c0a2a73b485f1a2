"""``slimkit sensitivity FOLDER``: the per-layer sensitivity scan of a saved model on a data set.

The folder is loaded with ``slimkit.from_pretrained``; the batches are the first shuffled
training batches of ``--dataset`` (``digits``, ``stdlib-docs`` or a local folder / file, as
``scripts/distill.py`` reads them), tokenized with the folder's own tokenizer for text models.
"""

from __future__ import annotations

import argparse

import slimkit

from .data import load_task_data, task_tensors
from .evaluation import calibration_batches
from .loading import image_geometry, input_kind, load_tokenizer


def run(args: argparse.Namespace) -> slimkit.Sensitivity:
    model = slimkit.from_pretrained(args.folder)
    kind = input_kind(model)
    tokenizer = load_tokenizer(args.folder)[0] if kind == "text" else None
    channels, size = image_geometry(model, 32) if kind == "image" else (1, (32, 32))
    data = load_task_data(args.dataset, kind, channels, size)
    train = task_tensors(data, "train", tokenizer)
    with_labels = args.metric == "loss"
    batches = calibration_batches(train, kind, with_labels, args.batch_size, args.batches, seed=0)
    table = slimkit.sensitivity(
        model,
        batches,
        ratios=args.ratios,
        prune=not args.no_prune,
        quant=not args.no_quant,
        metric=args.metric,
        importance=args.importance,
        num_batches=None,
    )
    print(table.format())
    if args.output is not None:
        print(f"wrote {table.save(args.output)}")
    return table
