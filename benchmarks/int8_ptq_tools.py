"""The PTQ tools and the QAT schedule on digits, for ``int8_accuracy.py``.

* ``ptq_tools``: a digits-trained MobileNetV2 (timm ``mobilenetv2_050`` with ReLU, 32x32: the
  ReLU6 default is not positive-homogeneous, so equalization could not pass through it; Nagel
  et al. made the same swap) and the tutorial's SmallCNN, with per-tensor and per-channel
  weights: FP32, PTQ plain / + equalization / + bias correction / + both, and QAT (from the
  plain PTQ scales). Goal: equalization + bias correction recover at least half of plain
  per-tensor PTQ's drop.
* ``bn_freeze``: the tutorial's SmallCNN fine-tuned with QAT for a short and a long run, with
  ranges and BatchNorms frozen for the last 25% (the old README recipe), ranges only, and
  nothing frozen.
"""

from __future__ import annotations

import copy
import time

import torch
from small_models import TutorialCNN, digits_images
from torch import nn

import slimkit


def _batches(x, y, size: int, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def _train(model, train, steps: int, lr: float, prepared: bool = False) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for x, y in _batches(*train, 64, epoch):
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)  # QAT of per-tensor MobileNetV2 diverged without it
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            if prepared:
                slimkit.step(model)
            step += 1
            if step >= steps:
                break
        epoch += 1
    model.eval()


@torch.no_grad()
def _accuracy(model, test) -> float:
    x, y = test
    return round(100.0 * (model.eval()(x).argmax(1) == y).float().mean().item(), 2)


def _data(channels: int):
    from digits_split import shuffled_digits

    (xtr, ytr), (xte, yte) = shuffled_digits(held_out=400)
    return (digits_images(xtr, channels), ytr), (digits_images(xte, channels), yte)


def _models() -> dict:
    import timm

    return {
        "mobilenetv2_050": lambda: timm.create_model(
            "mobilenetv2_050", pretrained=False, num_classes=10, in_chans=1, act_layer="relu"
        ),
        "tutorial_smallcnn": lambda: TutorialCNN(in_chans=1),
    }


