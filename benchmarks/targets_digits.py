"""``prune.target`` on the digits CNN: per-layer widths against uniform pruning at the same MACs.

The digits CNN of ``prune_accuracy.py`` (scikit-learn's 8x8 digits, trained here) is far too
small for a latency target to mean anything on a CPU (a forward is dominated by per-layer
overhead), so the budget is counted: ``prune.target: {macs: f}`` for f = 0.5 and 0.3, with
activation importance and reconstruction at ``slimkit.calibrate`` (512 training images), against
uniform pruning (every layer the same ratio, the same importance and refit) at the ratio whose
MACs come closest (bisection on counted MACs). Held-out accuracy with no training, and after the
same short fine-tuning of both. Writes benchmarks/results/targets_digits.json.

    python benchmarks/targets_digits.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from slimkit.prune import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_split import shuffled_digits  # noqa: E402
from prune_accuracy import DigitsCNN, accuracy, train_cnn  # noqa: E402
from targets import pruned  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.5, 0.3)


def uniform_ratio(dense, fraction: float, x) -> float:
    """The uniform ratio whose counted MACs come closest to ``fraction`` (widths do not depend on
    the scores, so l2 without calibration finds it)."""
    dense_macs, lo, hi = count_macs(dense, x), 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        model, _ = pruned(dense, {"channels": mid, "round_to": 8}, {}, x, calibrate=False)
        lo, hi = (mid, hi) if count_macs(model, x) / dense_macs > fraction else (lo, mid)
    return round((lo + hi) / 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training steps (a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "targets_digits.json")
    args = parser.parse_args()
    steps, recovery = (100, 20) if args.quick else (600, 100)
    torch.manual_seed(0)
    train, test = shuffled_digits(held_out=500)
    dense = DigitsCNN()
    train_cnn(dense, train, steps, 2e-3)
    dense.eval()
    calibration = list(train[0][:512].split(64))
    data, x = {"calibration": calibration}, calibration[0]
    dense_macs = count_macs(dense, x)
    report = {"dense_accuracy": accuracy(dense, test), "training_steps": steps, "recovery_steps": recovery, "rows": []}
    print(f"digits CNN: dense held-out accuracy {report['dense_accuracy']:.4f}")
    data_aware = {"importance": "activation", "reconstruct": True}
    for fraction in FRACTIONS:
        row = {"macs_target": fraction}
        target_model, summary = pruned(dense, {"target": {"macs": fraction}, **data_aware}, data, x)
        ratio = uniform_ratio(dense, fraction, x)
        uniform_model, _ = pruned(dense, {"channels": ratio, "round_to": 8, **data_aware}, data, x)
        for name, model in (("target", target_model), ("uniform", uniform_model)):
            entry = {"macs": round(count_macs(model, x) / dense_macs, 4), "accuracy": accuracy(model, test)}
            tuned = copy.deepcopy(model)
            train_cnn(tuned, train, recovery, 1e-3, seed=1)
            entry["accuracy_after_recovery"] = accuracy(tuned, test)
            row[name] = entry
        row["uniform"]["ratio"] = ratio
        row["target"]["widths"] = summary["target"]["widths"]
        row["target"]["picked"] = summary["target"]["picked"]
        row["target"]["compared"] = summary["target"]["compared"]
        row["accuracy_minus_uniform"] = round(row["target"]["accuracy"] - row["uniform"]["accuracy"], 4)
        row["after_recovery_minus_uniform"] = round(
            row["target"]["accuracy_after_recovery"] - row["uniform"]["accuracy_after_recovery"], 4
        )
        report["rows"].append(row)
        t, u = row["target"], row["uniform"]
        print(
            f"MACs {fraction:.2f}: target {t['macs']:.3f} of MACs, accuracy {t['accuracy']:.4f} "
            f"({t['accuracy_after_recovery']:.4f} after {recovery} steps) | uniform r={ratio:.3f} "
            f"{u['macs']:.3f} of MACs, {u['accuracy']:.4f} ({u['accuracy_after_recovery']:.4f})"
        )
    report["goal"] = "accuracy >= uniform pruning's at the same MACs, before and after recovery"
    report["goal_met"] = all(
        r["accuracy_minus_uniform"] >= 0 and r["after_recovery_minus_uniform"] >= 0 for r in report["rows"]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"goal met: {report['goal_met']}; wrote {args.output}")


if __name__ == "__main__":
    main()
