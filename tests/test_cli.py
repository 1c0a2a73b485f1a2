import json
import subprocess
import sys
from pathlib import Path

import slimkit
from slimkit.cli import folder_info, main
from tests.models import tiny_timm


def test_info_reads_config_and_header_only(tmp_path, capsys, minilm_path):
    model = tiny_timm("resnet")
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
