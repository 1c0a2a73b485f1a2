"""One recipe, one run: distill -> prune -> QAT -> INT8, in a plain loop and on a stock Trainer."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import slimkit
from slimkit.cli import folder_info, format_info
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model, timm_model
from tests.test_hf_trainer import ToyText, make_args

X = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 10

CNN_RECIPE = {
    "distill": {"alpha": 0.5, "features": [{"student": "layer3", "teacher": "layer3"}]},
    "prune": {"channels": 0.5, "schedule": {"kind": "cubic", "start_step": 2, "end_step": 6, "every": 2}},
    "quant": {"start_step": 7, "freeze_observers_step": 10, "freeze_bn_step": 10},
}
BERT_RECIPE = {
    "distill": {"alpha": 0.5, "features": [{"student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*"}]},
    "prune": {"channels": 0.5, "heads": 0.5, "schedule": {"kind": "cubic", "start_step": 1, "end_step": 3, "every": 1}},
    "quant": {"start_step": 4, "freeze_observers_step": 6, "freeze_bn_step": 6},
}


def test_plain_loop_runs_the_whole_recipe_and_saves_an_int8_pruned_folder(tmp_path):
    teacher, student = timm_model("resnet-wide", seed=1), timm_model("resnet", seed=2)
    slimkit.prepare(student, CNN_RECIPE, teacher=teacher, example_inputs=X[:2])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    phases = []
    student.train()
    for _ in range(12):
        loss = slimkit.compute_loss(student, student(X), labels=Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(student)
        values = slimkit.log_values(student)
        phases.append((values["prune/channels"], values["quant/phase"]))
        assert values["distill/kd"] >= 0 and "distill/feature.layer3" in values
    assert phases[0] == (0.0, 0.0)  # KD only
    assert 0 < phases[3][0] < 0.5 and phases[3][1] == 0.0  # pruning on its cubic schedule
    assert phases[6] == (0.5, 1.0)  # QAT after pruning's last step
    assert phases[-1] == (0.5, 2.0)  # observers frozen
    student.eval()
    with torch.no_grad():
        fake_quant = student(X)
    small = slimkit.convert(student)
    assert type(small).__name__ == "ResNet" and type(small.layer1[0].conv1).__name__ == "Int8Conv2d"
    assert small.layer4[0].conv1.weight.dtype == torch.int8 and small.layer4[0].conv1.weight.shape[0] == 32
    with torch.no_grad():
        int8 = small(X)
    assert (int8.argmax(-1) == fake_quant.argmax(-1)).float().mean() >= 0.99
    slimkit.save_pretrained(small, tmp_path / "m", report={"accuracy": 0.5})
    again = slimkit.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(X), int8)

    block = json.loads((tmp_path / "m" / "config.json").read_text())["slimkit"]
    assert {"pruning", "quantization", "report", "recipe"} <= set(block)
    report = block["report"]
    assert report["before"]["parameters"] > 3 * report["after"]["parameters"]
    assert report["before"]["macs"] > report["after"]["macs"] > 0
    assert report["before"]["size_bytes"] > 10 * report["after"]["size_bytes"]
    assert report["after"]["latency_ms"] > 0 and report["latency"]["batch"] == 2
    assert report["kept"]["channels"]["layer4.0.conv1"] == [64, 32]
    assert report["metrics"] == {"accuracy": 0.5}
    card = (tmp_path / "m" / "README.md").read_text()
    table = format_info(folder_info(tmp_path / "m"))
    for text in (card, table):
        assert "parameters" in text and "MACs per forward" in text and "x smaller" in text and "CPU latency" in text
        assert "accuracy" in text and "channels / MLP neurons removed" in text
    assert "int8 layers" in table and "BatchNorms folded" in table
    assert (tmp_path / "m" / "kept.png").read_bytes()[:4] == b"\x89PNG"


def trainer_run(tmp_path, name, max_steps=8, resume=None):
    teacher, student = hf_model("bert", seed=1, num_hidden_layers=4, hidden_size=48), hf_model("bert", seed=2)
    args = make_args(tmp_path / name, max_steps=max_steps, save_strategy="steps", save_steps=5)
    callbacks = slim_callbacks(student, BERT_RECIPE, teacher=teacher)
    trainer = transformers.Trainer(model=student, args=args, train_dataset=ToyText(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return student, trainer


def test_stock_trainer_runs_the_whole_recipe_and_resumes_exactly(tmp_path):
    straight, trainer = trainer_run(tmp_path, "a")
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["prune/heads"] == 0.0 and logs[0]["quant/phase"] == 0.0
    assert logs[-1]["prune/heads"] == 0.5 and logs[-1]["prune/channels"] == 0.5 and logs[-1]["quant/phase"] == 2.0
    assert all("distill/kd" in e and "distill/feature.bert.encoder.layer.1" in e for e in logs)

    checkpoint = tmp_path / "a" / "run" / "checkpoint-5"  # mid-QAT: after pruning, before the observers froze
    saved = load_file(checkpoint / "model.safetensors")
    assert saved["slimkit.step"].item() == 5
    assert any(k.startswith("slimkit.prune.") for k in saved) and any(
        k.startswith("slimkit.projectors.") for k in saved
    )
    assert any("input_quantizer" in k for k in saved)  # observer statistics travel with the checkpoint
    resumed, _ = trainer_run(tmp_path, "b", resume=str(checkpoint))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)

    small_a, small_b = slimkit.convert(straight), slimkit.convert(resumed)
    ids = ToyText().ids[:4]
    with torch.no_grad():
        assert torch.allclose(small_a(input_ids=ids).logits, small_b(input_ids=ids).logits, atol=1e-5)
    assert small_a.config.num_attention_heads == 4  # BERT's heads are rebuilt from slimkit's manifest
    assert small_a.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert type(small_a.bert.encoder.layer[0].intermediate.dense).__name__ == "Int8Linear"
    slimkit.save_pretrained(small_a, tmp_path / "int8")
    again = slimkit.from_pretrained(tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, small_a(input_ids=ids).logits)


@pytest.mark.parametrize("bad", ["quant_before_prune_ends", "fsdp"])
def test_combinations_that_cannot_work_are_refused_up_front(bad, tmp_path):
    if bad == "quant_before_prune_ends":
        recipe = {**BERT_RECIPE, "quant": {"start_step": 2}}
        with pytest.raises(slimkit.ConfigError, match=r"quant.start_step: QAT starts at step 2 .* until step 3"):
            slimkit.Recipe.from_dict(recipe)
    else:
        teacher, student = hf_model("bert", seed=1), hf_model("bert", seed=2)
        callbacks = slim_callbacks(student, BERT_RECIPE, teacher=teacher)
        with pytest.raises(slimkit.SlimkitError, match="FSDP through the Trainer / accelerate needs an accelerator"):
            callbacks[0].on_train_begin(type("Args", (), {"fsdp": ["full_shard"]})(), None, None)


def test_shipped_recipes_load_and_fit_their_models(minilm_path):
    from tests.models import ROOT

    recipes = {p.stem: slimkit.Recipe.from_file(p) for p in sorted((ROOT / "recipes").glob("*.yaml"))}
    assert {"digits_kd", "digits_pipeline", "vit_pipeline", "minilm_pipeline"} <= set(recipes)
    for recipe in recipes.values():
        assert slimkit.Recipe.from_dict(recipe.to_dict()) == recipe

    def prepare_and_step(student, teacher, recipe, inputs):
        slimkit.prepare(student, recipe, teacher=teacher, example_inputs=inputs)
        student.train()
        out = student(**inputs) if isinstance(inputs, dict) else student(inputs)
        slimkit.compute_loss(student, out, labels=None).backward()
        slimkit.step(student)
        return slimkit.log_values(student)

    vit_teacher = timm_model("vit", seed=1, depth=4, embed_dim=48, num_heads=4)
    values = prepare_and_step(timm_model("vit", seed=2), vit_teacher, recipes["vit_pipeline"], X[:2])
    assert "distill/attention.blocks.1.attn" in values and "prune/heads" in values

    teacher = slimkit.from_pretrained(minilm_path)
    student = slimkit.from_pretrained(minilm_path)  # all 6 layers: the recipe prunes with calibration data
    ids = {"input_ids": torch.randint(1000, 2000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    slimkit.prepare(student, recipes["minilm_pipeline"], teacher=teacher, example_inputs=ids)
    assert slimkit.needs_calibration(student)
    slimkit.calibrate(student, [ids])
    student.train()
    slimkit.compute_loss(student, student(**ids)).backward()
    slimkit.step(student)
    values = slimkit.log_values(student)
    assert "distill/feature.encoder.layer.5" in values and values["prune/heads"] == 0.25
