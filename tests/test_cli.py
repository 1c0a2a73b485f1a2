import json
import subprocess
import sys
from pathlib import Path

import slimkit
from slimkit.cli import folder_info, main
from tests.families import timm_model


def test_info_reads_config_and_header_only(tmp_path, capsys, minilm_path):
    model = timm_model("resnet")
    slimkit.save_pretrained(model, tmp_path / "m")
    info = folder_info(tmp_path / "m")
    assert info["architecture"] == "resnet18" and info["library"] == "timm" and info["format_version"] == 1
    assert info["parameters"] == sum(t.numel() for t in model.state_dict().values())
    assert main(["info", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert "resnet18 (timm ResNet)" in table and "slimkit format  1" in table
    assert main(["info", str(minilm_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["class"] == "BertModel" and facts["parameters"] > 22_000_000 and facts["format_version"] is None


def test_info_errors_exit_2_with_the_file_named(tmp_path):
    exe = Path(sys.executable).parent / "slimkit"
    result = subprocess.run([str(exe), "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and f"{tmp_path / 'config.json'} is missing" in result.stderr


def _pruned_hf(scope, kind="bert"):
    from tests.families import hf_model

    model = hf_model(kind)
    slimkit.prepare(model, {"prune": {"heads": 0.5, "channels": 0.5, "scope": scope, "verify": False}})
    slimkit.step(model, 0)
    return slimkit.convert(model)


def test_info_on_a_head_pruned_hf_folder_says_first_how_to_load_it(tmp_path, capsys):
    import pytest
    import transformers

    folder = slimkit.save_pretrained(_pruned_hf("global"), tmp_path / "m")  # widths differ per layer
    assert main(["info", str(folder)]) == 0
    table = capsys.readouterr().out
    first = table.splitlines()[0]
    assert first.startswith("load with") and "slimkit.from_pretrained(folder) only" in first
    assert "heads per layer 2/2" in table
    card = (folder / "README.md").read_text().splitlines()
    assert card[2].startswith("**Load this folder with `slimkit.from_pretrained(folder)`**")
    with pytest.raises(Exception, match="size mismatch|mismatch"):  # what the card warns about
        transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    assert folder_info(folder)["load_with"].startswith("slimkit.from_pretrained(folder) only")


def test_info_on_a_uniformly_pruned_hf_folder_names_both_loaders(tmp_path):
    import transformers

    folder = slimkit.save_pretrained(_pruned_hf("local", "llama"), tmp_path / "m")  # Llama reads head_dim
    expected = "slimkit.from_pretrained(folder), or transformers' AutoModel...from_pretrained"
    assert folder_info(folder)["load_with"] == expected
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).config.num_attention_heads == 2
    assert "**Load this folder" not in (folder / "README.md").read_text()
