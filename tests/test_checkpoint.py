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


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    ckpt.save_checkpoint(tmp_path, 999_000, model, optimizer, {}, keep=1)
    ckpt.save_checkpoint(tmp_path, 1_000_000, model, optimizer, {}, keep=1)  # sorts before by name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1000000"
    ckpt.save_checkpoint(tmp_path, 1_000_100, model, optimizer, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-1000100"]


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", _truncate, "model.safetensors is damaged"),
        ("state.json", _truncate, "state.json is damaged"),
        ("optimizer.safetensors", _flip_a_bit, "optimizer.safetensors is damaged"),
        ("model.safetensors", _flip_a_bit, "model.safetensors is damaged"),
        ("rng-0.safetensors", lambda p: p.unlink(), r"rng-0.safetensors is missing \(listed in checksums.json\)"),
        ("optimizer.json", lambda p: p.unlink(), "optimizer.json is missing"),
        ("checksums.json", _truncate, "checksums.json is damaged"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, name, damage, message):
    model, optimizer = _model_and_optimizer(0)
    ckpt.save_checkpoint(tmp_path, 10, model, optimizer, {"epoch": 1}, keep=3)
    ckpt.save_checkpoint(tmp_path, 20, model, optimizer, {"epoch": 2}, keep=3)
    damage(tmp_path / "step-000020" / name)
    with pytest.raises(FormatError, match=message):
        ckpt.load_checkpoint(tmp_path / "step-000020", model, optimizer)
    said = []
    chosen = ckpt.latest_intact_checkpoint(tmp_path, report=said.append)
    assert chosen.name == "step-000010"
    assert len(said) == 1 and "skipping damaged checkpoint step-000020" in said[0] and name in said[0]
    assert "Trying step-000010" in said[0]
    assert ckpt.load_checkpoint(chosen, model, optimizer)["epoch"] == 1


def test_no_intact_checkpoint_at_all_is_said(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = ckpt.save_checkpoint(tmp_path, 10, model, optimizer, {})
    _flip_a_bit(path / "model.safetensors")
    said = []
    assert ckpt.latest_intact_checkpoint(tmp_path, report=said.append) is None
    assert "No older checkpoint is left" in said[0]


def test_a_checkpoint_from_fewer_processes_is_refused_with_the_fix(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = ckpt.save_checkpoint(tmp_path, 10, model, optimizer, {})
    with pytest.raises(FormatError, match="written by 1 process.*Resume with the same number of processes"):
        ckpt.load_checkpoint(path, model, optimizer, rank=1)


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        model, optimizer = _model_and_optimizer(0)
        path = ckpt.save_checkpoint(tmp_path, 10, model, optimizer, {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for file in path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
