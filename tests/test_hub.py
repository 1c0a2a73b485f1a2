"""Hub-style folders: equal outputs after save->load, interop with transformers / timm, safety."""

import json
import os

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import slimkit
from slimkit import FormatError
from slimkit.hub import FORMAT_VERSION
from tests.families import hf_model, timm_model

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def hf_inputs(kind):
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    return {"input_ids": IDS}


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit"])
def test_timm_round_trip_is_bit_exact_and_loads_with_timm(kind, tmp_path):
    model = timm_model(kind).eval()
    slimkit.save_pretrained(model, tmp_path / kind)
    again = slimkit.from_pretrained(tmp_path / kind)
    assert type(again) is type(model) and not again.training
    with torch.no_grad():
        assert torch.equal(model(IMAGES), again(IMAGES))
        plain = timm.create_model(f"local-dir:{tmp_path / kind}", pretrained=True).eval()
        assert torch.equal(model(IMAGES), plain(IMAGES))
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert config["architecture"] == model.default_cfg["architecture"] and "model_args" in config
    # format 1: a float folder packs nothing (slimkit.packing), so any slimkit and timm read it
    assert config["slimkit"]["format_version"] == 1 and config["slimkit"]["library"] == "timm"


@pytest.mark.parametrize(
    "kind, auto",
    [
        ("bert", transformers.AutoModelForSequenceClassification),
        ("vit", transformers.AutoModelForImageClassification),
        ("gpt2", transformers.AutoModelForCausalLM),
        ("llama", transformers.AutoModelForCausalLM),
    ],
)
def test_hf_round_trip_is_bit_exact_and_loads_with_automodel(kind, auto, tmp_path):
    model = hf_model(kind).eval()
    slimkit.save_pretrained(model, tmp_path / kind)
    again = slimkit.from_pretrained(tmp_path / kind)
    plain = auto.from_pretrained(tmp_path / kind).eval()
    assert type(again) is type(model) and type(plain) is type(model)
    with torch.no_grad():
        expected = model(**hf_inputs(kind)).logits
        assert torch.equal(expected, again(**hf_inputs(kind)).logits)
        assert torch.equal(expected, plain(**hf_inputs(kind)).logits)
    if kind == "gpt2":  # the tied lm_head is saved once and re-tied on load
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            assert torch.equal(
                model.generate(IDS[:1], max_new_tokens=4, do_sample=False),
                again.generate(IDS[:1], max_new_tokens=4, do_sample=False),
            )


def test_real_minilm_folder_loads_and_round_trips(minilm_path, tmp_path):
    model = slimkit.from_pretrained(minilm_path)
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    reference = transformers.AutoModel.from_pretrained(minilm_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["slimkit makes models smaller", "a second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        assert torch.equal(model(**batch).last_hidden_state, expected)
        slimkit.save_pretrained(model, tmp_path / "m")
        assert torch.equal(slimkit.from_pretrained(tmp_path / "m")(**batch).last_hidden_state, expected)


def test_model_card_and_recipe_are_written(tmp_path):
    teacher, student = timm_model("resnet-wide"), timm_model("resnet")
    recipe = {"distill": {"alpha": 0.2}}
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=IMAGES)
    slimkit.save_pretrained(slimkit.convert(student), tmp_path / "s")
    card = (tmp_path / "s" / "README.md").read_text()
    assert "resnet18" in card and "parameters" in card and '"alpha": 0.2' in card
    assert json.loads((tmp_path / "s" / "config.json").read_text())["slimkit"]["recipe"]["distill"]["alpha"] == 0.2


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    target = tmp_path / "m"
    old = timm_model("resnet", seed=0)
    slimkit.save_pretrained(old, target)
    (target / "notes.txt").write_text("mine")  # files slimkit does not manage survive saves
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("slimkit.hub.save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        slimkit.save_pretrained(timm_model("resnet", seed=1), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(OSError):
        slimkit.save_pretrained(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(slimkit.from_pretrained(target)(IMAGES), old.eval()(IMAGES))


def test_a_save_over_an_existing_folder_replaces_it(tmp_path):
    slimkit.save_pretrained(timm_model("resnet", seed=0), tmp_path / "m")
    new = timm_model("resnet", seed=1).eval()
    slimkit.save_pretrained(new, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(slimkit.from_pretrained(tmp_path / "m")(IMAGES), new(IMAGES))


def test_broken_folders_get_errors_that_name_the_file(tmp_path):
    folder = tmp_path / "m"
    slimkit.save_pretrained(timm_model("resnet"), folder)
    weights, config = folder / "model.safetensors", folder / "config.json"

    with pytest.raises(FormatError, match="is not a folder"):
        slimkit.from_pretrained(tmp_path / "nothing")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(FormatError, match=f"{weights}.*corrupt or from another save"):
        slimkit.from_pretrained(folder)
    meta = json.loads(config.read_text())
    del meta["slimkit"]["weights_sha256"]  # without the checksum the reader itself must notice
    config.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=f"{weights} is not a readable safetensors file"):
        slimkit.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FormatError, match=f"{weights} is missing"):
        slimkit.from_pretrained(folder)
    weights.write_bytes(good)
    config.write_text("{not json")
    with pytest.raises(FormatError, match=f"{config} is not valid JSON"):
        slimkit.from_pretrained(folder)
    meta["slimkit"]["format_version"] = FORMAT_VERSION + 1
    config.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=f"written by slimkit format {FORMAT_VERSION + 1}.*Upgrade slimkit"):
        slimkit.from_pretrained(folder)
    config.unlink()
    with pytest.raises(FormatError, match=f"{config} is missing"):
        slimkit.from_pretrained(folder)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    folder = tmp_path / "m"
    slimkit.save_pretrained(timm_model("resnet"), folder)
    meta = json.loads((folder / "config.json").read_text())
    del meta["slimkit"]["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(meta))
    save_file({"fc.weight": torch.zeros(3, 3)}, folder / "model.safetensors")
    with pytest.raises(FormatError, match=r"fc.weight has shape \(3, 3\) but the rebuilt model expects \(10, 64\)"):
        slimkit.from_pretrained(folder)
    save_file({"extra": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(FormatError, match="holds tensors the model does not have"):
        slimkit.from_pretrained(folder)


def test_no_pickle_and_no_remote_code(tmp_path):
    folder = tmp_path / "plain"
    model = hf_model("bert")
    model.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(FormatError, match="slimkit loads safetensors only"):
        slimkit.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="asks for remote code"):
        slimkit.from_pretrained(folder)
    timm_folder = tmp_path / "timm"
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    torch.save({}, timm_folder / "pytorch_model.bin")
    with pytest.raises(FormatError, match="never pickle"):
        slimkit.from_pretrained(timm_folder)
