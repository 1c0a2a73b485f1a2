"""Depth pruning (prune.layers): blocks ranked on data, skipped while training, removed at
convert, configs rewritten so that plain transformers loads a depth-pruned folder."""

import copy
import json

import pytest
import torch
import transformers

import slimkit
from slimkit import ConfigError, UnsupportedModelError
from slimkit.prune import rank_blocks
from tests.families import hf_model, timm_model, token_batch


def _last_hidden(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _batches(n=3, length=12):
    return [token_batch(4, length) for _ in range(n)]


def _identity_layer(bert, index):
    """Make BERT layer ``index`` an identity: with no attention / FFN output, a post-LN layer
    returns LayerNorm(x) of an x that the previous LayerNorm already normalised."""
    layer = bert.encoder.layer[index]
    with torch.no_grad():
        for dense in (layer.attention.output.dense, layer.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()


@pytest.mark.parametrize("importance", ["output_cosine", "block_influence"])
def test_ranking_picks_the_block_that_does_nothing(importance):
    model = hf_model("bert-base", num_hidden_layers=4)
    _identity_layer(model, 2)
    assert rank_blocks(model, _batches(), 1, importance=importance) == ["encoder.layer.2"]
    resnet = timm_model("resnet", layers=(1, 3, 1, 1), zero_init_last=False).eval()
    with torch.no_grad():  # layer2.2's residual branch ends in a BatchNorm with zero scale: x + 0
        resnet.layer2[2].bn2.weight.zero_()
        resnet.layer2[2].bn2.bias.zero_()
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    assert rank_blocks(resnet, images, 1, importance=importance) == ["layer2.2"]


def test_uniform_depth_pruning_loads_with_plain_automodel(tmp_path):
    model = hf_model("bert-base", num_hidden_layers=4)
    _identity_layer(model, 1)
    batches = _batches()
    slimkit.prepare(model, {"prune": {"layers": 0.5}}, example_inputs=batches[0])
    slimkit.calibrate(model, batches, num_batches=2)
    assert slimkit.log_values(model)["prune/layers"] == 0.5
    masked = _last_hidden(model, batches[2])
    small = slimkit.convert(model)
    assert len(small.encoder.layer) == 2 and small.config.num_hidden_layers == 2
    torch.testing.assert_close(_last_hidden(small, batches[2]), masked, rtol=1e-5, atol=1e-5)
    slimkit.save_pretrained(small, tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    layers = config["slimkit"]["pruning"]["layers"]["encoder.layer"]
    assert config["num_hidden_layers"] == 2 and layers["total"] == 4 and 1 in set(range(4)) - set(layers["kept"])
    plain = transformers.AutoModel.from_pretrained(tmp_path / "bert")
    torch.testing.assert_close(_last_hidden(plain, batches[2]), _last_hidden(small, batches[2]))
    assert "blocks removed | 2 of 4" in (tmp_path / "bert" / "README.md").read_text()


def test_depth_and_width_together_round_trip_through_slimkit(tmp_path):
    model = hf_model("bert", num_hidden_layers=3)
    batches = _batches()
    recipe = {"prune": {"layers": 1, "heads": 0.5, "channels": 0.5, "layer_importance": "block_influence"}}
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    model.eval()
    with torch.no_grad():
        masked = model(**batches[2]).logits
    small = slimkit.convert(model)
    assert len(small.bert.encoder.layer) == 2
    assert all(layer.attention.self.num_attention_heads == 2 for layer in small.bert.encoder.layer)
    with torch.no_grad():
        torch.testing.assert_close(small(**batches[2]).logits, masked, rtol=1e-5, atol=1e-5)
    slimkit.save_pretrained(small, tmp_path / "bert")
    block = json.loads((tmp_path / "bert" / "config.json").read_text())["slimkit"]["pruning"]
    assert sorted(block["heads"]) == [f"bert.encoder.layer.{i}.attention.self" for i in (0, 1)]
    again = slimkit.from_pretrained(tmp_path / "bert")
    with torch.no_grad():
        torch.testing.assert_close(again(**batches[2]).logits, small(**batches[2]).logits, rtol=0, atol=1e-6)
    from slimkit.cli import folder_info, format_info

    info = format_info(folder_info(tmp_path / "bert"))
    assert "bert.encoder.layer: 2 of 3 blocks kept" in info and "heads per layer 2/2" in info


def test_kd_leaves_out_the_blocks_depth_pruning_removed():
    """A removed block passes its input on until convert: a feature or attention KD pair on it
    would pull the block before it towards two teacher layers at once, so it is left out."""
    teacher = hf_model("bert-base", num_hidden_layers=4)
    _identity_layer(teacher, 2)
    student = copy.deepcopy(teacher)
    batches = _batches()
    recipe = {
        "prune": {"layers": 1},
        "distill": {
            "alpha": 0.0,
            "features": [{"student": "encoder.layer.*", "teacher": "encoder.layer.*", "loss": "mse"}],
            "attention": [{"student": "encoder.layer.*.attention", "teacher": "encoder.layer.*.attention"}],
        },
    }
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=batches[0])
    slimkit.calibrate(student, batches, num_batches=2)
    assert slimkit.prune.summary(student)["layers"]["removed"] == ["encoder.layer.2"]
    student.train()
    slimkit.compute_loss(student, student(**batches[2]), attention_mask=batches[2]["attention_mask"]).backward()
    terms = slimkit.log_values(student)
    kept = {f"encoder.layer.{i}" for i in (0, 1, 3)}
    assert {k.split(".", 1)[1] for k in terms if k.startswith("distill/feature.")} == kept
    assert {k.split(".", 1)[1].removesuffix(".attention") for k in terms if k.startswith("distill/attention.")} == kept


def test_per_layer_config_fields_follow_the_kept_layers(tmp_path):
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = transformers.Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=types,
    )
    model = transformers.Qwen2ForCausalLM(config)
    batches = [token_batch(2, 10) for _ in range(2)]
    slimkit.prepare(model, {"prune": {"layers": 2}}, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    removed = slimkit.prune.summary(model)["layers"]["removed"]
    kept = [i for i in range(4) if f"model.layers.{i}" not in removed]
    model.eval()
    with torch.no_grad():
        masked = model(**batches[1]).logits
    small = slimkit.convert(model)
    assert small.config.layer_types == [types[i] for i in kept]
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(small(**batches[1]).logits, masked, rtol=1e-5, atol=1e-5)
    slimkit.save_pretrained(small, tmp_path / "qwen")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    prompt = batches[1]["input_ids"][:1, :6]
    outs = [m.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0) for m in (small.eval(), plain)]
    torch.testing.assert_close(outs[0], outs[1])


def test_a_later_schedule_ranks_on_training_batches_and_resumes(tmp_path):
    """Cubic depth schedule from step 2: blocks are ranked by the influence measured on the
    training forwards, removed one after the other, and the state survives a state_dict."""
    model = hf_model("bert", num_hidden_layers=4)
    batches = _batches(4)
    recipe = {
        "prune": {
            "layers": 2,
            "layer_importance": "block_influence",
            "schedule": {"kind": "linear", "start_step": 2, "end_step": 4, "every": 1},
        }
    }
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    removed = []
    for step in range(5):
        batch = batches[step % 4]
        model.train()
        model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(model)
        removed.append(slimkit.log_values(model)["prune/layers"])
        if step == 2:
            state = {k: v.clone() for k, v in model.state_dict().items()}
    assert removed == [0.0, 0.0, 0.25, 0.5, 0.5]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in _removed_layer(model).parameters())

    resumed = hf_model("bert", num_hidden_layers=4)
    slimkit.prepare(resumed, recipe, example_inputs=batches[0])
    resumed.load_state_dict(state)
    assert slimkit.log_values(resumed)["prune/layers"] == 0.25
    first = slimkit.prune.summary(resumed)["layers"]["removed"]
    assert len(first) == 1 and set(first) < set(slimkit.prune.summary(model)["layers"]["removed"])


