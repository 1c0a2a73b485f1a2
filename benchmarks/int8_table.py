"""Markdown tables from benchmarks/results/int8_speed.json and int8_accuracy.json (for the docs).

.venv/bin/python benchmarks/int8_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    ("slimkit_int8_auto", "slimkit INT8 as converted (auto)"),
    ("slimkit_int8_eager", "slimkit INT8 eager"),
    ("slimkit_int8_compiled", "slimkit INT8 compiled"),
    ("slimkit_int8_onnxruntime", "slimkit INT8 onnxruntime"),
    ("slimkit_onnx_ort", "slimkit ONNX (ORT)"),
    ("slimkit_int8_dynamic_compiled", "slimkit dynamic compiled"),
    ("slimkit_dynamic_onnx_ort", "slimkit dynamic ONNX (ORT)"),
    ("ort_fp32", "ORT FP32"),
    ("ort_static_int8", "ORT quantize_static"),
    ("ort_dynamic_int8", "ORT quantize_dynamic"),
    ("torch_dynamic_int8", "torch dynamic"),
]


def speed_table(data: dict) -> str:
    present = [
        (key, title)
        for key, title in COLUMNS
        if any(key in b["speedup_vs_fp32_eager"] for m in data["models"].values() for b in m["batches"].values())
    ]
    lines = [
        "| model | batch | FP32 eager ms | " + " | ".join(t for _, t in present) + " | INT8 / FP32 file |",
        "|---|---|---|" + "---|" * len(present) + "---|",
    ]
    for name, model in data["models"].items():
        for batch, result in model["batches"].items():
            fp32_ms = result["timings"]["fp32_eager"]["median_s"] * 1e3
            cells = [
                f"{result['speedup_vs_fp32_eager'][k]:.2f}x" if k in result["timings"] else "-" for k, _ in present
            ]
            label = f"{batch} x 128 tok" if name == "minilm" else batch
            ratio = model.get("int8_file_ratio")
            lines.append(
                f"| {name} | {label} | {fp32_ms:.1f} | " + " | ".join(cells) + f" | {ratio:.3f} |"
                if ratio is not None
                else f"| {name} | {label} | {fp32_ms:.1f} | " + " | ".join(cells) + " | - |"
            )
    return "\n".join(lines)


def main() -> None:
    speed = RESULTS / "int8_speed.json"
    if speed.exists():
        data = json.loads(speed.read_text())
        print(speed_table(data))
        print()
        for model, qat in data.get("qat_step", {}).items():
            print(f"- QAT step / plain step, {model} (batch {qat['batch']}): {qat['ratio']:.2f}x")
        print()
        for goal, value in data.get("goals", {}).items():
            print(f"- {'met' if value['met'] else '**not met**'}: `{goal}`: {value}")
    accuracy = RESULTS / "int8_accuracy.json"
    if accuracy.exists():
        data = json.loads(accuracy.read_text())
        d = data["digits"]
        print()
        print("| digits CNN | FP32 | PTQ INT8 | QAT INT8 |")
        print("|---|---|---|---|")
        print(f"| test accuracy (%) | {d['fp32_accuracy']} | {d['ptq_int8_accuracy']} | {d['qat_int8_accuracy']} |")
        if "minilm" in data:
            print()
            print("| MiniLM embeddings vs FP32 | mean cosine | min cosine |")
            print("|---|---|---|")
            for name, value in data["minilm"]["cosine_vs_fp32"].items():
                print(f"| {name} | {value['mean']:.4f} | {value['min']:.4f} |")
        for goal, value in data.get("goals", {}).items():
            print(f"- {'met' if value['met'] else '**not met**'}: `{goal}`: {value}")


if __name__ == "__main__":
    main()
