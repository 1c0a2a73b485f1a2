"""QAT + KD on a stock transformers.Trainer, checkpoints, and conversion of the trained model."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import agreement, logits_of

import slimkit
from tests.families import hf_model, token_batch

transformers = pytest.importorskip("transformers")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 120, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


RECIPE = {
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "quant": {"start_step": 1, "freeze_observers_step": 4, "freeze_bn_step": 4},
}


def _trainer(model, callbacks, tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
    }
    args = transformers.TrainingArguments(**{**settings, **overrides})
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)


def test_qat_with_kd_on_a_stock_trainer_then_int8(tmp_path):
    from slimkit.plugins.hf import QATCallback, slim_callbacks

    student, teacher = hf_model("bert").eval(), hf_model("bert").eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a different model to learn from
    callbacks = slim_callbacks(student, RECIPE, teacher=teacher)
    assert any(isinstance(c, QATCallback) for c in callbacks)
    observer = student.bert.encoder.layer[0].attention.self.query.input_quantizer.observer
    trainer = _trainer(student, callbacks, tmp_path)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    phases = [entry["quant/phase"] for entry in logs]
    assert phases[:5] == [1.0, 1.0, 1.0, 2.0, 2.0]  # QAT on from step 1, ranges frozen from step 4
    assert all("distill/kd" in entry and "distill/task" in entry for entry in logs)
    assert int(observer.observed) == 3  # observed at steps 1, 2, 3 (each before its optimizer step)

    inputs = token_batch(batch=32, length=12, seed=5)
    student.eval()
    fake = logits_of(student, inputs)
    int8 = slimkit.convert(student)
    assert slimkit.quant.is_int8_layer(int8.classifier)
    same, diff = agreement(fake, logits_of(int8, inputs))
    assert same >= 0.99 and diff < 1e-3, (same, diff)


def test_a_checkpoint_restores_observers_and_the_phase(tmp_path):
    from slimkit.plugins.hf import slim_callbacks

    model = hf_model("bert").eval()
    trainer = _trainer(model, slim_callbacks(model, {"quant": RECIPE["quant"]}), tmp_path, max_steps=5)
    trainer.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = hf_model("bert").eval()
    slimkit.prepare(fresh, {"quant": RECIPE["quant"]})
    assert slimkit.log_values(fresh)["quant/phase"] == 0.0  # step 0 < start_step
    fresh.load_state_dict(state, strict=False)  # what resume_from_checkpoint does
    assert slimkit.log_values(fresh)["quant/phase"] == 2.0 and slimkit.log_values(fresh)["quant/bn_frozen"] == 1.0
    inputs = token_batch(batch=4, seed=0)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(logits_of(fresh, inputs), logits_of(model, inputs))
