"""``quant.embeddings``: weight-only INT8 embeddings, one symmetric scale per row."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import agreement, logits_of
from torch import nn

import slimkit
from slimkit.errors import UnsupportedModelError
from slimkit.quant import onnx_session, run_onnx
from slimkit.quant.embeddings import fake_quantize_rows, is_int8_embedding, is_qat_embedding, quantize_rows, row_scale
from tests.families import VOCAB, hf_model, token_batch

EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


class Bag(nn.Module):
    """An embedding and a Linear head (something besides the embedding to quantize)."""

    def __init__(self, **embedding_kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16, **embedding_kwargs)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def _ptq_bert(embeddings: bool = True, **quant):
    model = hf_model("bert").eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq", "embeddings": embeddings, **quant}})
    slimkit.calibrate(model, [token_batch(batch=4, seed=i) for i in range(3)])
    return model


def test_per_row_numerics_match_torch_fake_quantize_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(64, 24) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different ranges
    weight[5] = 0.0  # an all-zero row must not divide by zero
    scale = row_scale(weight)
    reference = torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(64, dtype=torch.int32), 0, -127, 127)
    ours = fake_quantize_rows(weight)
    # torch multiplies by 1/s where we divide by s: a value within float error of a rounding
    # boundary may land one step away, nothing more
    steps = ((ours - reference).abs() / scale.unsqueeze(1)).round()
    assert steps.max() <= 1 and (steps == 0).float().mean() > 0.999
    assert torch.equal(quantize_rows(weight, scale).float() * scale.unsqueeze(1), ours)
    assert quantize_rows(weight, scale).abs().amax(1)[torch.arange(64) != 5].eq(127).all()
    assert torch.equal(ours[5], torch.zeros(24))


def test_fake_quant_and_converted_embeddings_are_equal_bit_for_bit():
    model = _ptq_bert()
    embeddings = model.bert.embeddings
    assert all(is_qat_embedding(getattr(embeddings, n)) for n in EMBEDDINGS)
    ids = token_batch(batch=8, length=20, seed=7)["input_ids"]
    fake = embeddings.word_embeddings(ids)
    assert not torch.equal(fake, nn.functional.embedding(ids, embeddings.word_embeddings.weight))
    int8 = slimkit.convert(model)
    word = int8.bert.embeddings.word_embeddings
    assert is_int8_embedding(word) and isinstance(word, nn.Embedding) and type(word).__name__ == "Int8Embedding"
    assert word.weight.dtype == torch.int8 and word.weight.shape == (VOCAB, 32)
    assert word.weight_scale.dtype == torch.float32 and word.weight_scale.shape == (VOCAB,)
    assert torch.equal(word(ids), fake)


def test_ptq_bert_parity_and_smaller_file(tmp_path):
    held_out = token_batch(batch=32, length=12, seed=99)
    fake_model = _ptq_bert()
    fake = logits_of(fake_model, held_out)
    int8 = slimkit.convert(fake_model)
    same, diff = agreement(fake, logits_of(int8, held_out))
    assert same >= 0.99 and diff < 1e-3, (same, diff)
    float_embeddings = slimkit.convert(_ptq_bert(embeddings=False))

    slimkit.save_pretrained(int8, tmp_path / "emb")
    slimkit.save_pretrained(float_embeddings, tmp_path / "plain")
    saved = (tmp_path / "emb" / "model.safetensors").stat().st_size
    plain = (tmp_path / "plain" / "model.safetensors").stat().st_size
    tables = [float_embeddings.bert.embeddings.get_submodule(n).weight for n in EMBEDDINGS]
    # each fp32 table (4 bytes / value) becomes int8 (1 byte) plus one fp32 scale per row
    expected = sum(t.numel() * 3 - t.shape[0] * 4 for t in tables)
    assert abs((plain - saved) - expected) < 2048, (plain, saved, expected)


def test_save_load_and_deepcopy_restore_equal_outputs(tmp_path):
    int8 = slimkit.convert(_ptq_bert())
    held_out = token_batch(batch=8, length=10, seed=3)
    expected = logits_of(int8, held_out)
    slimkit.save_pretrained(int8, tmp_path / "out")
    block = slimkit.hub.read_config(tmp_path / "out")["slimkit"]["quantization"]
    assert block["format"] == 3 and block["embeddings"] == [f"bert.embeddings.{n}" for n in EMBEDDINGS]
    from slimkit.cli import folder_info, format_info

    assert "3 int8 embeddings" in format_info(folder_info(tmp_path / "out"))
    again = slimkit.from_pretrained(tmp_path / "out")
    word = again.bert.embeddings.word_embeddings
    assert is_int8_embedding(word) and word.weight.dtype == torch.int8
    assert torch.equal(logits_of(again, held_out), expected)
    assert torch.equal(logits_of(copy.deepcopy(int8), held_out), expected)


def test_a_folder_without_int8_embeddings_stays_format_2(tmp_path):
    int8 = slimkit.convert(_ptq_bert(embeddings=False))
    slimkit.save_pretrained(int8, tmp_path / "out")
    block = slimkit.hub.read_config(tmp_path / "out")["slimkit"]["quantization"]
    assert block["format"] == 2 and "embeddings" not in block
    again = slimkit.from_pretrained(tmp_path / "out")
    assert not is_int8_embedding(again.bert.embeddings.word_embeddings)
    held_out = token_batch(batch=4, length=10, seed=3)
    assert torch.equal(logits_of(again, held_out), logits_of(int8, held_out))


def test_onnx_export_of_int8_embeddings_agrees_with_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    int8 = slimkit.convert(_ptq_bert())
    held_out = token_batch(batch=16, length=10, seed=5)
    path = slimkit.export_onnx(int8, tmp_path / "model.onnx", held_out)
    onnx = torch.from_numpy(run_onnx(onnx_session(path, threads=2), held_out)[0])
    same, diff = agreement(logits_of(int8, held_out), onnx)
    assert same >= 0.99 and diff < 1e-3, (same, diff)
    import onnx as onnx_lib

    graph = onnx_lib.load(str(path)).graph
    int8_tables = [i for i in graph.initializer if i.data_type == onnx_lib.TensorProto.INT8 and i.dims == [VOCAB, 32]]
    assert int8_tables, "the word embedding table is not int8 in the ONNX file"


def test_int8_embedding_under_torch_compile():
    int8 = slimkit.convert(_ptq_bert())
    word = int8.bert.embeddings.word_embeddings
    ids = token_batch(batch=4, length=10, seed=1)["input_ids"]
    compiled = torch.compile(word, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(ids), word(ids))


def test_qat_follows_start_step_and_trains_through_the_ste():
    model = Bag()
    slimkit.prepare(model, {"quant": {"embeddings": True, "start_step": 2}})
    ids = torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(0))
    weight = model.emb.weight
    assert torch.equal(model.emb(ids), nn.functional.embedding(ids, weight))  # float before start_step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(ids).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(model)
    assert model.emb.weight is weight  # same Parameter object (pruning / optimizer contract)
    assert torch.equal(model.emb(ids), fake_quantize_rows(nn.functional.embedding(ids, weight)))
    model(ids).sum().backward()
    assert weight.grad is not None and weight.grad[ids.unique()].abs().sum() > 0


def test_gpt2_tied_wte_stays_float_and_wpe_is_quantized():
    model = hf_model("gpt2").eval()
    slimkit.prepare(model, {"quant": {"mode": "ptq", "embeddings": True}})
    quantizer = slimkit.methods_of(model)["quant"]
    assert sorted(quantizer.skipped_tied) == ["lm_head", "transformer.wte"]
    assert list(quantizer.embeddings) == ["transformer.wpe"]
    slimkit.calibrate(model, [token_batch(batch=4, seed=0)])
    int8 = slimkit.convert(model)
    assert int8.transformer.wte.weight.dtype == torch.float32 and not is_int8_embedding(int8.transformer.wte)
    assert int8.transformer.wte.weight is int8.lm_head.weight
    assert is_int8_embedding(int8.transformer.wpe)


def test_exclude_keeps_an_embedding_float():
    model = _ptq_bert(exclude=["bert.embeddings.word_embeddings"])
    assert list(slimkit.methods_of(model)["quant"].embeddings) == [
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
    ]
    int8 = slimkit.convert(model)
    assert int8.bert.embeddings.word_embeddings.weight.dtype == torch.float32


def test_embeddings_are_float_unless_asked_for():
    model = _ptq_bert(embeddings=False)
    assert not slimkit.methods_of(model)["quant"].embeddings
    assert not is_qat_embedding(model.bert.embeddings.word_embeddings)


@pytest.mark.parametrize("kwargs", [{"max_norm": 1.0}, {"sparse": True}], ids=["max_norm", "sparse"])
def test_embeddings_the_int8_table_cannot_serve_are_reported_with_the_exclude_fix(kwargs):
    model = Bag(**kwargs)
    with pytest.raises(UnsupportedModelError) as info:
        slimkit.prepare(model, {"quant": {"embeddings": True}})
    message = str(info.value)
    assert "emb (Embedding)" in message and next(iter(kwargs)) in message
    assert 'quant.exclude: ["emb"]' in message
    slimkit.prepare(Bag(**kwargs), {"quant": {"embeddings": True, "exclude": ["emb"]}})


def test_embeddings_alone_are_not_enough_to_quantize():
    model = Bag()
    with pytest.raises(UnsupportedModelError, match="no layer to quantize"):
        slimkit.prepare(model, {"quant": {"embeddings": True, "exclude": ["head"]}})


def test_pruned_bert_with_int8_embeddings_saves_and_loads(tmp_path):
    from tests.families import hf_model

    model = hf_model("bert", seed=2)
    recipe = {
        "prune": {"channels": 0.5, "heads": 0.5, "schedule": {"kind": "cubic", "start_step": 1, "end_step": 2}},
        "quant": {"start_step": 3, "freeze_observers_step": 5, "embeddings": True},
    }
    slimkit.prepare(model, recipe)
    word = model.bert.embeddings.word_embeddings
    vocab = word.weight.shape[0]
    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(6):
        model(input_ids=ids, labels=ids[:, 0] % 2).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(model)
    model.eval()
    assert model.bert.embeddings.word_embeddings is word and is_qat_embedding(word)
    fake = logits_of(model, {"input_ids": ids})
    small = slimkit.convert(model)
    assert is_int8_embedding(small.bert.embeddings.word_embeddings)
    assert type(small.bert.encoder.layer[0].intermediate.dense).__name__ == "Int8Linear"
    assert small.bert.encoder.layer[0].intermediate.dense.weight.shape[0] == small.config.intermediate_size // 2
    out = logits_of(small, {"input_ids": ids})
    same, _ = agreement(fake, out)
    assert same >= 0.99
    slimkit.save_pretrained(small, tmp_path / "m")
    again = slimkit.from_pretrained(tmp_path / "m")
    assert torch.equal(logits_of(again, {"input_ids": ids}), out)


def test_int8_embeddings_are_the_default_for_transformers_only():
    bert = hf_model("bert").eval()
    slimkit.prepare(bert, {"quant": {"mode": "ptq"}})  # embeddings: null
    assert all(is_qat_embedding(getattr(bert.bert.embeddings, n)) for n in EMBEDDINGS)
    off = hf_model("bert").eval()
    slimkit.prepare(off, {"quant": {"mode": "ptq", "embeddings": False}})
    assert not any(is_qat_embedding(m) for m in off.modules())
    bag = Bag()  # a plain module: off unless asked for
    slimkit.prepare(bag, {"quant": {"mode": "ptq"}}, example_inputs=torch.randint(0, 50, (2, 5)))
    assert not is_qat_embedding(bag.emb)
    gpt2 = hf_model("gpt2").eval()  # the default skips what it cannot quantize instead of failing: wte is tied
    slimkit.prepare(gpt2, {"quant": {"mode": "ptq"}})
    assert not is_qat_embedding(gpt2.transformer.wte) and is_qat_embedding(gpt2.transformer.wpe)
