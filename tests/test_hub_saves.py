"""Saves into existing folders are whole (one swap), keep unmanaged files, and get ordinary
permissions (issue 10, items 15 and 16)."""

import contextlib
import errno
import os
import stat

import pytest
import torch

import slimkit
import slimkit.atomic
from slimkit import FormatError
from tests.families import timm_model

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def outputs(folder):
    with torch.no_grad():
        return slimkit.from_pretrained(folder)(IMAGES)


def test_a_rename_that_fails_half_way_never_mixes_old_and_new_files(tmp_path, monkeypatch):
    old, new = timm_model("resnet", seed=0).eval(), timm_model("resnet", seed=1).eval()
    slimkit.save_pretrained(old, tmp_path / "m")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst, *args, **kwargs):  # e.g. a signal or a full quota mid-way
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with contextlib.suppress(OSError):
        slimkit.save_pretrained(new, tmp_path / "m")
    monkeypatch.undo()
    got = outputs(tmp_path / "m")  # loads: either the whole old folder or the whole new one
    assert torch.equal(got, new(IMAGES)) or torch.equal(got, old(IMAGES))


@pytest.mark.parametrize("exchange", ["fails", "unavailable"])
def test_a_failed_swap_leaves_the_old_folder_whole_and_no_leftovers(tmp_path, monkeypatch, exchange):
    old = timm_model("resnet", seed=0).eval()
    slimkit.save_pretrained(old, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    if exchange == "fails":

        def broken(a, b):
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(slimkit.atomic, "_exchange", broken)
    else:  # no renameat2 (another OS): rename aside, rename in; the second rename fails

        def unavailable(a, b):
            raise OSError(errno.ENOSYS, "renameat2 is not available")

        real_rename = os.rename

        def rename(src, dst):
            if ".saving-" in str(src):
                raise OSError(errno.EIO, "I/O error")
            return real_rename(src, dst)

        monkeypatch.setattr(slimkit.atomic, "_exchange", unavailable)
        monkeypatch.setattr(slimkit.atomic.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        slimkit.save_pretrained(timm_model("resnet", seed=1), tmp_path / "m")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(outputs(tmp_path / "m"), old(IMAGES))


def test_the_fallback_swap_replaces_the_folder(tmp_path, monkeypatch):
    def unavailable(a, b):
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    monkeypatch.setattr(slimkit.atomic, "_exchange", unavailable)
    slimkit.save_pretrained(timm_model("resnet", seed=0), tmp_path / "m")
    new = timm_model("resnet", seed=1).eval()
    slimkit.save_pretrained(new, tmp_path / "m")
    assert torch.equal(outputs(tmp_path / "m"), new(IMAGES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_interrupted_fallback_swap_is_named_on_load(tmp_path):
    slimkit.save_pretrained(timm_model("resnet"), tmp_path / "m")
    aside = tmp_path / ".m.old-abc123"
    aside.mkdir()
    os.rename(tmp_path / "m", aside / "m")  # killed between "rename aside" and "rename in"
    with pytest.raises(FormatError, match=r"interrupted between its two renames.*\.m\.old-abc123/m"):
        slimkit.from_pretrained(tmp_path / "m")


def test_unmanaged_files_and_folders_are_carried_and_stale_managed_ones_dropped(tmp_path):
    folder = tmp_path / "m"
    slimkit.save_pretrained(timm_model("resnet"), folder)
    (folder / "tokenizer.json").write_text('{"mine": true}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    (folder / "kept.png").write_bytes(b"a plot of an earlier pruned model")  # managed by slimkit
    slimkit.save_pretrained(timm_model("resnet", seed=3), folder)
    assert (folder / "tokenizer.json").read_text() == '{"mine": true}'
    assert (folder / "1_Pooling" / "config.json").read_text() == "{}"
    assert not (folder / "kept.png").exists()  # this save drew no plot


def test_saved_folders_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        slimkit.save_pretrained(timm_model("resnet"), tmp_path / "m")
        assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
        for file in (tmp_path / "m").iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
        os.chmod(tmp_path / "m", 0o750)  # a mode the owner chose is kept by later saves
        slimkit.save_pretrained(timm_model("resnet", seed=1), tmp_path / "m")
        assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o750
        assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(mask)
