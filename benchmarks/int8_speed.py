"""INT8 inference speed: slimkit against FP32 and against the INT8 peers, on the same model.

    .venv/bin/python benchmarks/int8_speed.py                 # everything (about 40 min on 2 cores)
    .venv/bin/python benchmarks/int8_speed.py --models resnet18 --batches 1

Per model and batch size, timed interleaved in one process (2 threads, denormals flushed):

* ``fp32_eager``: the PyTorch model as built;
* ``slimkit_int8_eager``: ``slimkit.convert`` (PTQ-calibrated) with ``quant.compile: never``
  (oneDNN int8 kernels per layer);
* ``slimkit_int8_compiled``: the same model compiled (Inductor, fused; ``quant.compile: always``);
* ``slimkit_int8_auto``: the model exactly as ``slimkit.convert`` returns it for models with INT8
  convolutions (``quant.compile: auto``: compiled, or its onnxruntime session where the first
  calls measure that faster; ``compiled_runtime`` in the JSON says which it kept, with both
  times). ``convert_returns`` says which variant the default is (``eager`` for Linear-only models);
* ``slimkit_int8_onnxruntime``: the same model with ``quant.compile: onnxruntime``, called as a
  torch module (tensors in and out): an onnxruntime session of slimkit's QDQ export per input
  shape, built on its first call (``compile_s``);
* ``slimkit_onnx_ort``: ``slimkit.export_onnx`` of that model (QDQ) on onnxruntime, called
  directly (numpy in and out);
* peers on the same weights: ``ort_fp32``, ``ort_static_int8`` (``quantize_static``: QDQ,
  per-channel), ``ort_dynamic_int8`` (``quantize_dynamic``), ``torch_dynamic_int8``
  (``torch.ao.quantization.quantize_dynamic`` of the Linear layers).

Models: the demo's digits CNN and the tutorial's SmallCNN at 32x32 (``small_models.py``),
timm models at 224x224 with random weights. MiniLM (the real all-MiniLM-L6-v2) runs at batch
32 x 128 tokens, with slimkit's static (PTQ) and dynamic modes. Also measured: the saved
INT8 / FP32 file size, and the time of a QAT training step against a plain one.
Prints ratios and writes ``benchmarks/results/int8_speed.json``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP: this machine is shared, and spin-waiting OpenMP threads
# collapse (10x and more) when another process holds one of the two cores; passive waiting
# keeps PyTorch's timings meaningful. onnxruntime sessions get the same (no spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_common import (  # noqa: E402
    EVAL_SENTENCES,
    add_malloc_argument,
    apply_malloc,
    interleaved,
    machine_info,
    minilm,
    ort_dynamic_quantize,
    ort_runner,
    ort_session,
    ort_static_quantize,
    setup_machine,
    speedups,
    training_sentences,
    write_json,
)

import slimkit  # noqa: E402
import slimkit.quant  # noqa: E402

TIMM_MODELS = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv2_050": "mobilenetv2_050",
    "mobilenetv2_100": "mobilenetv2_100",
    "efficientnet_b0": "efficientnet_b0",
    "vit_s": "vit_small_patch16_224",
}
# the small CNNs of the issue, at 32x32 (benchmarks/small_models.py)
SMALL_MODELS = {"digits_cnn": (1, 32), "tutorial_smallcnn": (3, 32)}
PEERS = ("ort_static_int8", "ort_dynamic_int8", "torch_dynamic_int8")


def _logits(out) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return torch.as_tensor(out).float()


def _agreement(a, b) -> dict:
    a, b = _logits(a), _logits(b)
    return {
        "argmax_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4),
        "max_abs_diff": float((a - b).abs().max()),
    }


def _call(model, inputs):
    return (lambda: model(**inputs)) if isinstance(inputs, dict) else (lambda: model(inputs))


def _file_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)


class Candidates:
    """Every variant of one model, built once and timed at several batch sizes."""

    def __init__(self, name: str, fp32: nn.Module, calibration: list, tmp: Path, modes: tuple[str, ...]):
        self.name, self.fp32, self.tmp = name, fp32, tmp
        self.models: dict[str, nn.Module] = {"fp32_eager": fp32}
        self.sessions: dict[str, object] = {}
        self.fake_quant: dict[str, nn.Module] = {}
        self.info: dict = {"build_s": {}}
        example = calibration[0]
        for mode in modes:
            tag = "" if mode == "ptq" else "_dynamic"
            start = time.perf_counter()
            prepared = copy.deepcopy(fp32)
            slimkit.prepare(prepared, {"quant": {"mode": mode}}, example_inputs=example)
            if mode == "ptq":
                slimkit.calibrate(prepared, calibration)
            self.fake_quant[mode] = prepared
            int8 = slimkit.convert_(copy.deepcopy(prepared))
            # what convert returns (auto): compiled or onnxruntime (models with INT8 convs, measured
            # on first call), or eager; timed beside each path forced
            self.info[f"convert_returns{tag}"] = "auto" if int8.forward.compiles else "eager"
            if int8.forward.compiles:
                self.models[f"slimkit_int8{tag}_auto"] = copy.deepcopy(int8)
            self.models[f"slimkit_int8{tag}_compiled"] = slimkit.quant.compile_int8(copy.deepcopy(int8))
            self.models[f"slimkit_int8{tag}_onnxruntime"] = slimkit.quant.set_compile(
                copy.deepcopy(int8), "onnxruntime"
            )
            self.models[f"slimkit_int8{tag}_eager"] = slimkit.quant.set_compile(int8, "never")
            onnx_path = slimkit.export_onnx(int8, tmp / f"slimkit{tag}.onnx", example)
            self.sessions[f"slimkit{tag}_onnx_ort"] = ort_session(onnx_path)
            self.info["build_s"][f"slimkit_{mode}"] = round(time.perf_counter() - start, 1)
            self.info[f"onnx_mb_slimkit{tag}"] = _file_mb(onnx_path)
            if mode == "ptq" or "int8_file_ratio" not in self.info:
                self._file_sizes(int8)
        start = time.perf_counter()
        fp32_onnx = slimkit.export_onnx(copy.deepcopy(fp32), tmp / "fp32.onnx", example)
        self.sessions["ort_fp32"] = ort_session(fp32_onnx)
        static = ort_static_quantize(fp32_onnx, tmp / "ort_static.onnx", calibration)
        self.sessions["ort_static_int8"] = ort_session(static)
        dynamic = ort_dynamic_quantize(fp32_onnx, tmp / "ort_dynamic.onnx")
        self.sessions["ort_dynamic_int8"] = ort_session(dynamic)
        self.models["torch_dynamic_int8"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8
        )
        self.info["build_s"]["peers"] = round(time.perf_counter() - start, 1)
        self.info["onnx_mb"] = {
            "fp32": _file_mb(fp32_onnx),
            "ort_static": _file_mb(static),
            "ort_dynamic": _file_mb(dynamic),
        }

    def _file_sizes(self, int8: nn.Module) -> None:
        try:
            fp32_dir = slimkit.save_pretrained(self.fp32, self.tmp / "fp32_folder", model_card=False)
        except slimkit.SlimkitError:  # plain nn.Module (the tutorial's SmallCNN): no folder format
            return
        int8_dir = slimkit.save_pretrained(int8, self.tmp / "int8_folder", model_card=False)
        fp32_mb, int8_mb = _file_mb(fp32_dir / "model.safetensors"), _file_mb(int8_dir / "model.safetensors")
        self.info.update(
            {"fp32_file_mb": fp32_mb, "int8_file_mb": int8_mb, "int8_file_ratio": round(int8_mb / fp32_mb, 4)}
        )

    def run(self, inputs, rounds: int, iters: int) -> dict:
        variants = {name: _call(model, inputs) for name, model in self.models.items()}
        variants.update({name: ort_runner(s, inputs) for name, s in self.sessions.items()})
        compile_s = {}
        with torch.inference_mode():
            for name in [n for n in variants if n.endswith(("_compiled", "_onnxruntime", "_auto"))]:
                start = time.perf_counter()
                variants[name]()  # compiles, or exports and opens a session, for this batch size
                compile_s[name] = round(time.perf_counter() - start, 1)
            outputs = {name: fn() for name, fn in variants.items()}
            parity = {}
            for mode, fake in self.fake_quant.items():
                tag = "" if mode == "ptq" else "_dynamic"
                reference = _call(fake.eval(), inputs)()
                for path in ("eager", "compiled", "onnxruntime", "auto"):
                    if f"slimkit_int8{tag}_{path}" in outputs:
                        parity[f"slimkit_int8{tag}_{path}_vs_fake_quant"] = _agreement(
                            reference, outputs[f"slimkit_int8{tag}_{path}"]
                        )
                parity[f"slimkit{tag}_onnx_ort_vs_fake_quant"] = _agreement(
                    reference, outputs[f"slimkit{tag}_onnx_ort"]
                )
            for name in ("ort_static_int8", "ort_dynamic_int8", "torch_dynamic_int8"):
                parity[f"{name}_vs_fp32"] = _agreement(outputs["fp32_eager"], outputs[name])
        # sub-millisecond calls (small CNNs, onnxruntime at batch 1) fill at least 50 ms a round
        timings = interleaved(variants, rounds=rounds, iters=iters, min_round_s=0.05)
        kernels = {
            name: slimkit.quant.runtime_report(model)["signatures"]
            for name, model in self.models.items()
            if name.endswith(("_compiled", "_onnxruntime", "_auto"))
        }
        return {
            "compile_s": compile_s,
            "timings": timings,
            "speedup_vs_fp32_eager": speedups(timings),
            "speedup_vs_ort_static_int8": speedups(timings, "ort_static_int8"),
            "compiled_runtime": kernels,
            "parity": parity,
        }


def _image_inputs(batch: int, size: int = 224, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))


def build_image_model(name: str) -> tuple[nn.Module, list[torch.Tensor], int, int]:
    """(FP32 model in eval mode, its calibration batches, channels, size) for an image model:
    the small CNNs of small_models.py at 32x32, timm models at 224x224 with random weights."""
    import timm
    from small_models import TutorialCNN, demo_cnn

    channels, size = SMALL_MODELS.get(name, (3, 224))
    if name == "digits_cnn":
        fp32 = demo_cnn().eval()
    elif name == "tutorial_smallcnn":
        fp32 = TutorialCNN().eval()
    else:
        fp32 = timm.create_model(TIMM_MODELS[name], pretrained=False).eval()
    return fp32, [_image_inputs(8 + i, size, channels) for i in range(2)], channels, size


def bench_timm(name: str, batches: list[int], rounds: int) -> dict:
    fp32, calibration, channels, size = build_image_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        candidates = Candidates(name, fp32, calibration, Path(tmp), modes=("ptq",))
        result = {"model": TIMM_MODELS.get(name, name), **candidates.info, "batches": {}}
        for batch in batches:
            iters = (40 if name in SMALL_MODELS else 8) if batch == 1 else (8 if name in SMALL_MODELS else 1)
            print(f"[{name}] batch {batch}: timing {len(candidates.models) + len(candidates.sessions)} variants")
            inputs = _image_inputs(batch, size, channels)
            result["batches"][str(batch)] = candidates.run(inputs, rounds=rounds, iters=iters)
            _print(name, batch, result["batches"][str(batch)])
    return result


def bench_minilm(rounds: int) -> dict:
    tokenizer, fp32 = minilm()

    def tokens(texts):
        return dict(tokenizer(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))

    train = training_sentences(64)
    calibration = [tokens(train[i : i + 16]) for i in range(0, 64, 16)]
    inputs = tokens(EVAL_SENTENCES[:32])
    with tempfile.TemporaryDirectory() as tmp:
        candidates = Candidates("minilm", fp32, calibration, Path(tmp), modes=("ptq", "dynamic"))
        result = {**candidates.info, "batches": {}}
        print("[minilm] batch 32 x 128 tokens")
        result["batches"]["32"] = candidates.run(inputs, rounds=rounds, iters=1)
        _print("minilm", 32, result["batches"]["32"])
    return result


def _print(name: str, batch: int, result: dict) -> None:
    for variant, ratio in sorted(result["speedup_vs_fp32_eager"].items(), key=lambda kv: -kv[1]):
        ms = result["timings"][variant]["median_s"] * 1e3
        print(f"  {name:12s} b{batch:<3d} {variant:32s} {ms:10.2f} ms  {ratio:6.2f}x FP32 eager")


# ----------------------------------------------------------------------------------------
# a QAT training step against a plain one
# ----------------------------------------------------------------------------------------


def _train_step(model, optimizer, inputs, loss_fn, prepared: bool) -> None:
    loss = loss_fn(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if prepared:
        slimkit.step(model)


def qat_step_ratio(name: str, rounds: int) -> dict:
    """Seconds per training step, plain vs QAT (observing phase: observers update every step)."""
    if name == "resnet18":
        import timm

        def build():
            torch.manual_seed(0)
            return timm.create_model("resnet18", pretrained=False)

        inputs = _image_inputs(16)
        labels = torch.randint(0, 1000, (16,))

        def loss_fn(model, x):
            return nn.functional.cross_entropy(model(x), labels)

        example = inputs[:2]
    else:
        tokenizer, base = minilm()

        def build():
            return copy.deepcopy(base).train()

        inputs = dict(tokenizer(training_sentences(16), padding="max_length", max_length=128, return_tensors="pt"))
        target = torch.randn(16, 128, 384)

        def loss_fn(model, batch):
            return nn.functional.mse_loss(model(**batch).last_hidden_state, target)

        example = {k: v[:2] for k, v in inputs.items()}
    plain, qat = build().train(), build().train()
    slimkit.prepare(qat, {"quant": {}}, example_inputs=example)
    qat.train()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-4, momentum=0.9)
    opt_qat = torch.optim.SGD(qat.parameters(), lr=1e-4, momentum=0.9)
    steps = {
        "plain_step": lambda: _train_step(plain, opt_plain, inputs, loss_fn, False),
        "qat_step": lambda: _train_step(qat, opt_qat, inputs, loss_fn, True),
    }
    for _ in range(3):  # the first steps allocate and settle; a training run is thousands of steps
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["qat_step"] / med["plain_step"]
    print(f"  QAT step / plain step ({name}): {ratio:.3f} ({med['qat_step']:.3f} s vs {med['plain_step']:.3f} s)")
    return {
        "batch": 16,
        "plain_step_s": round(med["plain_step"], 4),
        "qat_step_s": round(med["qat_step"], 4),
        "ratio": round(ratio, 3),
        "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }


# ----------------------------------------------------------------------------------------
# goals
# ----------------------------------------------------------------------------------------


def _best(result: dict, prefix: str) -> tuple[str, float]:
    timings = result["timings"]
    names = [n for n in timings if n.startswith(prefix)]
    name = min(names, key=lambda n: timings[n]["median_s"])
    return name, timings[name]["median_s"]


def evaluate_goals(models: dict, qat: dict) -> dict:
    goals = {}

    def speed_goal(model: str, batch: str, target: float) -> None:
        result = models.get(model, {}).get("batches", {}).get(batch)
        if result is None:
            return
        name, _ = _best(result, "slimkit")
        value = result["speedup_vs_fp32_eager"][name]
        goals[f"{model}_b{batch}_speedup>={target}"] = {
            "best_slimkit": name,
            "value": value,
            "met": value >= target,
        }

    for model, data in models.items():
        for batch, result in data.get("batches", {}).items():
            returned = f"slimkit_int8_{data.get('convert_returns', 'eager')}"
            value = result["speedup_vs_fp32_eager"].get(returned)
            if value is None:
                continue
            goals[f"{model}_b{batch}_convert_returns>=1.0x_fp32_eager"] = {
                "path": returned,
                "value": value,
                "met": value >= 1.0,
            }
            if model in SMALL_MODELS:
                target = 1.5 if batch == "1" else 2.0
                goals[f"{model}_b{batch}_convert_returns>={target}x"] = {
                    "path": returned,
                    "value": value,
                    "met": value >= target,
                }
            if data.get("convert_returns") == "auto":  # auto compiles first: it should pay
                eager = result["speedup_vs_fp32_eager"]["slimkit_int8_eager"]
                goals[f"{model}_b{batch}_compiled>=eager"] = {
                    "compiled": result["speedup_vs_fp32_eager"]["slimkit_int8_compiled"],
                    "eager": eager,
                    "met": result["speedup_vs_fp32_eager"]["slimkit_int8_compiled"] >= eager,
                }
    speed_goal("resnet50", "1", 3.5)
    speed_goal("resnet50", "32", 5.0)
    speed_goal("minilm", "32", 2.2)
    for model, data in models.items():
        for batch, result in data.get("batches", {}).items():
            ours, ours_s = _best(result, "slimkit")
            peer, peer_s = min(((p, result["timings"][p]["median_s"]) for p in PEERS), key=lambda kv: kv[1])
            goals[f"{model}_b{batch}_within_5pct_of_best_peer"] = {
                "best_slimkit": ours,
                "best_peer": peer,
                "slimkit_time_over_peer_time": round(ours_s / peer_s, 3),
                "met": ours_s <= 1.05 * peer_s,
            }
        if "int8_file_ratio" in data:
            goals[f"{model}_int8_file<=0.27x"] = {
                "value": data["int8_file_ratio"],
                "met": data["int8_file_ratio"] <= 0.27,
            }
    for model, data in qat.items():
        goals[f"{model}_qat_step<=1.4x"] = {"value": data["ratio"], "met": data["ratio"] <= 1.4}
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*SMALL_MODELS, *TIMM_MODELS, "minilm"], help="models to time")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="image batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--qat-models", nargs="*", default=["resnet18", "minilm"], help="QAT step ratio models")
    parser.add_argument("--qat-rounds", type=int, default=10, help="interleaved rounds of the QAT step ratio")
    parser.add_argument("--output", default="int8_speed.json", help="file name under benchmarks/results/")
    add_malloc_argument(parser)
    args = parser.parse_args()
    apply_malloc(args)
    setup_machine()
    report = {"machine": machine_info(), "settings": vars(args), "models": {}, "qat_step": {}}
    # the QAT steps first: measured after the INT8 timings, resnet18's ratio read 1.45x where a
    # fresh process reads 1.33x (what those timings leave running: onnxruntime's thread pools,
    # the compile workers), and a training run does not share its process with them
    for name in args.qat_models:
        report["qat_step"][name] = qat_step_ratio(name, rounds=max(3, args.qat_rounds))
    for name in args.models:
        start, load = time.perf_counter(), os.getloadavg()[0]
        report["models"][name] = (
            bench_minilm(args.rounds) if name == "minilm" else bench_timm(name, args.batches, args.rounds)
        )
        report["models"][name]["wall_s"] = round(time.perf_counter() - start, 1)
        # other processes on this shared machine skew absolute times (ratios are interleaved)
        report["models"][name]["load_average"] = {"start": load, "end": os.getloadavg()[0]}
        write_json(args.output, report)  # keep partial results if a later model fails
    report["goals"] = evaluate_goals(report["models"], report["qat_step"])
    path = write_json(args.output, report)
    print("\nGoals:")
    for goal, value in report["goals"].items():
        print(f"  {'MET ' if value['met'] else 'MISS'} {goal}: {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
