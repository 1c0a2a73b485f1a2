"""Pruning through a stock transformers.Trainer (PruningCallback via slim_callbacks), alone and
together with knowledge distillation, and through the plain-loop API for timm models."""

import copy

import pytest
import torch
import transformers
from datasets import Dataset
from prune_helpers import CASES, masked_tensors_are_zero, training_args

import slimkit
from slimkit.plugins.hf import PruningCallback, slim_callbacks
from tests.families import hf_model, logits, train_steps

CUBIC = {"kind": "cubic", "start_step": 0, "end_step": 6, "every": 2}


def _dataset(kind: str, n: int = 24) -> Dataset:
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        return Dataset.from_dict(
            {
                "pixel_values": torch.randn(n, 3, 16, 16, generator=g).tolist(),
                "labels": [i % 3 for i in range(n)],
            }
        )
    ids = torch.randint(0, 100, (n, 12), generator=g).tolist()
    labels = ids if kind in ("gpt2", "llama") else [i % 3 for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def _train(model, kind, callbacks, folder):
    args = training_args(folder)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(kind), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "llama"])
def test_trainer_with_a_cubic_schedule_logs_the_sparsity(kind, tmp_path):
    model = hf_model(kind)
    callbacks = slim_callbacks(model, {"prune": {"channels": 0.5, "heads": 0.5, "schedule": CUBIC}})
    assert [type(c) for c in callbacks] == [PruningCallback]
    trainer = _train(model, kind, callbacks, tmp_path)
    logged = [h for h in trainer.state.log_history if "prune/channels" in h and "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    channels = [h["prune/channels"] for h in logged]
    # the cubic schedule's targets at steps 2 and 4, then the final ratio at end_step 6
    assert channels[0] == pytest.approx(0.5 * (1 - (1 - 2 / 6) ** 3), abs=0.04)
    assert channels[0] < channels[1] < channels[2] == 0.5
    assert logged[-1]["prune/heads"] == 0.5
    assert logged[0]["prune/params"] < logged[-1]["prune/params"]
    assert masked_tensors_are_zero(model)
    inputs = CASES[f"hf_{kind}" if kind != "llama" else "hf_llama_gqa"].inputs()
    masked = logits(model, inputs)
    small = slimkit.convert(model)
    torch.testing.assert_close(logits(small, inputs), masked, rtol=1e-5, atol=1e-5)


def test_pruning_and_distillation_in_one_trainer_run(tmp_path):
    model = hf_model("bert")
    teacher = copy.deepcopy(model)
    recipe = {
        "distill": {"temperature": 2.0, "alpha": 0.5},
        "prune": {
            "channels": 0.5,
            "heads": 0.5,
            "importance": "taylor",
            "schedule": {**CUBIC, "start_step": 1},
        },
    }
    callbacks = slim_callbacks(model, recipe, teacher=teacher)
    trainer = _train(model, "bert", callbacks, tmp_path)
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["prune/channels"] == 0.5 and last["prune/heads"] == 0.5
    assert "distill/kd" in last and last["distill/kd"] >= 0
    small = slimkit.convert(model)
    assert small.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert not any(n.startswith("slimkit") for n, _ in small.named_parameters())


def test_plain_loop_with_a_timm_model_follows_the_schedule():
    model = CASES["timm_vit"].build()
    x = torch.randn(2, 3, 32, 32)
    slimkit.prepare(model, {"prune": {"channels": 0.5, "heads": 0.5, "schedule": CUBIC}}, example_inputs=x)
    seen = []
    for _ in range(6):
        train_steps(model, x)
        seen.append(slimkit.log_values(model)["prune/channels"])
    assert seen[0] == 0.0 < seen[1] == seen[2] < seen[3] == seen[4] < seen[5] == 0.5  # points 0, 2, 4, 6
    assert masked_tensors_are_zero(model)


def test_trainer_removes_layers_on_a_linear_schedule(tmp_path):
    """Depth pruning through a stock Trainer: blocks ranked on the training batches (block
    influence), one removed at step 3 and one at 6, logged, and removed at convert."""
    model = hf_model("llama")
    model.config.num_hidden_layers = 3
    model = transformers.LlamaForCausalLM(model.config)
    schedule = {"kind": "linear", "start_step": 0, "end_step": 6, "every": 3}
    recipe = {"prune": {"layers": 2, "layer_importance": "block_influence", "schedule": schedule}}
    trainer = _train(model, "llama", slim_callbacks(model, recipe), tmp_path)
    logged = [h["prune/layers"] for h in trainer.state.log_history if "prune/layers" in h and "loss" in h]
    assert logged == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3)]  # logged at steps 2, 4, 6
    assert len(slimkit.prune.summary(model)["layers"]["removed"]) == 2
    inputs = CASES["hf_llama_gqa"].inputs()
    masked = logits(model, inputs)
    small = slimkit.convert(model)
    assert len(small.model.layers) == 1 and small.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(small, inputs), masked, rtol=1e-5, atol=1e-5)
