"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2`` (2 CPU processes, gloo).

``fsdp_train.py OUT RUN [RUN ...]`` trains a tiny BERT student from a 4-layer BERT teacher once
per RUN, each on the same global batches (each process takes its half), and writes
``OUT/<RUN>/rank<k>.json``: the loss curve, the converted model's logits on fixed inputs, and
what was sharded. The converted model is saved to ``OUT/<RUN>/model`` (by rank 0).

RUN is ``<how>-<recipe>[-kill|-resume]``:

* how: ``ddp`` (DistributedDataParallel), ``fsdp`` (``slimkit.prepare`` then ``fully_shard`` on
  the student's layers and root; the teacher sharded the same way), ``late`` (both sharded
  first, then ``slimkit.prepare``);
* recipe: ``kd`` (logits, features, attention) or ``all`` (KD, Taylor pruning at steps 1, 3, 5
  and QAT from step 6, observers never frozen);
* ``-kill``: checkpoints every 2 steps and SIGKILLs rank 0 after step 5; ``-resume``: resumes
  that run from its newest checkpoint (step 4: between pruning points, before QAT). Plain
  runs checkpoint every 2 steps too.

``late-all`` only records the error ``slimkit.prepare`` raises for pruning / QAT on a model
sharded before it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import slimkit
from slimkit.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from slimkit.distributed import is_dtensor
from tests.families import hf_model

KD = {
    "temperature": 2.0,
    "alpha": 0.5,
    "features": [{"student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*"}],
    "attention": [{"student": "bert.encoder.layer.1.attention", "teacher": "bert.encoder.layer.3.attention"}],
}
RECIPES = {
    "kd": {"distill": KD},
    "all": {
        "distill": KD,
        "prune": {
            "channels": 0.5,
            "heads": 0.5,
            "importance": "taylor",
            "schedule": {"kind": "cubic", "start_step": 1, "end_step": 5, "every": 2},
        },
        "quant": {"start_step": 6},
    },
}
STEPS, EVERY, KILL_AFTER = 8, 2, 5
PROBE = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(99))


def shard(model) -> None:
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def batch(step: int, rank: int) -> dict:
    """The global batch of ``step`` (8 samples, the same in every run), this process's half."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 128, (8, 12), generator=g)
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[::3, -3:] = 0
    part = slice(4 * rank, 4 * rank + 4)
    return {"input_ids": ids[part], "attention_mask": mask[part], "labels": (ids[:, 0] % 3)[part]}


def local_numel(model) -> int:
    return sum((p.to_local() if is_dtensor(p) else p).numel() for p in model.parameters())


def run(out: Path, name: str) -> dict:
    how, recipe_name, *flag = name.split("-")
    rank = dist.get_rank()
    teacher = hf_model("bert", seed=1, num_hidden_layers=4, hidden_size=48)
    student = hf_model("bert", seed=2)
    record = {"teacher_full_numel": sum(p.numel() for p in teacher.parameters())}
    if how == "late":
        shard(teacher)
        shard(student)
    if how == "late" and recipe_name == "all":
        try:
            slimkit.prepare(student, RECIPES[recipe_name], teacher=teacher)
        except slimkit.SlimkitError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
    slimkit.prepare(student, RECIPES[recipe_name], teacher=teacher)
    if how == "fsdp":
        shard(teacher)
        shard(student)
    model = torch.nn.parallel.DistributedDataParallel(student) if how == "ddp" else student
    record["student_dtensors"] = sum(is_dtensor(p) for p in student.parameters())
    record["teacher_local_numel"] = local_numel(teacher)
    # SGD, not Adam: Adam turns the rounding noise of gradients that are zero in exact arithmetic
    # (BERT's key biases) into full-size steps, so DDP and FSDP2 (other summation orders) would
    # part on those parameters for no reason of slimkit's.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9)
    checkpoints = out / name / "checkpoints"
    start, losses = 0, []
    if flag == ["resume"]:
        killed = out / name.replace("-resume", "-kill") / "checkpoints"
        state = load_checkpoint(latest_intact_checkpoint(killed), student, optimizer, rank=rank)
        start, losses = state["step"], state["losses"]
        record["resumed_from"] = start
    student.train()
    for step in range(start, STEPS):
        loss = model(**batch(step, rank)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(student)
        losses.append(float(loss.detach()))
        if step + 1 == 2:  # between pruning points: this step's all-reduced Taylor sums
            record["prune_state_step2"] = {
                n: b.float().tolist() for n, b in student.named_buffers() if n.startswith("slimkit.prune.")
            }
        if (step + 1) % EVERY == 0:
            kw = {"rank": rank, "world_size": 2, "barrier": dist.barrier}
            save_checkpoint(checkpoints, step + 1, student, optimizer, {"losses": losses}, **kw)
        if flag == ["kill"] and step + 1 == KILL_AFTER and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    record["log"] = slimkit.log_values(student)
    try:  # convert's default is a copy, which a sharded model refuses (DDP's copies)
        slimkit.convert(student)
        record["copy_refused"] = None
    except slimkit.IncompatibleError as exc:
        record["copy_refused"] = str(exc)
    small = slimkit.convert_(student)  # in place: a sharded model is not copied
    record["converted_dtensors"] = any(is_dtensor(p) for p in small.parameters())
    slimkit.save_pretrained(small, out / name / "model")
    if rank == 1:
        slimkit.save_pretrained(small, out / name / "rank1-save")  # only rank 0 writes: never created
    dist.barrier()
    small.eval()
    with torch.no_grad():
        record["logits"] = small(input_ids=PROBE).logits.tolist()
    record["losses"] = losses
    record["state"] = {k: v.tolist() for k, v in small.state_dict().items() if v.dtype.is_floating_point}
    return record


def main(out: Path, names: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    for name in names:
        record = run(out, name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
