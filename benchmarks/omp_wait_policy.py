#!/usr/bin/env python
"""Does ``OMP_WAIT_POLICY=PASSIVE`` help or hurt? Training and inference with and without it.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it, so every measurement runs in a
fresh subprocess with the variable unset (OpenMP's default: threads spin a while after each
parallel region) or set to ``PASSIVE`` (they sleep at once). The subprocesses alternate
(unset, PASSIVE, PASSIVE, unset, ...) over ``--rounds`` rounds so that drift hits both alike;
each one measures, after warm-up, the median of:

* ``train_step``: one Trainer-route training step, a stock ``transformers.Trainer`` with
  ``slim_callbacks`` distilling a 4-layer BERT (hidden 256) from an 8-layer one, batch 16 x 64
  tokens (forward of both, KD loss, backward, AdamW);
* ``fp32`` / ``int8``: inference of timm resnet18 at batch 1 (FP32, and its INT8 conversion by
  slimkit, eager) on 3x64x64 images.

Run it on a quiet machine to decide slimkit's default (``slimkit/omp.py``, ``DEFAULT``); run it
with ``--load N`` as well to see the effect of N busy processes competing for the cores (the
situation the policy matters most for). Prints a table and writes
``benchmarks/results/omp_wait_policy.json``.

    python benchmarks/omp_wait_policy.py [--rounds 3] [--threads 2] [--load 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("train_step", "fp32", "int8")


# -- the child: one policy, all measurements ---------------------------------------------------------


def _median_ms(fn, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _train_step_ms(steps: int) -> float:
    import torch
    import transformers

    from slimkit.plugins.hf import slim_callbacks

    def bert(layers: int, seed: int):
        torch.manual_seed(seed)
        config = transformers.BertConfig(
            vocab_size=2000,
            hidden_size=256,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=128,
            num_labels=4,
        )
        return transformers.BertForSequenceClassification(config)

    teacher, student = bert(8, 0), bert(4, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 2000, (16 * (steps + 4), 64), generator=g)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": int(row[0]) % 4} for row in ids]
    recipe = {
        "distill": {"alpha": 0.5, "features": [{"student": "bert.encoder.layer.3", "teacher": "bert.encoder.layer.7"}]}
    }
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - self.start) * 1e3)

    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "slimkit-omp-bench"),
        per_device_train_batch_size=16,
        max_steps=steps + 3,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [*slim_callbacks(student, recipe, teacher=teacher), Timer()]
    transformers.Trainer(model=student, args=args, train_dataset=data, callbacks=callbacks).train()
    return statistics.median(times[3:])  # after warm-up


def _inference_ms(repeats: int) -> tuple[float, float]:
    import timm
    import torch

    import slimkit

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    fp32 = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    int8 = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    slimkit.prepare(int8, {"quant": {"mode": "ptq"}}, example_inputs=x, measure=False)
    slimkit.calibrate(int8, [torch.randn(8, 3, 64, 64)])
    int8 = slimkit.convert_(int8)
    with torch.inference_mode():
        return _median_ms(lambda: fp32(x), repeats, 5), _median_ms(lambda: int8(x), repeats, 5)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = {"policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "threads": torch.get_num_threads()}
    out["fp32"], out["int8"] = _inference_ms(10 if args.quick else 50)
    out["train_step"] = _train_step_ms(3 if args.quick else 12)
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent: interleaved subprocesses ----------------------------------------------------------------


def _busy(stop) -> None:  # pragma: no cover - background load
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2**31


def run_child(policy: str | None, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env["SLIMKIT_OMP_WAIT_POLICY"] = "off"  # measure the variable itself, not slimkit's default
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measurement with OMP_WAIT_POLICY={policy} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="subprocess pairs (unset / PASSIVE), order alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", type=int, default=0, help="busy processes competing for the cores meanwhile")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test of the script)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(RESULTS / "omp_wait_policy.json"))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for proc in load:
        proc.start()
    runs: dict[str, list[dict]] = {"unset": [], "PASSIVE": []}
    try:
        for r in range(args.rounds):
            order = [None, "PASSIVE"] if r % 2 == 0 else ["PASSIVE", None]
            for policy in order:
                result = run_child(policy, args)
                runs[policy or "unset"].append(result)
                print(
                    f"round {r + 1}: OMP_WAIT_POLICY={policy or 'unset':8s} "
                    + ", ".join(f"{t} {result[t]:.1f} ms" for t in TASKS),
                    flush=True,
                )
    finally:
        stop.set()
        for proc in load:
            proc.join(timeout=5)
    summary = {policy: {t: statistics.median(r[t] for r in results) for t in TASKS} for policy, results in runs.items()}
    ratio = {t: summary["PASSIVE"][t] / summary["unset"][t] for t in TASKS}
    print(f"\n{'median ms':12s} {'unset':>10s} {'PASSIVE':>10s} {'PASSIVE/unset':>14s}")
    for t in TASKS:
        print(f"{t:12s} {summary['unset'][t]:10.1f} {summary['PASSIVE'][t]:10.1f} {ratio[t]:13.2f}x")
    result = {
        "what": "median ms per training step (Trainer route, KD) and per inference (resnet18, batch 1), "
        "OMP_WAIT_POLICY unset vs PASSIVE, each in fresh interleaved subprocesses",
        "threads": args.threads,
        "background_load_processes": args.load,
        "rounds": args.rounds,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "median_ms": summary,
        "passive_over_unset": ratio,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
