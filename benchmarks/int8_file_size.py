"""INT8 file size: the saved INT8 folder's ``model.safetensors`` against the FP32 one.

    .venv/bin/python benchmarks/int8_file_size.py            # about a minute on 2 cores

For each model: the FP32 file, the INT8 file as slimkit writes it (format 2: small tensors
packed, slimkit/packing.py) and the same INT8 tensors stored one by one (format 1, what
slimkit wrote before), each with its safetensors header's share, and beside them the peer a user
would pick instead: onnxruntime's INT8 ONNX of the same FP32 model (``quantize_static`` on the
same calibration for the CNNs, ``quantize_dynamic`` for MiniLM) against its FP32 ONNX file. No
timing: sizes are exact. Goal: the INT8 file at most 0.27x the FP32 file. Writes
``benchmarks/results/int8_file_size.json``.
"""

from __future__ import annotations

import argparse
import copy
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_common import (  # noqa: E402
    minilm,
    ort_dynamic_quantize,
    ort_static_quantize,
    training_sentences,
    write_json,
)
from small_models import demo_cnn  # noqa: E402

import slimkit  # noqa: E402
from slimkit.hub import student_state_dict  # noqa: E402

GOAL = 0.27
MODELS = ("digits_cnn", "mobilenetv2_050", "resnet18", "minilm")


def _sizes(file: Path) -> dict:
    """Total bytes, header bytes (the 8-byte length and the JSON) and tensor entries."""
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    with safe_open(str(file), framework="pt") as f:
        entries = len(list(f.keys()))  # noqa: SIM118 (safe_open is not a mapping)
    return {"bytes": file.stat().st_size, "header_bytes": 8 + header, "entries": entries}


def _model_and_calibration(name: str):
    if name == "minilm":
        tokenizer, model = minilm()
        texts = training_sentences(32)
        batches = [
            dict(tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in (0, 16)
        ]
        return model, batches
    if name == "digits_cnn":
        model, shape = demo_cnn().eval(), (8, 1, 32, 32)
    else:
        import timm

        model, shape = timm.create_model(name, pretrained=False).eval(), (8, 3, 224, 224)
    generator = torch.Generator().manual_seed(0)
    return model, [torch.randn(shape, generator=generator) for _ in range(2)]


def measure(name: str, tmp: Path) -> dict:
    fp32, batches = _model_and_calibration(name)
    int8 = copy.deepcopy(fp32)
    slimkit.prepare(int8, {"quant": {"mode": "ptq", "compile": "never"}}, example_inputs=batches[0])
    slimkit.calibrate(int8, batches)
    int8 = slimkit.convert(int8)
    fp32_file = slimkit.save_pretrained(fp32, tmp / f"{name}-fp32", model_card=False) / "model.safetensors"
    int8_file = slimkit.save_pretrained(int8, tmp / f"{name}-int8", model_card=False) / "model.safetensors"
    format1 = tmp / f"{name}-format1.safetensors"
    save_file(student_state_dict(int8), str(format1), metadata={"format": "pt"})
    sizes = {"fp32": _sizes(fp32_file), "int8": _sizes(int8_file), "int8_format1": _sizes(format1)}
    for key in ("int8", "int8_format1"):
        sizes[key]["ratio"] = round(sizes[key]["bytes"] / sizes["fp32"]["bytes"], 4)
    fp32_onnx = slimkit.export_onnx(copy.deepcopy(fp32), tmp / f"{name}-fp32.onnx", batches[0])
    peer, quantize = (
        ("ort_quantize_dynamic", lambda out: ort_dynamic_quantize(fp32_onnx, out))
        if name == "minilm"
        else ("ort_quantize_static", lambda out: ort_static_quantize(fp32_onnx, out, batches))
    )
    peer_file = quantize(tmp / f"{name}-{peer}.onnx")
    sizes["peer"] = {
        "name": peer,
        "fp32_onnx_bytes": fp32_onnx.stat().st_size,
        "int8_onnx_bytes": peer_file.stat().st_size,
        "ratio": round(peer_file.stat().st_size / fp32_onnx.stat().st_size, 4),
    }
    sizes["goal"] = {"int8_ratio_at_most": GOAL, "met": sizes["int8"]["ratio"] <= GOAL}
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = r = measure(name, Path(tmp))
            print(
                f"{name:16s} FP32 {r['fp32']['bytes']:>11,} B | INT8 {r['int8']['bytes']:>10,} B = "
                f"{r['int8']['ratio']:.3f}x (header {r['int8']['header_bytes']:,} B, {r['int8']['entries']} entries) | "
                f"format 1: {r['int8_format1']['ratio']:.3f}x (header {r['int8_format1']['header_bytes']:,} B, "
                f"{r['int8_format1']['entries']} entries) | {r['peer']['name']}: {r['peer']['ratio']:.3f}x "
                f"its FP32 ONNX ({r['peer']['int8_onnx_bytes']:,} B) | "
                f"goal <= {GOAL}: {'met' if r['goal']['met'] else 'NOT met'}"
            )
    write_json("int8_file_size.json", {"models": results})


if __name__ == "__main__":
    main()
