#!/usr/bin/env python
"""Distil (and prune / quantize, as the recipe says) a student from a teacher with accelerate.

    accelerate launch scripts/distill.py --teacher T --student S --recipe R --output-dir D \
        [--dataset X] [--max-steps N]

T and S are hub-style folders (slimkit, transformers or timm) or timm model names (built
with random weights, never downloaded). X is 'digits' (images, the default for image models),
'stdlib-docs' (text, the default for text models) or a local data set that the ``datasets``
library loads (a saved folder, an image folder, or a .csv/.json/.jsonl/.parquet file).

It runs on one process or many: ``accelerate launch --multi_gpu --num_processes 2 ...``
starts two CPU processes (gloo) on a machine without GPUs. D receives the converted student
as a hub-style folder and ``metrics.json`` (teacher and student accuracy, parameters, the loss
curve, the processes that ran).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimkit
from slimkit.adapters import get_adapter
from slimkit.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from slimkit.errors import SlimkitError
from slimkit.plugins.accelerate import gather_log_values, gather_mean
from slimkit.plugins.accelerate import progress as progress_bar
from slimkit.plugins.data import TaskData, load_task_data
from slimkit.plugins.parallelism import check_accelerator
from slimkit.report import count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: a hub-style folder or a timm model name")
    p.add_argument("--student", required=True, help="student: a hub-style folder or a timm model name")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml / .json)")
    p.add_argument("--output-dir", required=True, help="where the student folder and metrics.json go")
    p.add_argument("--dataset", default=None, help="'digits', 'stdlib-docs' or a local data set (default: by model)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs when --max-steps is not given")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 images, 1e-4 text)")
    p.add_argument("--image-size", type=int, default=32, help="image side for models without a fixed size")
    p.add_argument("--max-length", type=int, default=64, help="token length for text models")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument(
        "--lr-schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine: 5%% linear warm-up, then cosine decay to 0 at the last step",
    )
    p.add_argument("--shift", type=int, default=0, help="images: random translation of up to this many pixels")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    p.add_argument(
        "--dropout",
        choices=("keep", "off"),
        default="keep",
        help="off: no dropout in the student (helps feature KD from a pre-trained encoder)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=16,
        help="batches of the training split given to slimkit.calibrate when the recipe prunes with data at "
        "step 0 (importance activation / fisher / taylor, reconstruct, global scope by sensitivity)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- models -------------------------------------------------------------------------------------


def load_model(spec: str, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """A hub-style folder, or a timm model name built with random weights."""
    if Path(spec).is_dir():
        return slimkit.from_pretrained(spec)
    import timm

    if not timm.is_model(spec):
        raise SlimkitError(
            f"{spec!r} is neither a folder nor a timm model name; pass a hub-style folder "
            "(config.json + model.safetensors) or a name from timm.list_models()"
        )
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return timm.create_model(spec, pretrained=False, **kwargs)


def input_kind(model: nn.Module) -> str:
    name = getattr(model, "main_input_name", None)
    return "text" if name == "input_ids" else "image"


def image_geometry(model: nn.Module, default_size: int) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) the model expects; free-size models get ``default_size``."""
    example = get_adapter(model).example_inputs(model, batch_size=1)
    pixels = example["pixel_values"] if isinstance(example, dict) else example
    fixed = getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False) or isinstance(example, dict)
    size = tuple(pixels.shape[-2:]) if fixed else (default_size, default_size)
    return pixels.shape[1], size


def load_tokenizer(*folders: str):
    from transformers import AutoTokenizer

    for folder in folders:
        if Path(folder).is_dir() and any((Path(folder) / f).exists() for f in ("tokenizer.json", "vocab.txt")):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True), folder
    raise SlimkitError(f"no tokenizer files (tokenizer.json / vocab.txt) in {list(folders)}; add them to a folder")


# -- training helpers ---------------------------------------------------------------------------------


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Stateless schedule (a function of the step), so a resumed run needs no scheduler state."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def random_shift(images: torch.Tensor, pixels: int, seed: int, step: int) -> torch.Tensor:
    """Translate the batch by up to ``pixels`` (the same shift on every process for a step, so
    the augmentation is reproducible on resume); teacher and student see the same images."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    dy, dx = torch.randint(-pixels, pixels + 1, (2,), generator=g).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


# -- data -----------------------------------------------------------------------------------------


def make_tensors(data: TaskData, split: str, tokenizer, max_length: int) -> TensorDataset:
    part = getattr(data, split)
    if data.kind == "image":
        return TensorDataset(part.inputs, part.labels)
    enc = tokenizer(part.inputs, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], part.labels)


def as_call(batch: tuple[torch.Tensor, ...], kind: str) -> tuple[dict | tuple, torch.Tensor]:
    """(model inputs, labels) in the model's calling convention."""
    if kind == "image":
        return (batch[0],), batch[1]
    return {"input_ids": batch[0], "attention_mask": batch[1]}, batch[2]


