"""What a new user meets first (issue 10, items 19-22): unlabelled text for encoder
distillation, the OpenMP wait policy, dropout off on the Trainer route, quiet scripts."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import slimkit
import slimkit.omp
from slimkit import SlimkitError
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model, timm_model
from tests.models import ROOT, copy_tokenizer
from tests.test_recipe_hardening import _distill_script

# --- 19: a data set with only a text column -----------------------------------------------------------


def _text_only(path, n=40):
    path.write_text("".join(json.dumps({"text": f"sentence number {i} about topic {i % 5}"}) + "\n" for i in range(n)))
    return path


def _args(tmp_path, teacher, dataset):
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps({"distill": {"features": [{"student": "encoder.layer.0", "teacher": "encoder.layer.1"}]}})
    )
    return [
        *("--teacher", str(teacher), "--student", str(tmp_path / "student"), "--recipe", str(recipe)),
        *("--output-dir", str(tmp_path / "out"), "--dataset", str(dataset), "--max-steps", "2"),
        *("--batch-size", "4", "--max-length", "16"),
    ]


def test_an_unlabelled_text_dataset_distils_an_encoder_without_a_head(tmp_path, minilm_path):
    for name, layers in (("teacher", 2), ("student", 1)):
        hf_model("bert-base", seed=layers, vocab_size=30522, num_hidden_layers=layers).save_pretrained(tmp_path / name)
    copy_tokenizer(minilm_path, tmp_path / "teacher")
    metrics = _distill_script().main(_args(tmp_path, tmp_path / "teacher", _text_only(tmp_path / "texts.jsonl")))
    assert metrics["train_samples"] == 32 and metrics["eval_samples"] == 8
    assert -1.0 <= metrics["student"]["embedding_cosine"] <= 1.0
    assert "accuracy" not in metrics["student"]


def test_an_unlabelled_dataset_for_a_classifier_teacher_says_what_to_add(tmp_path, minilm_path):
    for name, layers in (("teacher", 2), ("student", 1)):
        hf_model("bert", seed=layers, vocab_size=30522, num_hidden_layers=layers).save_pretrained(tmp_path / name)
    copy_tokenizer(minilm_path, tmp_path / "teacher")
    args = _args(tmp_path, tmp_path / "teacher", _text_only(tmp_path / "texts.jsonl"))
    args[args.index(str(tmp_path / "r.json"))] = str(tmp_path / "kd.json")
    (tmp_path / "kd.json").write_text(json.dumps({"distill": {}}))
    with pytest.raises(SlimkitError, match="has no 'label' column.*classification head, so add a 'label' column"):
        _distill_script().main(args)


# --- 20: OMP_WAIT_POLICY ----------------------------------------------------------------------------


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SLIMKIT_OMP_WAIT_POLICY")}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.slow
def test_the_set_policy_makes_passive_the_default_before_torch_loads():
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _python(f"import slimkit; {show}", SLIMKIT_OMP_WAIT_POLICY="set") == "PASSIVE"
    assert _python(f"import slimkit; {show}", SLIMKIT_OMP_WAIT_POLICY="set", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _python(f"import torch, slimkit; {show}", SLIMKIT_OMP_WAIT_POLICY="set") == "None"  # too late to set
    assert _python(f"import slimkit; {show}", SLIMKIT_OMP_WAIT_POLICY="off") == "None"


def test_prepare_warns_once_with_the_fix_when_the_policy_is_unset_on_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("SLIMKIT_OMP_WAIT_POLICY", "warn")
    monkeypatch.setattr(slimkit.omp, "_warned", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load in (1.0, 2.2):  # quiet, then this process's own two threads running: no warning
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 1.0, 1.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # spinning is faster on a quiet machine
            slimkit.prepare(timm_model("resnet"), {"distill": {}}, teacher=timm_model("resnet"), measure=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        slimkit.prepare(timm_model("resnet"), {"distill": {}}, teacher=timm_model("resnet"), measure=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        slimkit.prepare(timm_model("resnet"), {"distill": {}}, teacher=timm_model("resnet"), measure=False)


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"SLIMKIT_OMP_WAIT_POLICY": "off"}])
def test_no_warning_when_the_policy_is_set_or_silenced(monkeypatch, env):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slimkit.omp, "_warned", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))  # busy: only the settings silence it
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimkit.prepare(timm_model("resnet"), {"distill": {}}, teacher=timm_model("resnet"), measure=False)


# --- 21: dropout off on the Trainer route -------------------------------------------------------------


def _with_dropout():
    return hf_model("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)


@pytest.mark.parametrize("dropout", ["off", "keep"])
def test_the_recipe_turns_dropout_off_for_the_trainer_route(dropout):
    student, teacher = _with_dropout(), hf_model("bert", seed=1)
    slim_callbacks(student, {"distill": {"dropout": dropout}}, teacher=teacher)
    student.train()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = student(ids).logits, student(ids).logits
    assert torch.equal(a, b) == (dropout == "off")
    probabilities = {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == ({0.0} if dropout == "off" else {0.3})


def test_disable_dropout_reaches_float_attributes_too():
    llama = hf_model("llama", attention_dropout=0.2)
    changed = slimkit.disable_dropout(llama)
    assert "model.layers.0.self_attn.attention_dropout" in changed
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in llama.model.layers)
    vit = timm_model("vit", drop_rate=0.2, drop_path_rate=0.1, attn_drop_rate=0.1)
    changed = slimkit.disable_dropout(vit)
    assert "head_drop.p" in changed and any(name.endswith("drop_prob") for name in changed)
    resnet = timm_model("resnet", drop_rate=0.2)  # a float read in forward_head
    assert "drop_rate" in slimkit.disable_dropout(resnet) and resnet.drop_rate == 0.0
    vit.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), vit(x))


def test_trainer_trains_with_dropout_off(tmp_path):
    from tests.test_hf_trainer import ToyText, make_args

    student, teacher = _with_dropout(), hf_model("bert", seed=1)
    callbacks = slim_callbacks(student, {"distill": {"dropout": "off"}}, teacher=teacher)
    trainer = transformers.Trainer(
        model=student, args=make_args(tmp_path, max_steps=2), train_dataset=ToyText(), callbacks=callbacks
    )
    trainer.train()
    assert trainer.state.global_step == 2 and student.bert.encoder.layer[0].output.dropout.p == 0.0


# --- 22: quiet scripts ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_distill_script_is_quiet_in_a_log_file(tmp_path, minilm_path):
    """A text run (transformers, hence torchao, imported; QAT; INT8 save) writing to a pipe, as
    a log file would get it: no dependency notices, a few progress lines rather than one per step."""
    for name, layers in (("teacher", 2), ("student", 1)):
        hf_model("bert-base", seed=layers, vocab_size=30522, num_hidden_layers=layers).save_pretrained(tmp_path / name)
    copy_tokenizer(minilm_path, tmp_path / "teacher")
    recipe = tmp_path / "r.json"
    features = [{"student": "encoder.layer.0", "teacher": "encoder.layer.1"}]
    recipe.write_text(json.dumps({"distill": {"features": features}, "quant": {"start_step": 20}}))
    args = ["--teacher", "teacher", "--student", "student", "--recipe", str(recipe), "--output-dir", "out"]
    args += ["--max-steps", "40", "--batch-size", "4", "--max-length", "16"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # slimkit's own advice about it is tested above
    script = str(ROOT / "scripts" / "distill.py")
    done = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    for noise in ("Warning", "deprecated", "Enum subclass", "No CUDA runtime", "Loading weights", "W1"):
        assert noise not in log, f"{noise!r} in the log:\n{log[-3000:]}"
    progress = [line for line in log.replace("\r", "\n").splitlines() if line.startswith("distill:")]
    assert 1 <= len(progress) <= 12, log[-3000:]  # a few progress lines, not one per step
