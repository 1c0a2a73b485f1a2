"""Checkpoints and processes: resume mid-schedule continues exactly; under DDP every process
prunes the same units."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from prune_helpers import training_args

from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model
from tests.models import accelerate_launch

HERE = Path(__file__).parent
RECIPE = {
    "prune": {
        "channels": 0.5,
        "heads": 0.5,
        "importance": "taylor",
        "schedule": {"kind": "cubic", "start_step": 0, "end_step": 8, "every": 2},
    }
}


def _train(folder: Path, resume: Path | None = None):
    model = hf_model("bert")
    callbacks = slim_callbacks(model, RECIPE)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(0, 100, (40, 12), generator=g).tolist(),
            "labels": [i % 3 for i in range(40)],
        }
    )
    args = training_args(folder, max_steps=8, save_strategy="steps", save_steps=3, logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


def test_resume_from_checkpoint_mid_schedule_continues_exactly(tmp_path):
    full, _ = _train(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    # mid-schedule: some units pruned (points 0, 2), Taylor sums of step 3 pending for point 4
    assert int(saved["slimkit.prune.last_point"]) == 2 and int(saved["slimkit.prune.channels_pruned"].sum()) > 0
    assert float(saved["slimkit.prune.channels_taylor"].abs().sum()) > 0

    resumed, trainer = _train(tmp_path / "resumed", resume=checkpoint)
    assert trainer.state.global_step == 8
    a, b = full.state_dict(), resumed.state_dict()
    for key in ("slimkit.prune.channels_pruned", "slimkit.prune.heads_pruned", "slimkit.prune.last_point"):
        assert torch.equal(a[key], b[key]), key
    assert int(a["slimkit.prune.channels_pruned"].sum()) == a["slimkit.prune.channels_pruned"].numel() // 2
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_ddp_processes_prune_the_same_units(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    done = accelerate_launch(HERE / "ddp_train.py", [str(tmp_path)], 2, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    # each process saw other batches, so its own Taylor sums differ ...
    assert ranks[0]["local_taylor_step1"] != ranks[1]["local_taylor_step1"]
    assert ranks[0]["local_influence_step1"] != ranks[1]["local_influence_step1"]
    # ... but they are all-reduced, and both processes removed exactly the same units and blocks
    assert sum(ranks[0]["layers_removed"]) == 1
    for key in ("channels_pruned", "heads_pruned", "fc1_rows_zero", "synced_taylor", "layers_removed"):
        assert ranks[0][key] == ranks[1][key], key
    assert sum(ranks[0]["channels_pruned"]) == len(ranks[0]["channels_pruned"]) // 2
    assert sum(ranks[0]["heads_pruned"]) == len(ranks[0]["heads_pruned"]) // 2
    assert [h["step"] for h in ranks[0]["logged"] if "loss" in h] == [2, 4, 6]


@pytest.mark.slow
def test_ddp_processes_calibrate_and_reconstruct_alike(tmp_path):
    """Each process calibrates on other batches; statistics are all-reduced, so both remove the
    same units and refit to the very same weights (independent and sequential reconstruction)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    done = accelerate_launch(HERE / "ddp_calibrate.py", [str(tmp_path)], 2, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"calibrate{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    single = subprocess.run(
        [sys.executable, str(HERE / "ddp_calibrate.py"), str(tmp_path / "single")], env=env, capture_output=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    union = json.loads((tmp_path / "single" / "single.json").read_text())
    for mode in ("sequential=False", "sequential=True"):
        assert ranks[0][mode]["changed"] and ranks[1][mode]["changed"], mode  # the layers were refit
        assert ranks[0][mode]["masks"] == ranks[1][mode]["masks"], mode
        assert ranks[0][mode]["weights"] == ranks[1][mode]["weights"], mode
        # ... from the statistics of both processes' batches, as one process seeing all of them
        torch.testing.assert_close(
            torch.tensor(ranks[0][mode]["layer0_ffn_out"]), torch.tensor(union[mode]), rtol=1e-4, atol=1e-5
        )