def call(model: nn.Module, inputs, labels=None, with_labels: bool = False):
    if isinstance(inputs, dict):
        return model(**inputs, labels=labels) if with_labels else model(**inputs)
    return model(*inputs)


def check_classes(teacher: nn.Module, example, data: TaskData, name: str | None) -> bool:
    """A classifier's head must match the data set's classes. Returns whether it has one
    (an encoder without a head, like MiniLM, is distilled on features only)."""
    with torch.no_grad():
        logits = slimkit.adapters.get_logits(call(teacher.eval(), example))
    if not data.labelled:
        if logits is not None:
            raise SlimkitError(
                f"--dataset {name!r} has no 'label' column. Unlabelled data distils an encoder without a head "
                f"(e.g. all-MiniLM-L6-v2) on its features; the teacher ({type(teacher).__name__}) has a "
                "classification head, so add a 'label' column"
            )
        return False
    if logits is not None and logits.shape[-1] != data.num_classes:
        raise SlimkitError(
            f"--dataset {name or 'default'!r} has {data.num_classes} classes but the teacher "
            f"({type(teacher).__name__}) predicts {logits.shape[-1]}; use a data set with the teacher's classes"
        )
    return logits is not None


# -- evaluation ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, kind: str, batch_size: int, device) -> dict[str, Any]:
    """Accuracy of a classifier; for encoders without a head, their mean-pooled embeddings."""
    was_training = model.training
    model.eval()
    correct, total, embeddings = 0, 0, []
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = tuple(t.to(device) for t in batch)
        inputs, labels = as_call(batch, kind)
        out = call(model, inputs)
        logits = slimkit.adapters.get_logits(out)
        if logits is not None:
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        else:  # an encoder without a head: mean-pooled sentence embeddings
            hidden, mask = out.last_hidden_state, inputs["attention_mask"].unsqueeze(-1).float()
            embeddings.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    model.train(was_training)
    if total:
        return {"accuracy": correct / total}
    return {"embeddings": torch.cat(embeddings)}


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


class Scorer:
    """Scores students on the held-out split: accuracy, or (encoders) embedding cosine to the teacher."""

    def __init__(self, teacher: nn.Module, eval_set: TensorDataset, kind: str, accelerator: Accelerator) -> None:
        self.eval_set, self.kind, self.device = eval_set, kind, accelerator.device
        self.accelerator = accelerator
        result = evaluate(teacher.to(self.device), eval_set, kind, 64, self.device)
        self._teacher_embeddings = result.get("embeddings")
        self.teacher = {"accuracy": result["accuracy"]} if "accuracy" in result else {}

    def score(self, model: nn.Module) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(model)
        result = evaluate(model, self.eval_set, self.kind, 64, self.device)
        if "accuracy" in result:
            return result
        return {"embedding_cosine": embedding_cosine(result["embeddings"], self._teacher_embeddings)}


