"""slimkit's callbacks on a stock transformers.Trainer: loss, logging, checkpoints, resume."""

import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file

from slimkit.plugins.hf import DistillationCallback, slim_callbacks
from tests.families import hf_model

RECIPE = {
    "distill": {
        "temperature": 2.0,
        "alpha": 0.5,
        "features": [{"student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*"}],
        "attention": [{"student": "bert.encoder.layer.1.attention", "teacher": "bert.encoder.layer.3.attention"}],
    }
}
TERMS = {
    "distill/kd",
    "distill/task",
    "distill/feature.bert.encoder.layer.0",
    "distill/feature.bert.encoder.layer.1",
    "distill/attention.bert.encoder.layer.1.attention",
}


class ToyText(torch.utils.data.Dataset):
    def __init__(self, n=24, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 128, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -4:] = 0  # some padding
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def pair(seed=2):
    teacher = hf_model("bert", seed=1, num_hidden_layers=4, hidden_size=48)
    return teacher, hf_model("bert", seed=seed)


def test_stock_trainer_backpropagates_and_logs_the_mixed_loss(tmp_path):
    teacher, student = pair()
    teacher_before = copy.deepcopy(teacher.state_dict())
    callbacks = slim_callbacks(student, RECIPE, teacher=teacher)
    trainer = transformers.Trainer(
        model=student, args=make_args(tmp_path), train_dataset=ToyText(), callbacks=callbacks
    )
    projector_ids = {id(p) for p in student.slimkit.projectors.parameters()}
    projector_before = [p.detach().clone() for p in student.slimkit.projectors.parameters()]
    trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert projector_ids <= in_optimizer
    assert all(not torch.equal(a, b) for a, b in zip(projector_before, student.slimkit.projectors.parameters()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 and all(set(entry) >= TERMS for entry in logs)
    for entry in logs:  # the Trainer's own loss is the mix of the logged terms
        mix = 0.5 * entry["distill/kd"] + 0.5 * entry["distill/task"]
        mix += sum(v for k, v in entry.items() if k.startswith(("distill/feature", "distill/attention")))
        assert entry["loss"] == pytest.approx(mix, rel=1e-4)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_report_to_targets_receive_the_kd_terms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher, student = pair()
    args = make_args(tmp_path, max_steps=3, report_to=["tensorboard"])  # logs under output_dir/runs
    trainer = transformers.Trainer(
        model=student, args=args, train_dataset=ToyText(), callbacks=slim_callbacks(student, RECIPE, teacher=teacher)
    )
    trainer.train()
    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/" + t for t in TERMS} <= tags
    assert len(events.Scalars("train/distill/kd")) == 3


def test_user_trainer_subclass_keeps_working(tmp_path):
    class MyTrainer(transformers.Trainer):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            MyTrainer.calls += 1
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    teacher, student = pair()
    callback = DistillationCallback(student, RECIPE["distill"], teacher=teacher)
    trainer = MyTrainer(
        model=student, args=make_args(tmp_path, max_steps=2), train_dataset=ToyText(), callbacks=[callback]
    )
    trainer.train()
    assert MyTrainer.calls == 2
    assert set(trainer.state.log_history[0]) >= TERMS


def run(tmp_path, name, max_steps, resume=None, save_steps=3):
    teacher, student = pair()
    args = make_args(tmp_path / name, max_steps=max_steps, save_strategy="steps", save_steps=save_steps)
    trainer = transformers.Trainer(
        model=student, args=args, train_dataset=ToyText(), callbacks=slim_callbacks(student, RECIPE, teacher=teacher)
    )
    trainer.train(resume_from_checkpoint=resume)
    return student, trainer


def test_resume_from_checkpoint_restores_projectors_and_continues_exactly(tmp_path):
    straight, _ = run(tmp_path, "a", max_steps=6)
    checkpoint = tmp_path / "a" / "run" / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")
    assert any(k.startswith("slimkit.projectors.") for k in saved) and saved["slimkit.step"].item() == 3

    teacher, student = pair()
    args = make_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    trainer = transformers.Trainer(
        model=student, args=args, train_dataset=ToyText(), callbacks=slim_callbacks(student, RECIPE, teacher=teacher)
    )
    restored = {}

    class Peek(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if not restored:  # the first step after loading the checkpoint
                restored.update({k: v.clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Peek())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0, msg=key)
    final_a, final_b = straight.state_dict(), student.state_dict()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert student.slimkit.step.item() == 6


def test_fsdp_is_refused_clearly(tmp_path):
    from slimkit.plugins.hf import SlimCallback

    teacher, student = pair()
    callback = slim_callbacks(student, RECIPE, teacher=teacher)[0]
    args = type("Args", (), {"fsdp": ["full_shard"]})()
    with pytest.raises(Exception, match="FSDP through the Trainer / accelerate needs an accelerator"):
        SlimCallback.on_train_begin(callback, args, None, None)


def test_causal_lm_trainer_with_kd(tmp_path):
    teacher, student = hf_model("gpt2", seed=1, n_layer=3), hf_model("gpt2", seed=2)
    ds = [{"input_ids": r, "labels": r} for r in ToyText().ids]
    recipe = {"distill": {"alpha": 0.5, "features": [{"student": "transformer.h.*", "teacher": "transformer.h.*"}]}}
    trainer = transformers.Trainer(
        model=student,
        args=make_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
        train_dataset=ds,
        callbacks=slim_callbacks(student, recipe, teacher=teacher),
    )
    trainer.train()
    entry = trainer.state.log_history[0]
    assert {"distill/kd", "distill/task", "distill/feature.transformer.h.0"} <= set(entry)
    assert entry["distill/kd"] > 0
