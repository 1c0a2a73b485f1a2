"""Inductor's C++ wrapper against its Python wrapper on compiled INT8 models, head to head.

``slimkit.quant.compile_int8`` (and the runtime ``slimkit.convert`` installs) compiles with
``options={"cpp_wrapper": True}`` unless told otherwise. This times, for each model and batch,
FP32 eager, the INT8 model compiled with the Python wrapper (``options={"cpp_wrapper": False}``)
and with the default C++ wrapper, interleaved in one process (2 threads, denormals flushed),
plus each wrapper's compile time. Models: the tutorial's SmallCNN and the demo's digits CNN at
32x32 (``small_models.py``, batch 1 and 32), timm resnet50, mobilenetv3_large_100 and
vit_small_patch16_224 at 224 (batch 1 and 16); random weights, PTQ on smooth random images.
Needs a quiet machine. Writes benchmarks/results/int8_wrapper.json.

    python benchmarks/int8_wrapper.py [--models tutorial_smallcnn resnet50]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from int8_common import interleaved, machine_info, setup_machine, write_json
from small_models import TutorialCNN, demo_cnn

import slimkit
import slimkit.quant

MODELS = {  # name: (channels, size, batches)
    "tutorial_smallcnn": (3, 32, (1, 32)),
    "digits_cnn": (1, 32, (1, 32)),
    "resnet50": (3, 224, (1, 16)),
    "mobilenetv3_large_100": (3, 224, (1, 16)),
    "vit_small_patch16_224": (3, 224, (1, 16)),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tutorial_smallcnn":
        return TutorialCNN().eval()
    if name == "digits_cnn":
        return demo_cnn().eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def int8_of(fp32: torch.nn.Module, calibration: list) -> torch.nn.Module:
    model = copy.deepcopy(fp32)
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=calibration[0])
    slimkit.calibrate(model, calibration)
    return slimkit.convert_(model)


def bench(name: str) -> dict:
    channels, size, batches = MODELS[name]
    fp32 = build(name)
    g = torch.Generator().manual_seed(0)
    smooth = [F.interpolate(torch.randn(8, channels, 8, 8, generator=g), size=size, mode="bilinear") for _ in range(4)]
    int8 = int8_of(fp32, smooth)
    out = {}
    for batch in batches:
        x = smooth[0][:1].repeat(batch, 1, 1, 1)
        models = {
            "python": slimkit.quant.compile_int8(copy.deepcopy(int8), options={"cpp_wrapper": False}),
            "cpp": slimkit.quant.compile_int8(copy.deepcopy(int8)),
        }
        entry: dict = {"compile_s": {}}
        with torch.inference_mode():
            for key, model in models.items():
                start = time.perf_counter()
                model(x)  # compiles this shape
                entry["compile_s"][key] = round(time.perf_counter() - start, 1)
                entry[f"{key}_signature"] = slimkit.quant.runtime_report(model)["signatures"][0]
            small = size <= 32
            rounds, iters = (15, 40 if batch == 1 else 8) if small else ((8, 3) if batch == 1 else (3, 1))
            timing = interleaved(
                {"fp32_eager": lambda x=x: fp32(x), **{k: (lambda m=m, x=x: m(x)) for k, m in models.items()}},
                rounds=rounds,
                iters=iters,
            )
        base = timing["fp32_eager"]["median_s"]
        entry["speedup_vs_fp32_eager"] = {k: round(base / v["median_s"], 3) for k, v in timing.items()}
        entry["cpp_over_python"] = round(timing["python"]["median_s"] / timing["cpp"]["median_s"], 3)
        print(f"{name:>22} b{batch:<3} {entry['speedup_vs_fp32_eager']}  C++/Python {entry['cpp_over_python']:.2f}x")
        out[str(batch)] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    setup_machine()
    report = {"machine": machine_info(), "models": {}}
    for name in args.models:
        report["models"][name] = bench(name)
        write_json("int8_wrapper.json", report)
    print("wrote benchmarks/results/int8_wrapper.json")


if __name__ == "__main__":
    main()
