"""KD on timm models through the plain-loop API: teacher isolation, projectors, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

import slimkit
from slimkit import IncompatibleError, ModuleNameError, SlimkitError, UnsupportedModelError
from tests.families import timm_model, train_steps

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])


def resnet_pair(features=True):
    teacher, student = timm_model("resnet-wide", seed=1), timm_model("resnet", seed=2)
    recipe = {"distill": {"temperature": 2.0, "alpha": 0.5}}
    if features:
        recipe["distill"]["features"] = [{"student": "layer3", "teacher": "layer3"}]
    return teacher, student, recipe


def test_teacher_is_frozen_untouched_and_never_part_of_the_student(tmp_path):
    teacher, student, recipe = resnet_pair()
    before = copy.deepcopy(teacher.state_dict())
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    train_steps(student, (X, Y), 3, optimizer=optimizer)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # bit-equal, BN running stats included
    assert all(p.grad is None for p in teacher.parameters())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_params & {id(p) for p in student.parameters()}
    assert not any(m is teacher for m in student.modules())
    assert not teacher.training  # student.train() never reaches it


def test_teacher_sees_the_same_batch_as_the_student():
    teacher, student, recipe = resnet_pair(features=False)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0]))
    student.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    student.train()
    augmented = X.flip(-1) + 0.1 * torch.randn_like(X)  # whatever augmentation the loop applies
    slimkit.compute_loss(student, student(augmented), labels=Y)
    assert seen["teacher"] is seen["student"]


def test_projectors_train_and_are_never_saved(tmp_path):
    teacher, student, recipe = resnet_pair()
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    projector = student.slimkit.projectors["layer3__to__layer3"]
    assert isinstance(projector, torch.nn.Conv2d) and (projector.in_channels, projector.out_channels) == (32, 64)
    start = projector.weight.detach().clone()
    train_steps(student, (X, Y), 3, lr=0.05, momentum=0.0)
    assert not torch.equal(projector.weight, start)
    assert any(k.startswith("slimkit.projectors.") for k in student.state_dict())  # checkpoints keep them
    small = slimkit.convert(student)
    assert slimkit.methods_of(small) == {} and "slimkit" not in dict(small.named_children())
    slimkit.save_pretrained(small, tmp_path / "s")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "s" / "model.safetensors")
    assert set(saved) == set(timm_model("resnet").state_dict())
    assert not any("slimkit" in k or "projector" in k for k in saved)


def test_compute_loss_mixes_kd_task_and_feature_terms():
    teacher, student, recipe = resnet_pair()
    recipe["distill"]["alpha"] = 0.3
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    student.train()
    out = student(X)
    loss = slimkit.compute_loss(student, out, labels=Y)
    terms = slimkit.log_values(student)
    assert set(terms) == {"distill/kd", "distill/task", "distill/feature.layer3"}
    with torch.no_grad():
        t = teacher(X)
    kd = 4.0 * F.kl_div(F.log_softmax(out / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    assert terms["distill/kd"] == pytest.approx(kd.item(), rel=1e-5)
    assert terms["distill/task"] == pytest.approx(F.cross_entropy(out, Y).item(), rel=1e-5)
    expected = 0.3 * terms["distill/kd"] + 0.7 * terms["distill/task"] + terms["distill/feature.layer3"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_without_labels_the_logit_term_has_full_weight():
    teacher, student, recipe = resnet_pair(features=False)
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    student.train()
    loss = slimkit.compute_loss(student, student(X))
    assert loss.item() == pytest.approx(slimkit.log_values(student)["distill/kd"], rel=1e-6)


def test_eval_and_no_grad_forwards_skip_the_teacher():
    teacher, student, recipe = resnet_pair(features=False)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    calls.clear()
    student.eval()
    student(X)
    student.train()
    with torch.no_grad():
        student(X)
    assert calls == []
    student(X)
    assert calls == [1]


@pytest.mark.parametrize(
    "kind, features, attention",
    [
        ("convnext", [{"student": "stages.*", "teacher": "stages.*"}], []),
        (
            "vit",
            [{"student": "blocks.*", "teacher": "blocks.*"}],
            [{"student": "blocks.*.attn", "teacher": "blocks.*.attn"}],
        ),
    ],
)
def test_timm_families_train_with_features_and_attention(kind, features, attention):
    wide = {"convnext": {"dims": (16, 32, 64, 128)}, "vit": {"embed_dim": 48, "num_heads": 6, "depth": 4}}[kind]
    teacher = timm_model(kind, seed=1, **wide)
    student = timm_model(kind, seed=2)
    recipe = {"distill": {"features": features, "attention": attention}}
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    before = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("slimkit")}
    train_steps(student, (X, Y), 2, lr=0.01, momentum=0.0)
    terms = slimkit.log_values(student)
    assert terms["distill/kd"] > 0 and terms["distill/task"] > 0
    feature_terms = [k for k in terms if k.startswith("distill/feature.")]
    assert len(feature_terms) == (4 if kind == "convnext" else 2)
    if attention:
        assert [k for k in terms if k.startswith("distill/attention.")] == [
            "distill/attention.blocks.0.attn",
            "distill/attention.blocks.1.attn",
        ]
    after = student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_timm_attention_probabilities_match_an_explicit_computation():
    vit = timm_model("vit", seed=0).eval()
    store = {}
    adapter = slimkit.adapters.get_adapter(vit)
    handles = adapter.capture_attention(vit, "blocks.1.attn", store)
    tokens = {}
    vit.blocks[1].attn.register_forward_pre_hook(lambda m, a: tokens.__setitem__("x", a[0]))
    with torch.no_grad():
        vit(X[:2])
    attn, x = vit.blocks[1].attn, tokens["x"]
    q, k, _ = attn.qkv(x).reshape(2, x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1)
    torch.testing.assert_close(store["blocks.1.attn"], expected)
    assert torch.allclose(store["blocks.1.attn"].sum(-1), torch.ones(2, 4, x.shape[1]))
    for h in handles:
        h.remove()


def test_module_names_not_in_the_model_list_close_matches():
    teacher, student, _ = resnet_pair()
    recipe = {"distill": {"features": [{"student": "layer_3", "teacher": "layer3"}]}}
    with pytest.raises(ModuleNameError) as err:
        slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    msg = str(err.value)
    assert "distill.features[0].student" in msg and "'layer_3' is not in ResNet" in msg and "layer3" in msg
    recipe = {"distill": {"features": [{"student": "blocks.*", "teacher": "layer*"}]}}
    with pytest.raises(ModuleNameError, match="distill.features.0..student: student module 'blocks.0'"):
        slimkit.prepare(timm_model("resnet"), recipe, teacher=teacher, example_inputs=X[:2])


def test_features_no_projector_can_align_are_refused():
    teacher = timm_model("vit", seed=1)
    student = timm_model("resnet", seed=2)
    recipe = {"distill": {"features": [{"student": "layer4", "teacher": "blocks.1"}]}}
    with pytest.raises(IncompatibleError, match=r"student 'layer4' \(\[B, C, H, W\] maps .* teacher 'blocks.1'"):
        slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])


def test_other_error_paths():
    teacher, student, recipe = resnet_pair(features=False)
    with pytest.raises(SlimkitError, match="no teacher was given"):
        slimkit.prepare(student, recipe, example_inputs=X[:2])
    attention = {"distill": {"attention": [{"student": "layer1", "teacher": "layer1"}]}}
    with pytest.raises(UnsupportedModelError, match="not a timm Attention block"):
        slimkit.prepare(timm_model("resnet"), attention, teacher=teacher, example_inputs=X[:2])
    other = timm_model("resnet", num_classes=7)
    with pytest.raises(IncompatibleError, match="student logits have 7 classes but teacher logits have 10"):
        slimkit.prepare(other, recipe, teacher=teacher, example_inputs=X[:2])
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    with pytest.raises(SlimkitError, match="already prepared for 'distill'"):
        slimkit.prepare(student, recipe, teacher=teacher, example_inputs=X[:2])
    with pytest.raises(SlimkitError, match="was not prepared by slimkit"):
        slimkit.convert(timm_model("resnet"))
    with pytest.raises(SlimkitError, match="must not be a submodule of the student"):
        holder = timm_model("resnet")
        holder.add_module("inner_teacher", timm_model("resnet"))
        slimkit.prepare(holder, recipe, teacher=holder.inner_teacher, example_inputs=X[:2])


def test_sequential_models_keep_working_when_prepared():
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
    teacher = timm_model("resnet", seed=1).eval()
    with torch.no_grad():
        before = student(X)
    slimkit.prepare(student, {"distill": {"alpha": 0.5}}, teacher=teacher, example_inputs=X[:2])
    with torch.no_grad():
        assert torch.equal(student.eval()(X), before)
    train_steps(student, (X, Y), 1, lr=0.05, momentum=0.0)
    assert "distill/kd" in slimkit.log_values(student)
    small = slimkit.convert(student)
    assert len(small) == 4


def test_example_inputs_the_models_cannot_run_are_a_clear_error():
    teacher, student, recipe = resnet_pair(features=False)
    with pytest.raises(IncompatibleError, match=r"the student \(ResNet\) could not run on the example inputs"):
        slimkit.prepare(student, recipe, teacher=teacher, example_inputs=torch.randn(2, 5, 32, 32))


def test_pooled_relation_term_trains_a_headless_encoder_towards_the_teachers_similarities():
    """distill.features with pool: mean and loss: relation beside the per-token term on the same
    module: two terms, the relation one equal to the pairwise cosines of the masked-mean
    sentence embeddings, and falling as the student trains on it."""
    import transformers

    from tests.families import tiny_bert_config

    torch.manual_seed(0)
    teacher = transformers.BertModel(tiny_bert_config()).eval()
    torch.manual_seed(1)
    student = transformers.BertModel(tiny_bert_config())
    ids = torch.randint(5, 90, (8, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[::2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    layer = "encoder.layer.1"
    recipe = {
        "distill": {
            "features": [
                {"student": layer, "teacher": layer, "loss": "cosine"},
                {"student": layer, "teacher": layer, "loss": "relation", "pool": "mean", "weight": 10.0},
            ]
        }
    }
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=batch)
    optimizer = torch.optim.Adam([p for n, p in student.named_parameters() if "slimkit" not in n], lr=3e-3)
    history = []
    for _ in range(40):
        student.train()
        out = student(**batch)
        loss = slimkit.compute_loss(student, out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(slimkit.log_values(student))
    first = history[0]
    assert set(first) == {f"distill/feature.{layer}", f"distill/feature.{layer}.mean.relation"}

    def sentence_similarities(model):
        hidden = model(**batch).last_hidden_state  # BERT's last layer output, no final norm
        keep = mask.unsqueeze(-1).float()
        pooled = F.normalize((hidden * keep).sum(1) / keep.sum(1), dim=-1)
        return pooled @ pooled.T

    torch.manual_seed(1)
    start = transformers.BertModel(tiny_bert_config())  # the student as it was before training
    with torch.no_grad():
        expected = (sentence_similarities(start) - sentence_similarities(teacher)).pow(2).mean()
    assert first[f"distill/feature.{layer}.mean.relation"] == pytest.approx(10.0 * expected.item(), rel=1e-4)
    last = history[-1][f"distill/feature.{layer}.mean.relation"]
    assert last < 0.2 * first[f"distill/feature.{layer}.mean.relation"]
