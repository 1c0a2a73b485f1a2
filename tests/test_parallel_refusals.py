"""Setups slimkit refuses with a clear error instead of training wrongly, with a real Trainer:
the Trainer's FSDP on CPU (accelerate enables FSDP only on accelerators), FSDP1, DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import transformers

import slimkit
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model
from tests.models import ROOT, accelerate_launch
from tests.test_hf_trainer import ToyText

HERE = Path(__file__).parent


@pytest.mark.slow
def test_trainer_fsdp_on_cpu_is_refused_with_the_way_out(tmp_path):
    """Two processes (accelerate launch --multi_gpu on CPU), TrainingArguments(fsdp=True) with
    FSDP2: refused when the Trainer is built, because there is no accelerator. (FSDP1 on CPU
    never gets that far: accelerate's plugin raises "no available devices" itself.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = accelerate_launch(HERE / "trainer_parallel.py", [str(tmp_path), "2"], 2, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        v2 = json.loads((tmp_path / f"v2-rank{rank}.json").read_text())
        assert v2["world_size"] == 2 and not v2["trained"]
        assert v2["error"].startswith("IncompatibleError: TrainingArguments: FSDP through the Trainer")
        for hint in ("needs an accelerator", "fully_shard", "torchrun --nproc_per_node", "docs/scale.md"):
            assert hint in v2["error"], hint


def test_trainer_with_deepspeed_is_refused(tmp_path):
    """DeepSpeed is not installed here, so TrainingArguments cannot be built with a config:
    the field is set on real, validated arguments, as TrainingArguments(deepspeed=...) would."""
    teacher, student = hf_model("bert", seed=1), hf_model("bert", seed=2)
    callbacks = slim_callbacks(student, {"distill": {"alpha": 0.5}}, teacher=teacher)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(slimkit.SlimkitError, match=r"DeepSpeed is not supported by slimkit\. ZeRO-3 partitions"):
        transformers.Trainer(model=student, args=args, train_dataset=ToyText(), callbacks=callbacks)
    args.deepspeed = None  # the same Trainer without DeepSpeed trains
    trainer = transformers.Trainer(model=student, args=args, train_dataset=ToyText(), callbacks=callbacks)
    trainer.train()
    assert trainer.state.global_step == 2


def test_fsdp1_on_an_accelerator_is_refused():
    """FSDP1 only runs on accelerators (checked on CPU: the setup check itself)."""
    from slimkit.plugins.parallelism import check_setup

    with pytest.raises(slimkit.SlimkitError, match=r"FSDP version 1 flattens parameters .*=\{'version': 2\}"):
        check_setup(fsdp=True, fsdp_version=1, deepspeed=False, on_cpu=False, where="TrainingArguments")
    check_setup(fsdp=True, fsdp_version=2, deepspeed=False, on_cpu=False, where="TrainingArguments")  # allowed
