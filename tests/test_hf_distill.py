"""KD on Hugging Face models: attention capture, the forward hook's mixed loss, token tasks."""

import pytest
import torch

import slimkit
from slimkit.adapters import get_adapter
from tests.families import hf_model

IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 10])


@pytest.mark.parametrize(
    "kind, layer",
    [("bert", "bert.encoder.layer.1.attention"), ("gpt2", "transformer.h.1"), ("llama", "model.layers.1.self_attn")],
)
def test_captured_probabilities_equal_eager_attentions_and_other_layers_are_untouched(kind, layer):
    model = hf_model(kind).eval()
    with torch.no_grad():
        reference = model(input_ids=IDS, attention_mask=MASK).logits
    eager = hf_model(kind)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        expected = eager.eval()(input_ids=IDS, attention_mask=MASK, output_attentions=True).attentions[1]
    store = {}
    adapter = get_adapter(model)
    adapter.capture_attention(model, layer, store)
    assert model.config._attn_implementation == "slimkit_capture"
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(store[layer], expected)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert store[layer].shape == (3, 4, 10, 10)  # GQA: K/V groups expanded to the 4 query heads
    adapter.release_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_hook_writes_the_mixed_loss_into_hf_outputs():
    teacher, student = hf_model("bert", seed=1, num_hidden_layers=4, hidden_size=48), hf_model("bert", seed=2)
    recipe = {
        "distill": {
            "alpha": 0.4,
            "temperature": 2.0,
            "features": [{"student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*"}],
            "attention": [{"student": "bert.encoder.layer.*.attention", "teacher": "bert.encoder.layer.*.attention"}],
        }
    }
    slimkit.prepare(student, recipe, teacher=teacher)
    student.train()
    labels = torch.tensor([0, 1, 2])
    out = student(input_ids=IDS, attention_mask=MASK, labels=labels)
    terms = slimkit.log_values(student)
    assert sorted(terms) == sorted(
        [
            "distill/kd",
            "distill/task",
            "distill/feature.bert.encoder.layer.0",
            "distill/feature.bert.encoder.layer.1",
            "distill/attention.bert.encoder.layer.0.attention",
            "distill/attention.bert.encoder.layer.1.attention",
        ]
    )
    expected = 0.4 * terms["distill/kd"] + 0.6 * terms["distill/task"]
    expected += sum(v for k, v in terms.items() if k.startswith(("distill/feature", "distill/attention")))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert slimkit.compute_loss(student, out, labels=labels) is out.loss  # not mixed twice
    # 2 student layers -> teacher layers 1 and 3 (uniform map), 32 -> 48 wide projectors
    assert sorted(student.slimkit.projectors) == [
        "bert_encoder_layer_0__to__bert_encoder_layer_1",
        "bert_encoder_layer_1__to__bert_encoder_layer_3",
    ]
    small = slimkit.convert_(student)  # in place: the user's teacher gets its attention back
    assert small.config._attn_implementation == "sdpa" and teacher.config._attn_implementation == "sdpa"


def test_embedding_model_distils_features_only():
    teacher, student = hf_model("bert-base", seed=1), hf_model("bert-base", seed=2, num_hidden_layers=1)
    recipe = {"distill": {"features": [{"student": "encoder.layer.0", "teacher": "encoder.layer.1", "loss": "cosine"}]}}
    slimkit.prepare(student, recipe, teacher=teacher)
    student.train()
    out = student(input_ids=IDS, attention_mask=MASK)
    assert out.loss.item() == pytest.approx(slimkit.log_values(student)["distill/feature.encoder.layer.0"])
    out.loss.backward()
    with pytest.raises(slimkit.IncompatibleError, match="returns no logits, and the recipe has no distill.features"):
        slimkit.prepare(hf_model("bert-base"), {"distill": {}}, teacher=teacher)


def test_causal_lm_kd_through_the_hook_uses_shifted_positions():
    teacher, student = hf_model("gpt2", seed=1, n_layer=3), hf_model("gpt2", seed=2)
    slimkit.prepare(student, {"distill": {"alpha": 1.0, "temperature": 1.0}}, teacher=teacher)
    student.train()
    labels = IDS.masked_fill(MASK == 0, -100)
    out = student(input_ids=IDS, attention_mask=MASK, labels=labels)
    with torch.no_grad():
        t_logits = teacher(input_ids=IDS, attention_mask=MASK).logits
    s, t = out.logits[:, :-1], t_logits[:, :-1]
    valid = labels[:, 1:] != -100
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)[valid].mean()
    assert out.loss.item() == pytest.approx(kl.item(), rel=1e-5)


def test_num_items_in_batch_normalises_kd_like_the_task_loss():
    """transformers' Trainer passes num_items_in_batch (label count of the accumulated batch):
    the KD terms are then summed per item and divided by it, like the task loss."""
    teacher, student = hf_model("gpt2", seed=1), hf_model("gpt2", seed=2)
    slimkit.prepare(student, {"distill": {"alpha": 1.0, "temperature": 1.0}}, teacher=teacher)
    student.train()
    plain = student(input_ids=IDS, labels=IDS).loss
    scaled = student(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(27 * 2))  # 2 micro-batches
    assert scaled.loss.item() == pytest.approx(plain.item() / 2, rel=1e-5)


def test_hf_vit_classifier_distils_with_features_and_attention():
    teacher, student = hf_model("vit", seed=1, num_hidden_layers=4), hf_model("vit", seed=2, hidden_size=16)
    recipe = {
        "distill": {
            "features": [{"student": "vit.layers.*", "teacher": "vit.layers.*"}],
            "attention": [{"student": "vit.layers.*.attention", "teacher": "vit.layers.*.attention"}],
        }
    }
    slimkit.prepare(student, recipe, teacher=teacher)
    student.train()
    pixels = torch.randn(3, 3, 16, 16)
    out = student(pixel_values=pixels, labels=torch.tensor([0, 1, 4]))
    out.loss.backward()
    terms = slimkit.log_values(student)
    assert {"distill/kd", "distill/task", "distill/attention.vit.layers.1.attention"} <= set(terms)
    assert student.slimkit.projectors["vit_layers_1__to__vit_layers_3"].weight.shape == (32, 16)
    assert student.slimkit.projectors["vit_layers_1__to__vit_layers_3"].weight.grad is not None


def test_layer_subset_student_copies_the_kept_layers(tmp_path, minilm_path):
    import subprocess
    import sys

    from slimkit.plugins.hf import layer_subset_student
    from tests.models import ROOT

    gpt2 = hf_model("gpt2", n_layer=4)
    student = layer_subset_student(gpt2, [0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.transformer.h) == 2
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, gpt2.transformer.h[3].attn.c_attn.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    with pytest.raises(slimkit.SlimkitError, match=r"the teacher has layers 0..3"):
        layer_subset_student(gpt2, [4])

    out = tmp_path / "student"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_student.py"),
            "--teacher",
            str(minilm_path),
            "--layers",
            "1,3,5",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    made = slimkit.from_pretrained(out)
    teacher = slimkit.from_pretrained(minilm_path)
    assert made.config.num_hidden_layers == 3 and (out / "tokenizer.json").exists()
    assert torch.equal(made.encoder.layer[2].output.dense.weight, teacher.encoder.layer[5].output.dense.weight)
