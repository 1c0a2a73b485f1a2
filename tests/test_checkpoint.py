"""Training checkpoints: a run that runs out of disk or is killed mid-save loses no earlier checkpoint."""

import json

import pytest
import torch
from torch import nn

import slimkit.checkpoint as ckpt
from slimkit.errors import FormatError


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_out_of_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    ckpt.save_checkpoint(tmp_path, 10, model, optimizer, {"epoch": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 20, model, optimizer, {"epoch": 2}, keep=1)
    monkeypatch.undo()

    # the half-written step 20 is gone (its space freed); step 10 is complete and loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000010"
    fresh, fresh_opt = _model_and_optimizer(1)
    state = ckpt.load_checkpoint(tmp_path / "step-000010", fresh, fresh_opt)
    assert state["step"] == 10 and state["epoch"] == 1
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]

    # a partial folder left by a killed save is cleared by the next save, which prunes old
    # checkpoints only once it is complete
    (tmp_path / ".step-000025.partial").mkdir()
    ckpt.save_checkpoint(tmp_path, 30, model, optimizer, {"epoch": 3}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000030"]


def test_keep_holds_the_newest_checkpoints(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    assert json.loads((tmp_path / "step-000004" / "state.json").read_text())["step"] == 4


def test_an_incomplete_checkpoint_is_refused_with_the_file_named(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = ckpt.save_checkpoint(tmp_path, 5, model, optimizer, {})
    (path / "model.safetensors").unlink()
    with pytest.raises(FormatError, match=r"model\.safetensors is missing"):
        ckpt.load_checkpoint(path, model, optimizer)