@torch.no_grad()
def skewed(model: nn.Module, spread: float = 30.0, seed: int = 0) -> nn.Module:
    """A copy of a timm MobileNetV2 with the same float function but channel ranges spread the
    way pre-trained MobileNets have them (Nagel et al. 2019, fig. 2): in every inverted-residual
    block, the expansion BatchNorm's channel i is multiplied by s_i (log-uniform in
    [1/spread, spread]) and the depthwise filter i divided by it (relu(s y) = s relu(y))."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if all(hasattr(module, a) for a in ("conv_pw", "bn1", "conv_dw")) and hasattr(module, "conv_pwl"):
            c = module.conv_dw.out_channels
            s = torch.exp((torch.rand(c, generator=g) * 2 - 1) * torch.log(torch.tensor(spread)))
            module.bn1.weight.mul_(s)
            module.bn1.bias.mul_(s)
            module.conv_dw.weight.div_(s.reshape(-1, 1, 1, 1))
    return model


def _ptq(fp32, calibration, granularity: str, **tools) -> nn.Module:
    model = copy.deepcopy(fp32)
    recipe = {
        "quant": {
            "mode": "ptq",
            "compile": "never",
            "weights": {"granularity": granularity},
            "activations": {"observer": "histogram"},
            **tools,
        }
    }
    slimkit.prepare(model, recipe, example_inputs=calibration[0])
    slimkit.calibrate(model, calibration)
    return slimkit.convert_(model)


def bench_ptq_tools(train_steps: int, qat_steps: int) -> dict:
    train, test = _data(1)
    results = {}
    models = list(_models().items())
    models.insert(1, ("mobilenetv2_050_skewed", None))
    trained = {}
    for name, build in models:
        start = time.perf_counter()
        torch.manual_seed(0)
        if build is None:  # the trained MobileNetV2, channel ranges spread, same float function
            fp32 = skewed(trained["mobilenetv2_050"])
        else:
            fp32 = build()
            _train(fp32, train, train_steps, lr=0.05)
        trained[name] = fp32
        calibration = [x for x, _ in _batches(*train, 64, 1)[:8]]
        row = {"fp32": _accuracy(fp32, test), "train_steps": train_steps}
        for granularity in ("per_tensor", "per_channel"):
            variants = {
                "ptq": {},
                "ptq_equalization": {"equalization": True},
                "ptq_bias_correction": {"bias_correction": True},
                "ptq_equalization_bias_correction": {"equalization": True, "bias_correction": True},
            }
            accs = {v: _accuracy(_ptq(fp32, calibration, granularity, **tools), test) for v, tools in variants.items()}
            print(f"{name} {granularity}: FP32 {row['fp32']}%, PTQ {accs}", flush=True)
            qat = copy.deepcopy(fp32)
            recipe = {"quant": {"compile": "never", "weights": {"granularity": granularity}}}
            slimkit.prepare(qat, recipe, example_inputs=calibration[0])
            slimkit.calibrate(qat, calibration)
            _train(qat, train, qat_steps, lr=0.002, prepared=True)
            try:
                accs["qat"] = _accuracy(slimkit.convert_(qat), test)
            except slimkit.errors.NonFiniteError:  # a diverged run, reported as such
                accs["qat"] = None
            drop = row["fp32"] - accs["ptq"]
            both = row["fp32"] - accs["ptq_equalization_bias_correction"]
            accs["recovered_fraction_of_ptq_drop"] = round((drop - both) / drop, 3) if drop > 0 else None
            row[granularity] = accs
            print(f"{name} {granularity}: QAT {accs['qat']}", flush=True)
        tensor = row["per_tensor"]
        row["goal_eq_bc_recover_half_of_per_tensor_drop"] = {
            "ptq_drop_points": round(row["fp32"] - tensor["ptq"], 2),
            "eq_bc_drop_points": round(row["fp32"] - tensor["ptq_equalization_bias_correction"], 2),
            "met": tensor["recovered_fraction_of_ptq_drop"] is None or tensor["recovered_fraction_of_ptq_drop"] >= 0.5,
        }
        row["wall_s"] = round(time.perf_counter() - start, 1)
        results[name] = row
    return results


def bench_bn_freeze(train_steps: int, qat_lengths: list[int], seeds: list[int]) -> dict:
    """QAT of the tutorial's SmallCNN from a trained FP32 model, calibrated first, frozen at 75%."""
    train, test = _data(1)
    torch.manual_seed(0)
    fp32 = TutorialCNN(in_chans=1)
    _train(fp32, train, train_steps, lr=0.05)
    calibration = [x for x, _ in _batches(*train, 64, 1)[:8]]
    out = {"fp32": _accuracy(fp32, test), "train_steps": train_steps, "runs": {}}
    for steps in qat_lengths:
        freeze = (3 * steps) // 4
        schedules = {
            "ranges_and_bn_frozen_at_75pct": {"freeze_observers_step": freeze, "freeze_bn_step": freeze},
            "ranges_frozen_at_75pct": {"freeze_observers_step": freeze},
            "nothing_frozen": {},
        }
        for label, schedule in schedules.items():
            accs = []
            for seed in seeds:
                torch.manual_seed(seed)
                qat = copy.deepcopy(fp32)
                slimkit.prepare(qat, {"quant": {"compile": "never", **schedule}}, example_inputs=calibration[0])
                slimkit.calibrate(qat, calibration)
                _train(qat, train, steps, lr=0.01, prepared=True)
                accs.append(_accuracy(slimkit.convert_(qat), test))
            out["runs"][f"{steps}_steps/{label}"] = {"int8_accuracy": accs, "mean": round(sum(accs) / len(accs), 2)}
            print(f"bn_freeze {steps} steps {label}: {accs}")
    return out
