"""INT8 accuracy: FP32 against PTQ and QAT INT8, on real data and the real MiniLM.

    .venv/bin/python benchmarks/int8_accuracy.py            # about 10 min on 2 cores

* digits (``sklearn.datasets.load_digits``, 8x8 images, fixed 1397 / 400 split): a small CNN
  trained in FP32, then (a) PTQ INT8 (calibrated on training images) and (b) QAT INT8 (QAT
  fine-tuning started from the calibrated scales, ranges and BatchNorms frozen half way).
  Goal: QAT INT8 within 0.5 points of FP32.
* MiniLM (the real all-MiniLM-L6-v2): mean-pooled sentence embeddings of a fixed set of 64
  held-out sentences, INT8 against FP32 (cosine similarity, mean and minimum), for slimkit PTQ
  (static), slimkit dynamic, slimkit QAT+KD (static and dynamic: the FP32 model is the teacher,
  hidden states of all 6 layers distilled on templated training sentences), and
  onnxruntime's ``quantize_dynamic``. Goal: >= 0.99 with QAT+KD.

Writes ``benchmarks/results/int8_accuracy.json``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP: this machine is shared, and spin-waiting OpenMP threads
# collapse (10x and more) when another process holds one of the two cores; passive waiting
# keeps PyTorch's timings meaningful. onnxruntime sessions get the same (no spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_split import shuffled_digits  # noqa: E402
from int8_common import (  # noqa: E402
    EVAL_SENTENCES,
    RESULTS,
    machine_info,
    mean_pool,
    minilm,
    ort_dynamic_quantize,
    ort_session,
    setup_machine,
    training_sentences,
    write_json,
)
from int8_ptq_tools import bench_bn_freeze, bench_ptq_tools  # noqa: E402

import slimkit  # noqa: E402

# ----------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _batches(x, y, size: int, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def _train(model, train, epochs: int, lr: float, prepared: bool = False) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * len(_batches(*train, 64, 0))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for epoch in range(epochs):
        for x, y in _batches(*train, 64, epoch):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            if prepared:
                slimkit.step(model)
    model.eval()


@torch.no_grad()
def _accuracy(model, test) -> float:
    x, y = test
    return round(100.0 * (model.eval()(x).argmax(1) == y).float().mean().item(), 2)


def bench_digits(epochs: int, qat_epochs: int) -> dict:
    train, test = shuffled_digits(held_out=400)
    torch.manual_seed(0)
    fp32 = DigitsCNN()
    start = time.perf_counter()
    _train(fp32, train, epochs, lr=0.05)
    result = {"train": len(train[1]), "test": len(test[1]), "fp32_accuracy": _accuracy(fp32, test)}
    calibration = [x for x, _ in _batches(*train, 64, 1)[:8]]

    ptq = copy.deepcopy(fp32)
    slimkit.prepare(
        ptq,
        {"quant": {"mode": "ptq", "activations": {"observer": "histogram"}}},
        example_inputs=calibration[0],
    )
    slimkit.calibrate(ptq, calibration)
    result["ptq_fake_quant_accuracy"] = _accuracy(ptq, test)
    result["ptq_int8_accuracy"] = _accuracy(slimkit.convert_(ptq), test)

    qat = copy.deepcopy(fp32)
    steps = qat_epochs * len(_batches(*train, 64, 0))
    recipe = {"quant": {"freeze_observers_step": steps // 2, "freeze_bn_step": steps // 2}}
    slimkit.prepare(qat, recipe, example_inputs=calibration[0])
    slimkit.calibrate(qat, calibration)  # QAT starts from the PTQ scales
    _train(qat, train, qat_epochs, lr=0.005, prepared=True)
    result["qat_fake_quant_accuracy"] = _accuracy(qat, test)
    result["qat_int8_accuracy"] = _accuracy(slimkit.convert_(qat), test)
    result["qat_steps"] = steps
    result["qat_int8_minus_fp32_points"] = round(result["qat_int8_accuracy"] - result["fp32_accuracy"], 2)
    result["ptq_int8_minus_fp32_points"] = round(result["ptq_int8_accuracy"] - result["fp32_accuracy"], 2)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(
        f"digits: FP32 {result['fp32_accuracy']}%, PTQ INT8 {result['ptq_int8_accuracy']}%, "
        f"QAT INT8 {result['qat_int8_accuracy']}% ({result['qat_int8_minus_fp32_points']:+.2f} points)"
    )
    return result


# ----------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------


def _embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def _cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    cos = nn.functional.cosine_similarity(reference, candidate, dim=-1)
    return {"mean": round(cos.mean().item(), 5), "min": round(cos.min().item(), 5)}


def _qat_kd(student, teacher, tokenizer, mode: str, steps: int, lr: float, embeddings: bool = False) -> tuple:
    recipe = {
        "distill": {
            "features": [
                # the embedding is the mean of the last hidden states: match their directions,
                {"student": "encoder.layer.5", "teacher": "encoder.layer.5", "loss": "cosine", "weight": 1.0},
                # and keep every layer near the teacher's (hidden states have large outlier
                # dimensions, so MSE gets a small weight)
                {"student": "encoder.layer.*", "teacher": "encoder.layer.*", "weight": 0.01},
            ]
        },
        # static ranges come from calibration and stay fixed: the training text is templated
        "quant": {"mode": mode, "freeze_observers_step": 0, "embeddings": embeddings},
    }
    texts = training_sentences(16 * steps, seed=1)
    batches = [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, len(texts), 16)]
    student.requires_grad_(True)  # a copy of the teacher, which KD froze
    for module in student.modules():  # distil deterministic features: no dropout noise
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=batches[0])
    if mode == "qat":
        slimkit.calibrate(student, batches[:4])  # QAT starts from calibrated ranges
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    losses = []
    for step in range(steps):
        outputs = student(**batches[step])
        loss = slimkit.compute_loss(student, outputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(student)
        losses.append(loss.item())
    student.eval()
    return student, {"first_loss": round(losses[0], 5), "last_loss": round(sum(losses[-10:]) / 10, 5)}


def bench_minilm(steps: int, lr: float) -> dict:
    tokenizer, fp32 = minilm()
    batch = dict(tokenizer(EVAL_SENTENCES, padding=True, return_tensors="pt"))
    reference = _embed(fp32, batch)
    calibration = [dict(tokenizer(t, padding=True, return_tensors="pt")) for t in _chunks(training_sentences(64), 16)]
    result: dict = {"eval_sentences": len(EVAL_SENTENCES), "cosine_vs_fp32": {}}
    cos = result["cosine_vs_fp32"]

    ptq = copy.deepcopy(fp32)
    slimkit.prepare(ptq, {"quant": {"mode": "ptq"}}, example_inputs=calibration[0])
    slimkit.calibrate(ptq, calibration)
    cos["slimkit_ptq_static_int8"] = _cosine(reference, _embed(slimkit.convert_(ptq), batch))

    dynamic = copy.deepcopy(fp32)
    slimkit.prepare(dynamic, {"quant": {"mode": "dynamic"}}, example_inputs=calibration[0])
    cos["slimkit_dynamic_int8"] = _cosine(reference, _embed(slimkit.convert_(dynamic), batch))

    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = slimkit.export_onnx(copy.deepcopy(fp32), Path(tmp) / "fp32.onnx", batch)
        session = ort_session(ort_dynamic_quantize(fp32_onnx, Path(tmp) / "dynamic.onnx"))
        feed = {k: v.numpy() for k, v in batch.items() if k in {i.name for i in session.get_inputs()}}
        hidden = torch.from_numpy(session.run(None, feed)[0])
        cos["onnxruntime_quantize_dynamic"] = _cosine(reference, mean_pool(hidden, batch["attention_mask"]))

    training = {}
    for mode in ("qat", "dynamic"):
        start = time.perf_counter()
        student, log = _qat_kd(copy.deepcopy(fp32), fp32, tokenizer, mode, steps, lr)
        fake = _cosine(reference, _embed(student, batch))
        int8 = slimkit.convert_(student)
        name = "slimkit_qat_kd_static_int8" if mode == "qat" else "slimkit_qat_kd_dynamic_int8"
        cos[name] = _cosine(reference, _embed(int8, batch))
        training[name] = {
            **log,
            "fake_quant_cosine": fake,
            "steps": steps,
            "wall_s": round(time.perf_counter() - start, 1),
        }
    result["qat_kd"] = training
    for name, value in cos.items():
        print(f"minilm cosine {name:34s} mean {value['mean']:.5f}  min {value['min']:.5f}")
    return result


def bench_minilm_embeddings(steps: int, lr: float) -> dict:
    """QAT + KD (static) of the real MiniLM with and without INT8 embeddings, in one run: the
    decision whether ``quant.embeddings`` may be on by default for transformers (goal: cosine
    within 0.002 of the default)."""
    tokenizer, fp32 = minilm()
    batch = dict(tokenizer(EVAL_SENTENCES, padding=True, return_tensors="pt"))
    reference = _embed(fp32, batch)
    result: dict = {"steps": steps, "cosine_vs_fp32": {}, "int8_file_ratio": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = slimkit.save_pretrained(fp32, Path(tmp) / "fp32", model_card=False)
        fp32_bytes = (fp32_dir / "model.safetensors").stat().st_size
        for embeddings in (False, True):
            name = "qat_kd_static_int8" + ("_int8_embeddings" if embeddings else "")
            student, _ = _qat_kd(copy.deepcopy(fp32), fp32, tokenizer, "qat", steps, lr, embeddings=embeddings)
            int8 = slimkit.convert_(student)
            result["cosine_vs_fp32"][name] = _cosine(reference, _embed(int8, batch))
            folder = slimkit.save_pretrained(int8, Path(tmp) / name, model_card=False)
            result["int8_file_ratio"][name] = round((folder / "model.safetensors").stat().st_size / fp32_bytes, 4)
            print(f"minilm {name}: cosine {result['cosine_vs_fp32'][name]}, file {result['int8_file_ratio'][name]}")
    cos = result["cosine_vs_fp32"]
    gap = cos["qat_kd_static_int8"]["mean"] - cos["qat_kd_static_int8_int8_embeddings"]["mean"]
    result["goal_within_0.002_of_default"] = {"mean_cosine_loss": round(gap, 5), "met": gap <= 0.002}
    return result


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


SECTIONS = ("digits", "minilm", "minilm_embeddings", "ptq_tools", "bn_freeze")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to run")
    parser.add_argument("--epochs", type=int, default=20, help="digits FP32 training epochs")
    parser.add_argument("--qat-epochs", type=int, default=6, help="digits QAT epochs")
    parser.add_argument("--minilm-steps", type=int, default=60, help="MiniLM QAT+KD steps (batch 16)")
    parser.add_argument("--minilm-lr", type=float, default=5e-6)
    parser.add_argument("--tools-train-steps", type=int, default=600, help="ptq_tools / bn_freeze FP32 steps")
    parser.add_argument("--tools-qat-steps", type=int, default=100, help="ptq_tools QAT steps")
    parser.add_argument("--bn-qat-steps", nargs="+", type=int, default=[60, 600], help="bn_freeze QAT lengths")
    parser.add_argument("--bn-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default="int8_accuracy.json")
    args = parser.parse_args()
    setup_machine()
    path = RESULTS / args.output
    # sections not run this time keep their earlier results
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"machine": machine_info(), "settings": vars(args)})
    if "digits" in args.sections:
        report["digits"] = bench_digits(args.epochs, args.qat_epochs)
        write_json(args.output, report)
    if "minilm" in args.sections:
        report["minilm"] = bench_minilm(args.minilm_steps, args.minilm_lr)
        write_json(args.output, report)
    if "minilm_embeddings" in args.sections:
        report["minilm_embeddings"] = bench_minilm_embeddings(args.minilm_steps, args.minilm_lr)
        write_json(args.output, report)
    if "ptq_tools" in args.sections:
        report["ptq_tools"] = bench_ptq_tools(args.tools_train_steps, args.tools_qat_steps)
        write_json(args.output, report)
    if "bn_freeze" in args.sections:
        report["bn_freeze"] = bench_bn_freeze(args.tools_train_steps, args.bn_qat_steps, args.bn_seeds)
        write_json(args.output, report)
    goals = {}
    if "digits" in report:
        goals["digits_qat_int8_within_0.5_points_of_fp32"] = {
            "value": report["digits"]["qat_int8_minus_fp32_points"],
            "met": report["digits"]["qat_int8_minus_fp32_points"] >= -0.5,
        }
    if "minilm" in report:
        cos = report["minilm"]["cosine_vs_fp32"]
        best = max((n for n in cos if "qat_kd" in n), key=lambda n: cos[n]["mean"])
        goals["minilm_cosine>=0.99_with_qat_kd"] = {
            "best": best,
            "value": cos[best]["mean"],
            "met": cos[best]["mean"] >= 0.99,
        }
    if "minilm_embeddings" in report:
        goals["minilm_int8_embeddings_qat_kd_within_0.002_cosine"] = report["minilm_embeddings"][
            "goal_within_0.002_of_default"
        ]
    for name, row in report.get("ptq_tools", {}).items():
        goals[f"{name}_equalization+bias_correction_recover_half_of_per_tensor_ptq_drop"] = row[
            "goal_eq_bc_recover_half_of_per_tensor_drop"
        ]
    report["goals"] = goals
    path = write_json(args.output, report)
    for goal, value in goals.items():
        print(f"{'MET ' if value['met'] else 'MISS'} {goal}: {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
