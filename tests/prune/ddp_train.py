"""Run by tests/prune/test_prune_distributed.py under ``accelerate launch --multi_gpu --num_processes 2``.

Trains a tiny BERT with a stock Trainer, Taylor importance, depth pruning by block influence and
a cubic schedule. Each process sees different batches (so its local gradients and block
influences differ) and writes what it pruned to ``<out>/rank<k>.json``; the test checks that
both processes pruned the very same units and blocks.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from prune_helpers import training_args

import slimkit
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model
from tests.models import close_process_group


class LocalStatistics(transformers.TrainerCallback):
    """Records this process's own Taylor sums and block influences of step 1, before slimkit
    all-reduces them."""

    def __init__(self, model):
        self.pruner = slimkit.methods_of(model)["prune"]
        self.local = None
        self.influence = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.local = self.pruner.data.gradients.parts[0][1].pending.tolist()
            self.influence = self.pruner.depth.hooks.sums.tolist()


def main(out: Path) -> None:
    model = hf_model("bert")
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(0, 100, (64, 12), generator=g).tolist(),
            "labels": torch.randint(0, 3, (64,), generator=g).tolist(),
        }
    )
    recipe = {
        "prune": {
            "channels": 0.5,
            "heads": 0.5,
            "importance": "taylor",
            "scope": "global",
            "layers": 1,
            "layer_importance": "block_influence",
            "schedule": {"kind": "cubic", "start_step": 0, "end_step": 6, "every": 2},
        }
    }
    callbacks = slim_callbacks(model, recipe)
    probe = LocalStatistics(model)  # runs before the slimkit callbacks (they move themselves last)
    args = training_args(out / "run", ddp_backend="gloo")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[probe, *callbacks])
    trainer.train()
    state = model.slimkit.prune
    rank = trainer.args.process_index
    record = {
        "world_size": trainer.args.world_size,
        "channels_pruned": state.channels_pruned.int().tolist(),
        "heads_pruned": state.heads_pruned.int().tolist(),
        "local_taylor_step1": probe.local,
        "local_influence_step1": probe.influence,
        "layers_removed": state.depth.removed.int().tolist(),
        "synced_taylor": state.channels_taylor.tolist(),
        "fc1_rows_zero": (model.bert.encoder.layer[0].intermediate.dense.weight.abs().sum(1) == 0).int().tolist(),
        "logged": [h for h in trainer.state.log_history if "prune/channels" in h],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    close_process_group()
