#!/usr/bin/env python
"""The GPU checks of issue 13, in one short script (a few minutes on one GPU).

1. ``pipeline_bf16``: the one-recipe pipeline (KD + structured pruning + QAT) on CUDA under
   ``torch.autocast(dtype=bfloat16)``, against the same run in fp32: losses, the converted
   model's agreement with the fp32 run, no NaN.
2. ``trainer_fsdp2``: ``transformers.Trainer`` with ``fsdp=True, fsdp_config={"version": 2}``
   on one device (``torchrun --nproc_per_node 1``), slimkit's callbacks with the same recipe,
   ``bf16=True``; the converted model against the same Trainer run without FSDP.
3. ``sparse_2_4``: 2:4 masks from slimkit's N:M pruning (``prune.nm: "2:4"``) on large linear
   layers, made ``torch.sparse.to_sparse_semi_structured``; the measured speed-up of the sparse
   matmul over the dense one (fp16, CUDA events, median of repeats) and its numerical error.

Writes ``$OUT/gpu_check.json`` when ``OUT`` is set, else ``benchmarks/results/gpu_check.json``.
Without CUDA it says so and exits with status 2 (nothing was checked).

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = {
    "distill": {"alpha": 0.5, "temperature": 2.0},
    "prune": {
        "channels": 0.25,
        "heads": 0.25,
        "schedule": {"kind": "cubic", "start_step": 2, "end_step": 10, "every": 4},
    },
    "quant": {"start_step": 14},
}
STEPS = 24


def bert(seed: int, layers: int = 4, hidden: int = 256):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=4096,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def batches(device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, 4096, (16, 64), generator=g)
        out.append({"input_ids": ids.to(device), "labels": (ids[:, 0] % 3).to(device)})
    return out


PROBE = torch.randint(1, 4096, (32, 64), generator=torch.Generator().manual_seed(7))


def train_plain_loop(dtype: torch.dtype | None) -> dict:
    import slimkit

    student, teacher = bert(2).cuda(), bert(1, layers=6).cuda()
    slimkit.prepare(student, RECIPE, teacher=teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    losses = []
    student.train()
    for batch in batches("cuda"):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = student(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slimkit.step(student)
        losses.append(float(loss))
    small = slimkit.convert_(student).cpu().eval()
    with torch.no_grad():
        logits = small(input_ids=PROBE).logits
    return {"losses": losses, "logits": logits, "finite": bool(torch.isfinite(logits).all())}


def pipeline_bf16() -> dict:
    fp32, bf16 = train_plain_loop(None), train_plain_loop(torch.bfloat16)
    a, b = fp32["logits"], bf16["logits"]
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    return {
        "losses_fp32": fp32["losses"],
        "losses_bf16": bf16["losses"],
        "final_loss_rel_diff": abs(bf16["losses"][-1] - fp32["losses"][-1]) / abs(fp32["losses"][-1]),
        "converted_finite": fp32["finite"] and bf16["finite"],
        "converted_logits_cosine_bf16_vs_fp32": float(cos),
        "converted_argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


# --- the Trainer with FSDP2 on one device (a torchrun child) --------------------------------


def trainer_child(out: Path, fsdp: bool) -> None:
    import transformers

    import slimkit
    from slimkit.plugins.hf import slim_callbacks

    student, teacher = bert(2), bert(1, layers=6).cuda()
    callbacks = slim_callbacks(student, RECIPE, teacher=teacher)
    data = [{k: v.cpu() for k, v in b.items()} for b in batches("cpu")]
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in data for i in range(16)]
    kw = {"fsdp": True, "fsdp_config": {"version": 2}} if fsdp else {}
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=16,
        max_steps=STEPS,
        learning_rate=3e-4,
        bf16=True,
        report_to=[],
        save_strategy="no",
        logging_steps=4,
        seed=0,
        **kw,
    )
    trainer = transformers.Trainer(model=student, args=args, train_dataset=rows, callbacks=callbacks)
    trainer.train()
    record = {
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }
    model = trainer.model
    from slimkit.distributed import is_sharded

    record["sharded_while_training"] = is_sharded(model)
    small = slimkit.convert_(model).cpu().eval()
    with torch.no_grad():
        record["logits"] = small(input_ids=PROBE).logits.tolist()
    if int(os.environ.get("RANK", "0")) == 0:
        (out / f"{'fsdp' if fsdp else 'plain'}.json").write_text(json.dumps(record))


def trainer_fsdp2() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        results = {}
        for mode in ("plain", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
            done = subprocess.run(
                [*cmd, __file__, "--trainer", tmp, mode], env=env, capture_output=True, text=True, timeout=300
            )
            if done.returncode:
                return {"error": f"{mode}: " + done.stderr[-3000:]}
            results[mode] = json.loads((Path(tmp) / f"{mode}.json").read_text())
    a, b = torch.tensor(results["plain"]["logits"]), torch.tensor(results["fsdp"]["logits"])
    return {
        "fsdp_enabled": results["fsdp"]["fsdp_enabled"],
        "sharded_while_training": results["fsdp"]["sharded_while_training"],
        "log_fsdp": results["fsdp"]["log"],
        "log_plain": results["plain"]["log"],
        "converted_logits_max_abs_diff_fsdp_vs_plain": float((a - b).abs().max()),
        "converted_argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


# --- 2:4 semi-structured sparsity -----------------------------------------------------------


def sparse_2_4() -> dict:
    from torch.sparse import to_sparse_semi_structured

    from slimkit.prune.sparse import nm_mask

    rows = []
    for out_features, in_features, tokens in ((4096, 4096, 4096), (11008, 4096, 4096), (4096, 11008, 4096)):
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
        keep = nm_mask(weight, 2, 4, 1)
        masked = weight * keep
        sparse = to_sparse_semi_structured(masked)
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)

        def dense_mm(x=x, w=masked):
            return torch.nn.functional.linear(x, w)

        def sparse_mm(x=x, w=sparse):
            return torch.nn.functional.linear(x, w)

        err = float((dense_mm() - sparse_mm()).abs().max() / dense_mm().abs().max())
        times = {}
        for name, fn in (("dense", dense_mm), ("sparse", sparse_mm)):
            for _ in range(5):
                fn()
            samples = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 10)
            times[name] = sorted(samples)[len(samples) // 2]
        rows.append(
            {
                "shape": [tokens, in_features, out_features],
                "dense_ms": times["dense"],
                "sparse_ms": times["sparse"],
                "speedup": times["dense"] / times["sparse"],
                "max_rel_error": err,
                "kept_fraction": float(keep.float().mean()),
            }
        )
    return {"dtype": "float16", "layers": rows}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--trainer":
        trainer_child(Path(sys.argv[2]), sys.argv[3] == "fsdp")
        return 0
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here, nothing was checked. Run it on a machine with an NVIDIA GPU "
            "(it takes a few minutes): python benchmarks/gpu_check.py"
        )
        return 2
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, check in (("pipeline_bf16", pipeline_bf16), ("trainer_fsdp2", trainer_fsdp2), ("sparse_2_4", sparse_2_4)):
        started = time.perf_counter()
        try:
            result[name] = check()
        except Exception:  # one failing check must not hide the others
            result[name] = {"error": traceback.format_exc()[-3000:]}
        result[name]["seconds"] = time.perf_counter() - started
        print(name, json.dumps({k: v for k, v in result[name].items() if not k.startswith(("losses", "log"))})[:1500])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
