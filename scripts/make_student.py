#!/usr/bin/env python
"""Make a shallower student from a Hugging Face teacher by keeping some of its layers.

    python scripts/make_student.py --teacher T --layers 1,3,5 --output-dir S

The student has the teacher's config with ``num_hidden_layers = len(layers)``; its embeddings,
heads and the kept layers are copied from the teacher (the DistilBERT-style initialisation),
and the tokenizer files are copied along, so ``S`` is ready for ``scripts/distill.py``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import slimkit
from slimkit.plugins.hf import layer_subset_student

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a hub-style folder of a transformers model")
    p.add_argument("--layers", required=True, help="comma-separated teacher layer indices to keep, e.g. 1,3,5")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    teacher = slimkit.from_pretrained(args.teacher)
    student = layer_subset_student(teacher, [int(i) for i in args.layers.split(",")])
    out = slimkit.save_pretrained(student, args.output_dir)
    for name in TOKENIZER_FILES:
        if (Path(args.teacher) / name).exists():
            shutil.copy(Path(args.teacher) / name, out / name)
    print(f"{out}: {student.config.num_hidden_layers} of {teacher.config.num_hidden_layers} layers")
    return out


if __name__ == "__main__":
    main()
