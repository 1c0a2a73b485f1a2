#!/usr/bin/env python
"""Make a shallower student from a Hugging Face teacher by keeping some of its layers.

    python scripts/make_student.py --teacher T --num-layers 3 --output-dir S     # layers chosen on data
    python scripts/make_student.py --teacher T --layers 1,3,5 --output-dir S     # layers you list

The student has the teacher's config with ``num_hidden_layers = len(layers)``; its embeddings,
heads and the kept layers are copied from the teacher (the DistilBERT-style initialisation),
and the tokenizer files are copied along, so ``S`` is ready for ``scripts/distill.py``.

With ``--num-layers K`` the layers to keep are chosen by measurement, as ``prune.layers`` does:
the teacher runs on calibration sentences (``--calibration``: ``stdlib-docs`` by default, or a
local data set with a ``text`` column) and the layers whose skipping moves its output least
(``--layer-importance output_cosine``, or ShortGPT's ``block_influence``) are dropped, one at a
time, until K are left.

This script only reads the flags: the work is ``slimkit.plugins.shallow_student``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimkit
from slimkit.plugins.shallow_student import choose_layers, save_shallow_student, text_calibration_batches


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a hub-style folder of a transformers model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", help="comma-separated teacher layer indices to keep, e.g. 1,3,5")
    which.add_argument("--num-layers", type=int, help="how many layers to keep, chosen on calibration data")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--calibration", default="stdlib-docs", help="stdlib-docs (default) or a local text data set")
    p.add_argument("--calibration-sentences", type=int, default=128, help="sentences the layers are ranked on")
    p.add_argument("--layer-importance", default="output_cosine", choices=("output_cosine", "block_influence"))
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    teacher = slimkit.from_pretrained(args.teacher)
    if args.layers:
        layers = [int(i) for i in args.layers.split(",")]
    else:
        batches = text_calibration_batches(
            args.teacher, args.calibration, args.calibration_sentences, 32, args.max_length
        )
        layers, removed = choose_layers(teacher, batches, args.num_layers, args.layer_importance)
        print(f"removed (least influential first, {args.layer_importance}): {', '.join(removed)}")
    out = save_shallow_student(args.teacher, teacher, layers, args.output_dir)
    print(f"{out}: layers {layers} of the teacher's {teacher.config.num_hidden_layers}")
    return out


if __name__ == "__main__":
    main()
