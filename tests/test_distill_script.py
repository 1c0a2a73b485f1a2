"""`accelerate launch scripts/distill.py` for real: one and two CPU processes (gloo)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimkit
from tests.families import hf_model, timm_model
from tests.models import ROOT, accelerate_launch, copy_tokenizer

SCRIPT = ROOT / "scripts" / "distill.py"


def launch(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    return accelerate_launch(SCRIPT, args, processes, cwd)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(json.dumps(recipe))
    return path


PIPELINE = {
    "distill": {"features": [{"student": "layer4", "teacher": "layer4"}]},
    "prune": {
        "channels": 0.5,
        "importance": "taylor",
        "schedule": {"kind": "cubic", "start_step": 2, "end_step": 4, "every": 1},
    },
    "quant": {"start_step": 5, "freeze_observers_step": 7, "freeze_bn_step": 7},
}


@pytest.mark.slow
def test_two_processes_run_the_whole_pipeline_with_the_same_masks(tmp_path):
    # the teacher is a timm model name (random weights, 3 channels), the student a folder
    slimkit.save_pretrained(timm_model("resnet", seed=2), tmp_path / "student")
    recipe = write_recipe(tmp_path / "r.json", PIPELINE)
    out = tmp_path / "out"
    args = [
        "--teacher",
        "resnet18",
        "--student",
        "student",
        "--recipe",
        str(recipe),
        "--output-dir",
        str(out),
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--image-size",
        "16",
    ]
    result = launch(args, 2, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "DistributedType.MULTI_CPU"
    assert metrics["samples_per_process"] == [64, 64]  # 8 steps x 8 samples on each of 2 processes
    assert metrics["steps"] == 8 and len(metrics["loss_curve"]) == 8
    # Taylor statistics differ per process (different batches); the masks and the result must not
    masks, architectures = metrics["masks_per_process"], metrics["architecture_per_process"]
    assert len(masks) == 2 and masks[0] == masks[1] and architectures[0] == architectures[1]
    assert [s["stage"] for s in metrics["stages"]] == ["distilled", "pruned", "trained (before convert)", "converted"]
    assert all(0 <= s["accuracy"] <= 1 for s in metrics["stages"])
    assert {"distill/kd", "distill/task", "distill/feature.layer4", "prune/channels", "quant/phase"} <= set(
        metrics["final_terms"]
    )
    assert metrics["final_terms"]["prune/channels"] == 0.5
    assert "distill:" in result.stderr  # the progress bar
    student = slimkit.from_pretrained(out)
    assert student.layer4[0].conv1.weight.dtype == torch.int8 and student.layer4[0].conv1.weight.shape[0] == 32
    with torch.no_grad():
        assert student(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert "accuracy" in (out / "README.md").read_text() and (out / "kept.png").exists()


@pytest.mark.slow
def test_one_process_text_student_on_the_builtin_and_a_local_dataset(tmp_path, minilm_path):
    for name, layers in (("teacher", 2), ("student", 1)):
        model = hf_model("bert", seed=layers, vocab_size=30522, num_hidden_layers=layers, num_labels=6)
        model.save_pretrained(tmp_path / name)
    copy_tokenizer(minilm_path, tmp_path / "teacher")  # the student borrows the teacher's tokenizer
    recipe = write_recipe(tmp_path / "r.json", {"distill": {"alpha": 0.5}})
    out = tmp_path / "out"
    args = [
        "--teacher",
        "teacher",
        "--student",
        "student",
        "--recipe",
        str(recipe),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "16",
    ]
    result = launch([*args, "--output-dir", str(out)], 1, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "stdlib-docs" and metrics["num_processes"] == 1
    assert metrics["train_samples"] + metrics["eval_samples"] > 1500
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert type(slimkit.from_pretrained(out)).__name__ == "BertForSequenceClassification"

    topics = ["animals", "money", "weather", "sport", "food", "music"]
    rows = [(f"a sentence about {t} number {i}", t) for i in range(4) for t in topics]
    write_csv(tmp_path / "six.csv", rows)
    shutil.rmtree(out)
    result = launch([*args, "--output-dir", str(out), "--dataset", str(tmp_path / "six.csv")], 1, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_samples"] + metrics["eval_samples"] == 24

    write_csv(tmp_path / "two.csv", [r for r in rows if r[1] in ("animals", "money")])
    result = launch([*args, "--output-dir", str(tmp_path / "o2"), "--dataset", str(tmp_path / "two.csv")], 1, tmp_path)
    assert result.returncode != 0  # accelerate reports the script's exit status 2 as 1
    assert "two.csv' has 2 classes but the teacher (BertForSequenceClassification) predicts 6" in result.stderr


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


@pytest.mark.slow
def test_bad_model_spec_is_a_clear_error(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", {"distill": {}})
    result = launch(
        [
            "--teacher",
            "no_such_model_xyz",
            "--student",
            "resnet18",
            "--recipe",
            str(recipe),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        1,
        tmp_path,
    )
    assert result.returncode != 0
    assert "'no_such_model_xyz' is neither a folder nor a timm model name" in result.stderr


@pytest.mark.slow
def test_a_killed_run_keeps_its_checkpoints_and_resumes_exactly(tmp_path):
    import os
    import signal
    import time

    slimkit.save_pretrained(timm_model("resnet-wide", seed=1, in_chans=1), tmp_path / "teacher")
    slimkit.save_pretrained(timm_model("resnet", seed=2, in_chans=1), tmp_path / "student")
    recipe = write_recipe(tmp_path / "r.json", PIPELINE)  # killed mid-pruning or mid-QAT
    common = [
        "--teacher",
        "teacher",
        "--student",
        "student",
        "--recipe",
        str(recipe),
        "--batch-size",
        "16",
        "--image-size",
        "16",
        "--shift",
        "2",
        "--lr-schedule",
        "constant",
        "--checkpoint-every",
        "2",
    ]
    script = [sys.executable, SCRIPT]
    straight = subprocess.run(
        [*script, *common, "--output-dir", "a", "--max-steps", "8"], cwd=tmp_path, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    # the same run, killed (SIGKILL) once its second checkpoint exists, then resumed
    victim = subprocess.Popen(
        [*script, *common, "--output-dir", "b", "--max-steps", "100000"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert "step-000004" in names and len(names) <= 2
    for name in names:  # every step-* folder is complete: it was renamed into place when whole
        assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng-0.safetensors", "state.json"} <= {
            p.name for p in (tmp_path / "b" / "checkpoints" / name).iterdir()
        }
    resumed = subprocess.run(
        [*script, *common, "--output-dir", "b", "--max-steps", "8", "--resume"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    curve_a = json.loads((tmp_path / "a" / "metrics.json").read_text())["loss_curve"]
    curve_b = json.loads((tmp_path / "b" / "metrics.json").read_text())["loss_curve"]
    assert curve_a == curve_b[: len(curve_a)] and len(curve_b) == 8
