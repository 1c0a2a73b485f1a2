"""Run by tests/prune/test_prune_target.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each process prepares the same tiny CNN with a speed-up target, calibrates it on its *own*
batches and times its own layers (timings differ per process), then writes the widths it chose
and the converted widths to ``<out>/rank<k>.json``; the test checks both processes agree.
With a second argument ``int8`` the target times INT8 copies on rank 0 (``prune.target.int8``,
with ``quant.keep_fp32``, which agrees across processes by a broadcast: rank 0 must not start
it while the others wait for the widths). With ``depth`` the target may remove blocks too
(``prune.layers``): rank 0 ranks them on its own batches, alone, and every process removes the
blocks it chose. The plain (float) mode refits (``reconstruct``): rank 0 then scores compare's
plans cross-fitted, its folds' statistics subtracted from the totals summed over processes.
"""

import json
import sys
from pathlib import Path

import torch

import slimkit
from tests.families import settle_batchnorm, timm_model


def main(out: Path, mode: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.set_flush_denormal(True)
    model = settle_batchnorm(timm_model("resnet-wide"), torch.randn(8, 3, 32, 32)).eval()
    g = torch.Generator().manual_seed(100 + rank)  # every process sees other images
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    target = {"speedup": 1.1, "batch": 4, "threads": 1, "rounds": 1, "cache": str(out / f"cache{rank}")}
    recipe = {"prune": {"target": target, "importance": "activation", "reconstruct": mode == "float"}}
    if mode == "depth":  # resnet18's residual branches all working: their removal costs something
        model = settle_batchnorm(timm_model("resnet-wide", zero_init_last=False), torch.randn(8, 3, 32, 32)).eval()
        recipe["prune"].update(layers=3, max_layer_ratio=0.5)
        target.clear()
        target.update(macs=0.55, compare=False)
    if mode == "int8":  # a wide tolerance: eager INT8 of this tiny CNN is 0.93x FP32 without VNNI
        target.update(int8=True, tolerance=0.5)
        recipe["quant"] = {"mode": "ptq", "compile": "never", "keep_fp32": 1}
    slimkit.prepare(model, recipe, example_inputs=batches[0])
    slimkit.calibrate(model, batches)
    summary = slimkit.prune.summary(model)
    chosen, blocks = summary["target"]["widths"], summary.get("layers", {}).get("removed", [])
    small = slimkit.convert(model)
    widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)}
    record = {"rank": rank, "world_size": torch.distributed.get_world_size(), "chosen": chosen, "widths": widths}
    record["blocks"] = blocks
    record["compared"] = summary["target"]["compared"]
    (out / f"rank{rank}.json").write_text(json.dumps(record, sort_keys=True))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "float")
