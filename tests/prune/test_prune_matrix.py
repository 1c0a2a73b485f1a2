"""Every supported family through the same flow: prepare, train a step, convert, save, load."""

import dataclasses
import json

import pytest
import torch
import transformers
from prune_helpers import CASES, run_case

from tests.families import logits


def _check_native_load(case, result, folder):
    """A uniformly pruned HF model whose config can express the new widths loads without slimkit."""
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    plain = cls.from_pretrained(folder)
    torch.testing.assert_close(logits(plain, result["inputs"]), logits(result["model"], result["inputs"]))


def _check_generate(result):
    prompt = result["inputs"]["input_ids"][:1, :4]
    outs = [
        m.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for m in (result["model"], result["again"])
    ]
    assert outs[0].shape == (1, 7)
    torch.testing.assert_close(outs[0], outs[1])


def _check_timm_features(result):
    for model in (result["model"], result["again"]):
        features = model.forward_features(result["inputs"])
        channel_dim = 1 if features.dim() == 4 else -1
        assert features.shape[channel_dim] == model.num_features


@pytest.mark.parametrize("name", list(CASES))
def test_matrix(name, tmp_path):
    case = CASES[name]
    folder = tmp_path / name
    result = run_case(case, folder)
    logged = result["logged"]
    for key in case.prune:
        assert logged[f"prune/{key}"] > 0.2, logged
    assert 0 < logged["prune/params"] < 1
    config = json.loads((folder / "config.json").read_text())
    block = config["slimkit"]["pruning"]
    assert block["tensors"] and block["attributes"]
    if "heads" in case.prune:
        assert block["heads"] and all(q < 4 for q, _ in block["heads"].values())
    assert "channels / MLP neurons removed" in (folder / "README.md").read_text()
    if case.native_load:
        _check_native_load(case, result, folder)
    if case.task == "causal_lm":
        _check_generate(result)
    if name.startswith("timm"):
        _check_timm_features(result)
    if name == "hf_bert":  # BERT derives its head size from hidden_size / heads: config left as it was
        assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 64
        assert block["heads"]["bert.encoder.layer.0.attention.self"] == [2, 2]


def test_bert_mlp_only_rewrites_intermediate_size(tmp_path):
    """Uniformly pruned MLP neurons are expressible natively: plain transformers loads the folder."""

    def expect(m):
        assert m.bert.encoder.layer[0].intermediate.dense.out_features == 32
        assert m.bert.encoder.layer[0].attention.self.query.out_features == 32
        assert m.bert.pooler.dense.out_features == 32  # the pooler is excluded by default

    case = dataclasses.replace(CASES["hf_bert"], prune={"channels": 0.5}, expect=expect, min_macs_ratio=1.3)
    result = run_case(case, tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["slimkit"]["pruning"]["config"] == {"intermediate_size": 32}
    _check_native_load(case, result, tmp_path / "bert")
