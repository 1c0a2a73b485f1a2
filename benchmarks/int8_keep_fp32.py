"""``quant.keep_fp32: auto`` on the real all-MiniLM-L6-v2: what keeping the worst layers in float gives back.

Static PTQ of the real MiniLM (calibrated on 128 ``stdlib-docs`` training sentences), with
per-channel weights (slimkit's default) and per-tensor weights (one grid per layer, where plain
PTQ loses the most), each plain and with ``keep_fp32: auto`` (defaults: at most 10% of the
layers, stop at output cosine 0.999). Quality on the held-out ``stdlib-docs`` sentences: the
cosine of mean-pooled embeddings to the FP32 model's and the Spearman correlation of their
pairwise similarities; onnxruntime's ``quantize_dynamic`` of the FP32 model is the zero-effort
baseline, measured in the same run. Speed: every model against FP32 eager at batch 32 x 128
tokens, interleaved in this process (2 threads); needs a quiet machine (``--no-timing`` skips it).

Goal (issue 12): where plain PTQ loses >= 2 points, ``auto`` recovers at least half of the loss
with <= 10% of the layers in float. Writes ``benchmarks/results/int8_keep_fp32.json``.

    python benchmarks/int8_keep_fp32.py [--no-timing] [--rounds 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # do not spin when another process holds a core

import argparse  # noqa: E402
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from prune_quality import embed, minilm_data, quality  # noqa: E402


def _ptq(fp32, calibration, granularity: str, keep_fp32) -> tuple:
    model = copy.deepcopy(fp32)
    recipe = {"quant": {"mode": "ptq", "weights": {"granularity": granularity}, "keep_fp32": keep_fp32}}
    start = time.perf_counter()
    slimkit.prepare(model, recipe, example_inputs=calibration[0])
    slimkit.calibrate(model, calibration)
    quantizer = slimkit.methods_of(model)["quant"]
    choice = quantizer.kept_fp32
    info = {"layers_quantized": len(quantizer.layers), "calibrate_s": round(time.perf_counter() - start, 1)}
    if choice is not None:
        info.update(kept_fp32=choice.layers, recovery={n: round(choice.recovery[n], 5) for n in choice.layers})
        info["kept_fraction"] = round(len(choice.layers) / choice.candidates, 3)
    return slimkit.convert_(model), info


def _ort_dynamic(fp32, batch, eval_batches, tmp: Path):
    onnx = slimkit.export_onnx(copy.deepcopy(fp32), tmp / "fp32.onnx", batch)
    session = common.ort_session(common.ort_dynamic_quantize(onnx, tmp / "dynamic.onnx"))
    names = {i.name for i in session.get_inputs()}

    def run(b):
        return session.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0]

    hidden = [torch.from_numpy(run(b)) for b in eval_batches]
    embeddings = torch.cat([common.mean_pool(h, b["attention_mask"]) for h, b in zip(hidden, eval_batches)])
    return session, run, embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=128, help="training sentences to calibrate on")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (batch 32 x 128 tokens)")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    common.setup_machine()
    tokenizer, fp32 = common.minilm()
    data = minilm_data(tokenizer, args.calibration)
    reference = torch.nn.functional.normalize(embed(fp32, data["eval"]), dim=-1)
    rows: dict[str, dict] = {"fp32": {"cosine": 1.0, "spearman": 1.0}}
    models = {}
    for granularity in ("per_channel", "per_tensor"):
        for keep in (None, "auto"):
            name = f"ptq_{granularity}" + ("_keep_fp32_auto" if keep else "")
            model, info = _ptq(fp32, data["calibration"], granularity, keep)
            got = torch.nn.functional.normalize(embed(model, data["eval"]), dim=-1)
            rows[name] = {**quality(got, reference), **info}
            models[name] = model
            print(f"{name:36s} cosine {rows[name]['cosine']:.5f}  Spearman {rows[name]['spearman']:.5f}", flush=True)
    timing_batch = {k: v[:, :128] for k, v in data["calibration"][0].items()}  # 32 sentences, up to 128 tokens
    with tempfile.TemporaryDirectory() as tmp:
        session, run, ort_embeddings = _ort_dynamic(fp32, timing_batch, data["eval"], Path(tmp))
        rows["onnxruntime_quantize_dynamic"] = quality(torch.nn.functional.normalize(ort_embeddings, dim=-1), reference)
        print(f"{'onnxruntime_quantize_dynamic':36s} cosine {rows['onnxruntime_quantize_dynamic']['cosine']:.5f}")
        if not args.no_timing:
            variants = {"fp32": lambda: fp32(**timing_batch)}
            variants.update({n: (lambda m=m: m(**timing_batch)) for n, m in models.items()})
            variants["onnxruntime_quantize_dynamic"] = lambda: run(timing_batch)
            timings = common.interleaved(variants, args.rounds, 1)
            for name, ratio in common.speedups(timings, "fp32").items():
                rows[name]["speedup_b32"] = ratio
            print({n: r.get("speedup_b32") for n, r in rows.items()})
    goals = {}
    for granularity in ("per_channel", "per_tensor"):
        plain, auto = rows[f"ptq_{granularity}"], rows[f"ptq_{granularity}_keep_fp32_auto"]
        loss = 1.0 - plain["cosine"]
        recovered = (auto["cosine"] - plain["cosine"]) / loss if loss > 0 else None
        goals[f"{granularity}_auto_recovers_half_of_a_loss_of_2_points_with_at_most_10pct_float"] = {
            "plain_loss_points": round(100 * loss, 2),
            "recovered_fraction": None if recovered is None else round(recovered, 3),
            "kept_fraction": auto.get("kept_fraction"),
            "applies": loss >= 0.02,
            "met": loss < 0.02 or (recovered >= 0.5 and auto.get("kept_fraction", 1.0) <= 0.1),
        }
    report = {
        "machine": common.machine_info(),
        "settings": vars(args),
        "data": data["sizes"],
        "quality_metric": "mean-pooled embedding cosine and Spearman of pairwise similarities to FP32, held-out "
        "stdlib-docs sentences",
        "rows": rows,
        "goals": goals,
    }
    for goal, value in goals.items():
        print(f"{'MET ' if value['met'] else 'MISS'} {goal}: {value}")
    print(f"wrote {common.write_json('int8_keep_fp32.json', report)}")


if __name__ == "__main__":
    main()