def _removed_layer(model):
    name = slimkit.prune.summary(model)["layers"]["removed"][0]
    return model.get_submodule(name)


def test_depth_errors_name_the_fix():
    batch = token_batch()
    albert = transformers.AlbertModel(
        transformers.AlbertConfig(
            vocab_size=100,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    with pytest.raises(UnsupportedModelError, match="one shared layer group 4 times.*num_hidden_layers"):
        slimkit.prepare(albert, {"prune": {"layers": 1}}, example_inputs=batch)
    with pytest.raises(ConfigError, match="has 2 removable blocks; removing 2 would leave none"):
        slimkit.prepare(hf_model("bert-base"), {"prune": {"layers": 2}}, example_inputs=batch)
    with pytest.raises(ConfigError, match="rounds down to 0 blocks"):
        slimkit.prepare(hf_model("bert-base", num_hidden_layers=3), {"prune": {"layers": 0.2}}, example_inputs=batch)
    model = hf_model("bert-base", num_hidden_layers=3)
    _identity_layer(model, 1)
    slimkit.prepare(model, {"prune": {"layers": 1, "exclude": ["encoder.layer.1"]}}, example_inputs=batch)
    slimkit.calibrate(model, _batches())
    assert slimkit.prune.summary(model)["layers"]["removed"] != ["encoder.layer.1"]


def test_make_student_keeps_the_layers_that_matter_on_data(minilm_path, tmp_path):
    """``make_student.py --num-layers`` drops the two layers whose removal moves MiniLM's outputs
    least on stdlib-docs sentences (checked against every 4-layer student scored the same way)."""
    import importlib.util
    import itertools

    from slimkit.plugins.hf import layer_subset_student
    from slimkit.plugins.shallow_student import text_calibration_batches
    from tests.models import ROOT

    spec = importlib.util.spec_from_file_location("make_student_script", ROOT / "scripts" / "make_student.py")
    make_student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_student)

    args = ["--teacher", str(minilm_path), "--num-layers", "4", "--calibration-sentences", "8"]
    out = make_student.main([*args, "--output-dir", str(tmp_path / "s")])
    student = slimkit.from_pretrained(out)
    teacher = slimkit.from_pretrained(minilm_path)
    batch = text_calibration_batches(str(minilm_path), "stdlib-docs", 8, 32, 128)[0]
    mask = batch["attention_mask"].bool()

    def cost(kept):
        with torch.no_grad():
            a = layer_subset_student(teacher, kept)(**batch).last_hidden_state
            b = teacher(**batch).last_hidden_state
        return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1))[mask].mean())

    best = min(([i for i in range(6) if i not in gone] for gone in itertools.combinations(range(6), 2)), key=cost)
    assert student.config.num_hidden_layers == 4 and (out / "tokenizer.json").exists()
    kept_weights = [layer.output.dense.weight for layer in student.encoder.layer]
    assert all(torch.equal(w, teacher.encoder.layer[k].output.dense.weight) for w, k in zip(kept_weights, best))