def calibrate(student: nn.Module, train_set: TensorDataset, kind: str, with_labels: bool, args) -> None:
    """slimkit.calibrate on the first training batches (a fixed order), labels included where a
    loss can use them (gradient-based importance)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    batches = []
    for batch in loader:
        if len(batches) >= args.calibration_batches:
            break
        inputs, labels = as_call(batch, kind)
        if kind == "image":
            batches.append((inputs[0], labels))
        else:
            batches.append({**inputs, "labels": labels} if with_labels else inputs)
    slimkit.calibrate(student, batches)


def phase_ends(recipe: slimkit.Recipe) -> dict[int, str]:
    """Steps at which a training phase ends (the student is scored there): the last step before
    pruning starts, and the last step before QAT switches fake-quantization on."""
    points = {}
    first = "distilled" if recipe.distill is not None else "trained"
    if recipe.prune is not None and recipe.prune.schedule.start_step > 0:
        points[recipe.prune.schedule.start_step] = first
    if recipe.quant is not None and recipe.quant.mode == "qat" and recipe.quant.start_step > 0:
        points[recipe.quant.start_step] = "pruned" if recipe.prune is not None else first
    return points


def fingerprint(values: dict[str, Any]) -> str:
    """A short hash of tensors (their bytes) or shapes, to compare processes."""
    digest = hashlib.sha256()
    for key in sorted(values):
        value = values[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # accelerate only picks its multi-process CPU mode (gloo) when told cpu=True; without a GPU,
    # `accelerate launch --multi_gpu --num_processes 2` would otherwise start two lone processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_accelerator(accelerator)  # FSDP on CPU, FSDP1 and DeepSpeed: a clear refusal
    set_seed(args.seed)
    torch.set_flush_denormal(True)
    recipe = slimkit.Recipe.from_file(args.recipe)

    # A timm name builds a random-weight teacher sized to the data (useful for trying recipes out).
    teacher = load_model(args.teacher) if Path(args.teacher).is_dir() else None
    kind = input_kind(teacher) if teacher is not None else "image"
    tokenizer = None
    if kind == "image":
        channels, size = (
            image_geometry(teacher, args.image_size) if teacher is not None else (3, (args.image_size,) * 2)
        )
        data = load_task_data(args.dataset, "image", channels, size, seed=args.seed)
    else:
        tokenizer, _ = load_tokenizer(args.student, args.teacher)
        data = load_task_data(args.dataset, "text", seed=args.seed)
    if teacher is None:
        teacher = load_model(args.teacher, num_classes=data.num_classes, in_chans=channels)
    student = load_model(args.student, num_classes=data.num_classes, in_chans=channels if kind == "image" else None)
    if input_kind(student) != kind:
        raise SlimkitError(f"teacher takes {kind} inputs but student {type(student).__name__} does not")

    if args.dropout == "off":  # the same as the recipe's distill.dropout: off
        slimkit.disable_dropout(student)
    train_set = make_tensors(data, "train", tokenizer, args.max_length)
    eval_set = make_tensors(data, "eval", tokenizer, args.max_length)
    example, _ = as_call(train_set[:2], kind)
    has_head = check_classes(teacher, example, data, args.dataset)
    student.train()
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=example)
    lr = args.lr or (1e-3 if kind == "image" else 1e-4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    unwrapped_student = student
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)

    steps = args.max_steps or max(1, int(args.epochs * len(loader)))
    # Refuse a schedule that cannot finish before any training time is spent.
    recipe.check_fits(steps, "--max-steps" if args.max_steps else f"--epochs {args.epochs:g} x {len(loader)} batches")
    with_labels = kind == "text" and has_head
    out_dir = Path(args.output_dir)
    loop = {"epoch": 0, "batch": 0, "samples_seen": 0, "curve": [], "stages": []}
    scorer = Scorer(teacher, eval_set, kind, accelerator) if accelerator.is_main_process else None
    stage_points = phase_ends(recipe)
    step = 0
    # The newest checkpoint whose files match their checksums; damaged newer ones are named and skipped.
    checkpoint = latest_intact_checkpoint(out_dir / "checkpoints", report=accelerator.print) if args.resume else None
    if args.resume and checkpoint is None:
        accelerator.print(f"no intact checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
    if checkpoint is None and slimkit.needs_calibration(unwrapped_student):
        calibrate(unwrapped_student, train_set, kind, with_labels, args)  # a resumed run has its masks already
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
        generator.manual_seed(args.seed + loop["epoch"])  # the same order for an epoch, resumed or not
        batches = accelerator.skip_first_batches(loader, loop["batch"]) if loop["batch"] else loader
        for batch in batches:
            set_lr(optimizer, lr * lr_factor(step, steps, args.lr_schedule))
            inputs, labels = as_call(batch, kind)
            if kind == "image" and args.shift:
                inputs = (random_shift(inputs[0], args.shift, args.seed, step),)
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
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint(
                    out_dir / "checkpoints",
                    step,
                    accelerator.unwrap_model(student),
                    optimizer,
                    loop,
                    rank=accelerator.process_index,
                    world_size=accelerator.num_processes,
                    barrier=accelerator.wait_for_everyone,
                    keep=args.keep_checkpoints,
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
    curve = loop["curve"]

    unwrapped = accelerator.unwrap_model(student)
    params_before = count_parameters(unwrapped)
    final_stage = {"stage": "trained (before convert)", "step": step, **scorer.score(student)} if scorer else None
    masks = fingerprint({k: v for k, v in unwrapped.state_dict().items() if k.startswith("slimkit.prune.")})
    small = slimkit.convert(unwrapped)  # on every process: all of them must reach the same architecture
    architecture = fingerprint({k: tuple(v.shape) for k, v in small.state_dict().items()})
    fingerprints = gather_object([(masks, architecture)])
    metrics = {}
    if accelerator.is_main_process:
        converted = {"stage": "converted", "step": step, **scorer.score(small)}
        stages = [*loop["stages"], final_stage, converted]
        quality = {k: v for k, v in converted.items() if k not in ("stage", "step")}
        # sentence-transformers files (modules.json, pooling) from the student's folder, else the teacher's
        st_source = next((f for f in (args.student, args.teacher) if (Path(f) / "modules.json").is_file()), None)
        slimkit.save_pretrained(
            small,
            out_dir,
            report={**quality, **{f"teacher {k}": v for k, v in scorer.teacher.items()}},
            files_from=st_source,
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        metrics = {
            "teacher": {"parameters": count_parameters(teacher), **scorer.teacher},
            "student": {"parameters": count_parameters(small), "parameters_before_convert": params_before, **quality},
            "stages": stages,
            "dataset": args.dataset or ("digits" if kind == "image" else "stdlib-docs"),
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
            "loss_curve": curve,
            "report": small.__dict__["_slimkit_info"].report,
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


if __name__ == "__main__":
    try:
        main()
    except SlimkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
