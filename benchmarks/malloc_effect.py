"""glibc's default allocator against ``slimkit.steady_malloc()`` at batch 32.

Each allocator runs in a process of its own (``steady_malloc`` is process-wide and cannot be
undone). In each, for timm resnet50, mobilenetv3_large_100 and efficientnet_b0 (random weights,
224 px smooth images, batch 32) and the real all-MiniLM-L6-v2 (32 x 128 tokens), FP32 eager, 2
threads: the median forward time over ``--calls`` calls, the minor page faults of a forward
(:func:`slimkit.malloc.faults_per_call`) and the process's peak RSS; then MobileNetV3 with 50% of
its channels removed uniformly (``channels: 0.5``, ``round_to: 8``, no calibration), timed
interleaved against the dense model three times: what a batch-32 speed-up measures under each
allocator.

    python benchmarks/malloc_effect.py [--calls 6] [--output malloc_effect.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

VISION = ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")


def dense_row(run, calls: int) -> dict:
    import torch

    from slimkit.malloc import faults_per_call

    with torch.inference_mode():
        faults = faults_per_call(run)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1), "faults_per_call": faults}


def child(mode: str, calls: int) -> dict:
    import slimkit

    applied = slimkit.steady_malloc() if mode == "steady" else False
    import int8_common as common
    import targets
    import torch

    common.setup_machine()
    rows = {}
    for name in VISION:
        model = targets.vision_model(name, 224)
        x = targets.smooth_images(32, 224, 5)
        rows[name] = dense_row(lambda m=model, x=x: m(x), calls)
        print(mode, name, rows[name], flush=True)
    _, minilm = common.minilm()
    ids = {"input_ids": torch.randint(1000, 20000, (32, 128))}
    ids["attention_mask"] = ids["input_ids"].ne(0).long()
    rows["minilm"] = dense_row(lambda: minilm(**ids), calls)
    print(mode, "minilm", rows["minilm"], flush=True)

    class Args:
        quick, size = True, 224

    dense = targets.vision_model("mobilenetv3_large_100", 224)
    data = targets.vision_data(Args)
    small, _ = targets.pruned(dense, targets.uniform_section(0.5, False), data, data["calibration"][0], False)
    inputs = targets.example(data, 32)
    readings = [targets.speedups(dense, small, inputs, 7) for _ in range(3)]
    uniform = {stat: [round(r[stat], 3) for r in readings] for stat in ("median", "min")}
    print(mode, "mobilenetv3 channels 0.5 speed-up", uniform, flush=True)
    return {
        "malloc": mode,
        "applied": applied,
        "dense_batch32": rows,
        "mobilenetv3_uniform_0.5_speedup": uniform,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=6, help="timed forwards per model")
    parser.add_argument("--output", default="malloc_effect.json", help="file name under benchmarks/results/")
    parser.add_argument("--child", choices=("default", "steady"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.calls)))
        return
    import int8_common as common

    report = {"machine": common.machine_info(), "runs": {}}
    for mode in ("default", "steady"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--calls", str(args.calls)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        report["runs"][mode] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    for name in (*VISION, "minilm"):
        d, s = (report["runs"][m]["dense_batch32"][name] for m in ("default", "steady"))
        print(
            f"{name:24s} default {d['median_ms']:8.1f} ms ({d['faults_per_call']:9.0f} faults)   "
            f"steady {s['median_ms']:8.1f} ms ({s['faults_per_call']:6.0f} faults)   "
            f"{d['median_ms'] / s['median_ms']:.2f}x"
        )
    for mode in ("default", "steady"):
        print(f"mobilenetv3 channels 0.5, {mode}: {report['runs'][mode]['mobilenetv3_uniform_0.5_speedup']['median']}")
    print(f"wrote {common.write_json(args.output, report)}")


if __name__ == "__main__":
    main()
