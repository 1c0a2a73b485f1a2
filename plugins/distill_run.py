"""One distillation run with accelerate: what ``scripts/distill.py`` does, as a library call.

    from slimkit.plugins.distill_run import DistillOptions, run_distillation

    metrics = run_distillation(DistillOptions(teacher="out/teacher", student="out/student_init",
                                              recipe="recipes/digits_pipeline.yaml", output_dir="out/student"))

The recipe says what happens (KD, pruning, QAT, INT8); this module loads the models and the
data set, trains the student for the steps asked, scores it at the end of each phase (the
phases come from the recipe: ``Recipe.phase_ends``), converts it on every process and saves it
from the main one (``save_student``), and writes ``metrics.json``. It runs on one process or
many (``accelerate launch --multi_gpu --num_processes 2 scripts/distill.py ...``; on a machine
without GPUs, CPU processes with gloo), and resumes from its own checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

import slimkit
from slimkit.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from slimkit.errors import SlimkitError
from slimkit.fingerprint import architecture_fingerprint, method_state_fingerprint
from slimkit.plugins.accelerate import gather_log_values, gather_mean, save_student
from slimkit.plugins.accelerate import progress as progress_bar
from slimkit.plugins.data import as_call, load_task_data, task_tensors
from slimkit.plugins.evaluation import Scorer, calibration_batches, call, check_classes
from slimkit.plugins.loading import image_geometry, input_kind, load_model, load_tokenizer
from slimkit.plugins.parallelism import check_accelerator
from slimkit.plugins.training import lr_factor, random_shift, set_lr
from slimkit.report import count_parameters


@dataclass
class DistillOptions:
    """The options of one run (``scripts/distill.py --help`` describes each flag)."""

    teacher: str
    student: str
    recipe: str
    output_dir: str
    dataset: str | None = None
    max_steps: int | None = None
    epochs: float = 3.0
    batch_size: int = 32
    lr: float | None = None  # default: 1e-3 for images, 1e-4 for text
    image_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    shift: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    dropout: str = "keep"
    calibration_batches: int = 16
    seed: int = 0


def _load_models(opts: DistillOptions):
    """(teacher, student, kind, task data, tokenizer). A timm name builds a random-weight model
    sized to the data (useful for trying recipes out)."""
    teacher = load_model(opts.teacher) if Path(opts.teacher).is_dir() else None
    kind = input_kind(teacher) if teacher is not None else "image"
    tokenizer, channels = None, None
    if kind == "image":
        channels, size = (
            image_geometry(teacher, opts.image_size) if teacher is not None else (3, (opts.image_size,) * 2)
        )
        data = load_task_data(opts.dataset, "image", channels, size, seed=opts.seed)
    else:
        tokenizer, _ = load_tokenizer(opts.student, opts.teacher)
        data = load_task_data(opts.dataset, "text", seed=opts.seed)
    if teacher is None:
        teacher = load_model(opts.teacher, num_classes=data.num_classes, in_chans=channels)
    student = load_model(opts.student, num_classes=data.num_classes, in_chans=channels)
    if input_kind(student) != kind:
        raise SlimkitError(f"teacher takes {kind} inputs but student {type(student).__name__} does not")
    return teacher, student, kind, data, tokenizer


def run_distillation(opts: DistillOptions) -> dict[str, Any]:
    """Run the recipe on the student, save the converted student in ``opts.output_dir`` and
    return the metrics (the main process's; ``{}`` on the others), also written there as
    ``metrics.json``: teacher and student quality and parameters, the quality at every stage,
    the loss curve, and per-process fingerprints of the masks and the final architecture."""
    # accelerate only picks its multi-process CPU mode (gloo) when told cpu=True; without a GPU,
    # `accelerate launch --multi_gpu --num_processes 2` would otherwise start two lone processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_accelerator(accelerator)  # FSDP on CPU, FSDP1 and DeepSpeed: a clear refusal
    set_seed(opts.seed)
    torch.set_flush_denormal(True)
    recipe = slimkit.Recipe.from_file(opts.recipe)
    teacher, student, kind, data, tokenizer = _load_models(opts)

    if opts.dropout == "off":  # the same as the recipe's distill.dropout: off
        slimkit.disable_dropout(student)
    train_set = task_tensors(data, "train", tokenizer, opts.max_length)
    eval_set = task_tensors(data, "eval", tokenizer, opts.max_length)
    example, _ = as_call(train_set[:2], kind)
    has_head = check_classes(teacher, example, data, opts.dataset)
    student.train()
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=example)
    lr = opts.lr or (1e-3 if kind == "image" else 1e-4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=opts.weight_decay)
    generator = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(train_set, batch_size=opts.batch_size, shuffle=True, generator=generator)
    unwrapped_student = student
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)

    steps = opts.max_steps or max(1, int(opts.epochs * len(loader)))
    # Refuse a schedule that cannot finish before any training time is spent.
    recipe.check_fits(steps, "--max-steps" if opts.max_steps else f"--epochs {opts.epochs:g} x {len(loader)} batches")
    with_labels = kind == "text" and has_head
    out_dir = Path(opts.output_dir)
    loop = {"epoch": 0, "batch": 0, "samples_seen": 0, "curve": [], "stages": []}
    scorer = (
        Scorer(teacher, eval_set, kind, accelerator.device, unwrap=accelerator.unwrap_model)
        if accelerator.is_main_process
        else None
    )
    stage_points = recipe.phase_ends()  # the methods say when their phases start
    step = 0
    # The newest checkpoint whose files match their checksums; damaged newer ones are named and skipped.
    checkpoint = latest_intact_checkpoint(out_dir / "checkpoints", report=accelerator.print) if opts.resume else None
    if opts.resume and checkpoint is None:
        accelerator.print(f"no intact checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
    if checkpoint is None and slimkit.needs_calibration(unwrapped_student):  # a resumed run has its masks already
        batches = calibration_batches(
            train_set, kind, with_labels, opts.batch_size, opts.calibration_batches, seed=opts.seed + 1
        )
        slimkit.calibrate(unwrapped_student, batches)
        if scorer is not None:
            loop["stages"].append({"stage": "pruned at calibration", "step": 0, **scorer.score(student)})
    if checkpoint is not None:
        loop = load_checkpoint(
            checkpoint, accelerator.unwrap_model(student), optimizer, rank=accelerator.process_index, verify=False
        )
        step = loop["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    # A bar on a terminal; in a log file one line per tenth of the run, not one per step.
    progress = progress_bar(total=steps, initial=step, desc="distill", disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    student.train()
    while step < steps:
        generator.manual_seed(opts.seed + loop["epoch"])  # the same order for an epoch, resumed or not
        batches = accelerator.skip_first_batches(loader, loop["batch"]) if loop["batch"] else loader
        for batch in batches:
            set_lr(optimizer, lr * lr_factor(step, steps, opts.lr_schedule))
            inputs, labels = as_call(batch, kind)
            if kind == "image" and opts.shift:
                inputs = (random_shift(inputs[0], opts.shift, opts.seed, step),)
            out = call(student, inputs, labels, with_labels)
            loss = slimkit.compute_loss(student, out, labels=labels if with_labels or kind == "image" else None)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step in stage_points and accelerator.is_main_process:  # before the next phase begins
                loop["stages"].append({"stage": stage_points[step], "step": step, **scorer.score(student)})
            slimkit.step(student, step)
            loop["batch"] += 1
            loop["samples_seen"] += len(labels)
            mean_loss = gather_mean(accelerator, loss)
            loop["curve"].append({"step": step, "loss": mean_loss})
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            progress.update(1)
            if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                save_checkpoint(
                    out_dir / "checkpoints",
                    step,
                    accelerator.unwrap_model(student),
                    optimizer,
                    loop,
                    rank=accelerator.process_index,
                    world_size=accelerator.num_processes,
                    barrier=accelerator.wait_for_everyone,
                    keep=opts.keep_checkpoints,
                )
            if step >= steps:
                break
        else:
            loop["epoch"] += 1
            loop["batch"] = 0
    progress.close()
    train_seconds = time.perf_counter() - started
    terms = gather_log_values(accelerator, student)
    samples = accelerator.gather(torch.tensor([loop["samples_seen"]], device=accelerator.device)).tolist()

    unwrapped = accelerator.unwrap_model(student)
    params_before = count_parameters(unwrapped)
    final_stage = {"stage": "trained (before convert)", "step": step, **scorer.score(student)} if scorer else None
    masks = method_state_fingerprint(unwrapped, "prune")
    converted: dict[str, Any] = {}

    def measured(small: torch.nn.Module) -> dict[str, Any]:  # on the main process, before the save
        converted.update(stage="converted", step=step, **scorer.score(small))
        quality = {k: v for k, v in converted.items() if k not in ("stage", "step")}
        return {**quality, **{f"teacher {k}": v for k, v in scorer.teacher.items()}}

    # sentence-transformers files (modules.json, pooling) from the student's folder, else the teacher's
    st_source = next((f for f in (opts.student, opts.teacher) if (Path(f) / "modules.json").is_file()), None)
    extra = tokenizer.save_pretrained if tokenizer is not None else None
    # every process converts (all must reach the same architecture); the main one saves
    small = save_student(accelerator, student, out_dir, extra, report=measured, files_from=st_source)
    fingerprints = gather_object([(masks, architecture_fingerprint(small))])
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        quality = {k: v for k, v in converted.items() if k not in ("stage", "step")}
        metrics = {
            "teacher": {"parameters": count_parameters(teacher), **scorer.teacher},
            "student": {"parameters": count_parameters(small), "parameters_before_convert": params_before, **quality},
            "stages": [*loop["stages"], final_stage, converted],
            "dataset": opts.dataset or ("digits" if kind == "image" else "stdlib-docs"),
            "train_samples": len(train_set),
            "eval_samples": len(eval_set),
            "steps": step,
            "train_seconds": round(train_seconds, 2),
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "samples_per_process": samples,
            "masks_per_process": [m for m, _ in fingerprints],
            "architecture_per_process": [a for _, a in fingerprints],
            "recipe": recipe.to_dict(),
            "final_terms": terms,
            "loss_curve": loop["curve"],
            "report": slimkit.model_info(small).report,
        }
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, out_dir / "metrics.json")
        summary = {k: v for k, v in metrics.items() if k in ("teacher", "student", "steps", "num_processes")}
        accelerator.print(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics
