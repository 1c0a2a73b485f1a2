"""A shallower student from a Hugging Face teacher: keep some of its layers (DistilBERT-style
initialisation), chosen by you or measured on calibration data. What ``scripts/make_student.py``
does, as library calls.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.plugins.hf import layer_subset_student
from slimkit.prune import rank_blocks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def text_calibration_batches(
    teacher_dir: str | Path, source: str, sentences: int, batch_size: int, max_length: int
) -> list[dict]:
    """Tokenized batches (the teacher folder's tokenizer) of the first ``sentences`` training
    sentences of ``source`` (``stdlib-docs`` or a local data set with a ``text`` column)."""
    from transformers import AutoTokenizer

    from slimkit.plugins.data import load_task_data

    texts = list(load_task_data(source, kind="text").train.inputs)[:sentences]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def choose_layers(teacher: nn.Module, batches: list, keep: int, importance: str) -> tuple[list[int], list[str]]:
    """The teacher layer indices to keep (ascending) and the names removed, in removal order:
    the layers whose skipping moves the teacher's output least on ``batches`` are dropped one
    at a time (``importance``: ``output_cosine`` or ShortGPT's ``block_influence``), as
    ``prune.layers`` does."""
    total = teacher.config.num_hidden_layers
    if not 0 < keep < total:
        raise SlimkitError(f"--num-layers {keep}: the teacher has {total} layers; keep between 1 and {total - 1}")
    removed = rank_blocks(teacher, batches, total - keep, importance=importance)
    gone = {int(name.rsplit(".", 1)[1]) for name in removed}
    return [i for i in range(total) if i not in gone], removed


def save_shallow_student(
    teacher_dir: str | Path, teacher: nn.Module, layers: list[int], output_dir: str | Path
) -> Path:
    """Save the student that keeps ``layers`` of ``teacher`` (embeddings and heads copied) as a
    hub-style folder, with the teacher folder's tokenizer files; returns the folder."""
    out = slimkit.save_pretrained(layer_subset_student(teacher, layers), output_dir)
    for name in TOKENIZER_FILES:
        if (Path(teacher_dir) / name).exists():
            shutil.copy(Path(teacher_dir) / name, out / name)
    return out
