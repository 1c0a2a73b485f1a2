"""Run by tests/test_parallel_refusals.py under ``accelerate launch --multi_gpu --num_processes 2``
on CPU: a real Trainer with the ``fsdp`` TrainingArguments and slimkit's callbacks.

``trainer_parallel.py OUT VERSION [VERSION ...]`` writes ``OUT/v<VERSION>-rank<k>.json`` for each
FSDP version: the error slimkit raised (None if none) and whether the Trainer trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

import slimkit
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model
from tests.models import close_process_group
from tests.test_hf_trainer import ToyText


def main(out: Path, version: int) -> None:
    teacher, student = hf_model("bert", seed=1), hf_model("bert", seed=2)
    callbacks = slim_callbacks(student, {"distill": {"alpha": 0.5}}, teacher=teacher)
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        fsdp=True,
        fsdp_config={"version": version},
    )
    record = {"error": None, "trained": False}
    try:
        trainer = transformers.Trainer(model=student, args=args, train_dataset=ToyText(), callbacks=callbacks)
        record["fsdp_enabled"] = trainer.is_fsdp_enabled
        trainer.train()
        record["trained"] = True
    except slimkit.SlimkitError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / f"v{version}-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    for v in sys.argv[2:]:
        main(Path(sys.argv[1]), int(v))
    close_process_group()
