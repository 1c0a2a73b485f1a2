"""FSDP2 (``fully_shard``) with slimkit, for real: 2 CPU processes over gloo under torchrun.

The student and the teacher are both sharded; the converted model (gathered, saved once by
rank 0) equals the one the same run gives under DDP; a run killed mid-way resumes from a
checkpoint to the same weights. tests/fsdp_train.py is what each process runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimkit
from tests.models import ROOT

HERE = Path(__file__).parent


def torchrun(out: Path, runs: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(HERE / "fsdp_train.py"), str(out), *runs]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def records(out: Path, run: str) -> list[dict]:
    return [json.loads((out / run / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_same_model(a: dict, b: dict) -> None:
    """Converted models equal to 1e-5 relative (1e-6 absolute for values that are zero in exact
    arithmetic, such as BERT's key biases, whose gradient is rounding noise)."""
    torch.testing.assert_close(torch.tensor(a["logits"]), torch.tensor(b["logits"]), rtol=1e-5, atol=1e-6)
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        torch.testing.assert_close(
            torch.tensor(a["state"][key]), torch.tensor(b["state"][key]), rtol=1e-5, atol=1e-6, msg=key
        )


RUNS = ["ddp-kd", "fsdp-kd", "late-kd", "ddp-all", "fsdp-all", "late-all", "fsdp-all-kill"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two torchrun launches: every run, the last one killed after step 5 (rank 0 SIGKILLs
    itself, torchrun ends the other); then the resume of that run from its checkpoint."""
    out = tmp_path_factory.mktemp("fsdp")
    killed = torchrun(out, RUNS)
    assert killed.returncode != 0 and (out / "fsdp-all" / "rank1.json").is_file(), killed.stderr[-4000:]
    assert not (out / "fsdp-all-kill" / "rank0.json").exists()
    resumed = torchrun(out, ["fsdp-all-resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fsdp", "late"])
def test_kd_with_sharded_student_and_teacher_equals_ddp(runs, how):
    """Logits, features and attention KD; prepare before fully_shard ("fsdp") or after ("late")."""
    (ddp, _), (rank0, rank1) = records(runs, "ddp-kd"), records(runs, f"{how}-kd")
    assert ddp["student_dtensors"] == 0 and rank0["student_dtensors"] >= 41  # trained sharded
    assert not rank0["converted_dtensors"]  # convert gathered one whole model
    # the teacher was sharded too: each process holds about half of it
    assert rank0["teacher_local_numel"] + rank1["teacher_local_numel"] == rank0["teacher_full_numel"]
    assert rank0["teacher_local_numel"] <= 0.51 * rank0["teacher_full_numel"]
    logged = {"distill/kd", "distill/feature.bert.encoder.layer.1", "distill/attention.bert.encoder.layer.1.attention"}
    assert logged <= set(rank0["log"])
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    assert_same_model(rank0, ddp)
    assert rank0["logits"] == rank1["logits"]  # every process converted the same model
    # written once, by rank 0; the folder loads as the model both processes converted
    assert not (runs / f"{how}-kd" / "rank1-save").exists()
    again = slimkit.from_pretrained(runs / f"{how}-kd" / "model")
    from tests.fsdp_train import PROBE

    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=PROBE).logits, torch.tensor(rank0["logits"]))


@pytest.mark.slow
def test_distill_prune_quant_under_fsdp2_equal_ddp_on_every_process(runs):
    """KD + Taylor pruning + QAT, student and teacher sharded: the same importance statistics and
    masks on every process, and the same converted INT8 model as DDP."""
    (ddp, _), (rank0, rank1) = records(runs, "ddp-all"), records(runs, "fsdp-all")
    assert rank0["student_dtensors"] >= 41 and not rank0["converted_dtensors"]
    assert "sharded" in rank0["copy_refused"] and "slimkit.convert_(model)" in rank0["copy_refused"]
    assert ddp["copy_refused"] is None  # an unsharded model converts a copy by default
    assert rank0["teacher_local_numel"] <= 0.51 * rank0["teacher_full_numel"]
    # mid-schedule (after step 2): the Taylor sums are all-reduced, the masks rank 0's
    taylor = rank0["prune_state_step2"]["slimkit.prune.channels_taylor"]
    assert sum(taylor) > 0
    assert rank0["prune_state_step2"] == rank1["prune_state_step2"]
    for key, value in ddp["prune_state_step2"].items():
        mine = torch.tensor(rank0["prune_state_step2"][key])
        torch.testing.assert_close(mine, torch.tensor(value), rtol=1e-5, atol=0, msg=key)
    assert rank0["log"]["prune/channels"] == rank0["log"]["prune/heads"] == 0.5
    assert rank0["log"]["quant/phase"] == ddp["log"]["quant/phase"] > 0  # fake-quant ran
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    # the converted model is INT8 with its input ranges, identical on both processes, and DDP's
    assert any(key.endswith("input_scale") for key in rank0["state"])
    assert rank0["state"] == rank1["state"] and rank0["logits"] == rank1["logits"]
    assert_same_model(rank0, ddp)


@pytest.mark.slow
def test_killed_fsdp2_run_resumes_from_its_checkpoint_to_the_same_weights(runs):
    """Killed after step 5, resumed from the step-4 checkpoint (mid pruning schedule, with Taylor
    sums pending, before QAT starts): the same losses and converted model as the plain run."""
    kill = runs / "fsdp-all-kill" / "checkpoints"
    assert sorted(p.name for p in kill.iterdir()) == ["step-000002", "step-000004"]
    (plain, _), (resumed, resumed1) = records(runs, "fsdp-all"), records(runs, "fsdp-all-resume")
    assert resumed["resumed_from"] == 4 and resumed["student_dtensors"] >= 41
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=1e-7)
    assert_same_model(resumed, plain)
    assert resumed1["state"] == resumed["state"]


@pytest.mark.slow
def test_prune_and_quant_on_a_model_sharded_before_prepare_are_refused(runs):
    refused = records(runs, "late-all")[0]["refused"]
    assert refused is not None and "fully_shard(model) after it" in refused and "prune and quant" in refused