def test_timm_blocks_leave_their_stages_and_load_back(tmp_path):
    """timm configs cannot express depth: the manifest removes the same blocks from a fresh model."""
    model = timm_model("resnet", layers=(2, 2, 2, 2), zero_init_last=False)
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    slimkit.prepare(model, {"prune": {"layers": 2, "channels": 0.25}}, example_inputs=images[0])
    assert slimkit.prune.summary(model)["layers"]["removable"] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    slimkit.calibrate(model, images)
    model.eval()
    with torch.no_grad():
        masked = model(images[1])
    small = slimkit.convert(model)
    assert sum(len(getattr(small, f"layer{i}")) for i in range(1, 5)) == 6
    with torch.no_grad():
        torch.testing.assert_close(small(images[1]), masked, rtol=1e-5, atol=1e-5)
    slimkit.save_pretrained(small, tmp_path / "resnet")
    again = slimkit.from_pretrained(tmp_path / "resnet")
    with torch.no_grad():
        torch.testing.assert_close(again(images[1]), small(images[1]), rtol=0, atol=0)


def test_batchnorm_statistics_are_those_of_the_model_without_its_removed_blocks():
    """reconstruct recomputes BatchNorm statistics at the point; blocks that the same calibrate
    call removes must not be in the forward that computes them (the layers after a removed block
    see other inputs once it is gone)."""
    from slimkit.prune.reconstruct import recalibrate_batchnorms

    model = timm_model("resnet", layers=(2, 2, 2, 2), zero_init_last=False)
    images = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    recipe = {"layers": 2, "channels": 0.25, "importance": "activation", "reconstruct": True}
    slimkit.prepare(model, {"prune": recipe}, example_inputs=images[0])
    slimkit.calibrate(model, images)
    small = slimkit.convert(model).eval()
    assert sum(len(getattr(small, f"layer{i}")) for i in range(1, 5)) == 6
    expected = copy.deepcopy(small)
    recalibrate_batchnorms(expected, images, lambda net, batch: net(batch))
    norms = [(n, m) for n, m in small.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    twins = dict(expected.named_modules())
    assert len(norms) > 10
    for name, norm in norms:
        torch.testing.assert_close(norm.running_mean, twins[name].running_mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(norm.running_var, twins[name].running_var, rtol=1e-4, atol=1e-5, msg=name)


DEPTH_FAMILIES = [
    "hf_bert",
    "hf_gpt2",
    "hf_llama_gqa",
    "hf_vit",
    "hf_distilbert",
    "hf_deberta_v2",
    "hf_mpnet",
    "timm_vit",
    "timm_convnext",
    "timm_mobilenetv3",
]


@pytest.mark.parametrize("name", DEPTH_FAMILIES)
def test_one_block_leaves_every_family(name, tmp_path):
    """Each family loses one block: skipped == removed, and the folder loads back (HF: natively too)."""
    from prune_helpers import CASES

    from tests.families import logits

    case = CASES[name]
    model, inputs = case.build(), case.inputs()
    slimkit.prepare(model, {"prune": {"layers": 1}}, example_inputs=inputs, measure=False)
    slimkit.calibrate(model, [inputs])
    assert len(slimkit.prune.summary(model)["layers"]["removed"]) == 1
    masked = logits(model, inputs)
    small = slimkit.convert(model)
    torch.testing.assert_close(logits(small, inputs), masked, rtol=1e-5, atol=1e-5)
    slimkit.save_pretrained(small, tmp_path / name)
    torch.testing.assert_close(logits(slimkit.from_pretrained(tmp_path / name), inputs), logits(small, inputs))
    if name.startswith("hf_"):
        config = transformers.AutoConfig.from_pretrained(tmp_path / name)
        plain = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path / name)
        assert config.num_hidden_layers == 1
        torch.testing.assert_close(logits(plain, inputs), logits(small, inputs))
