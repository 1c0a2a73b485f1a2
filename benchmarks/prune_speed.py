"""What structured pruning buys on CPU: MACs, measured latency, and the cost of masks in training.

For timm resnet50 (channels) and ViT-S/16 (heads + MLP neurons) at 224x224, at a ratio that
removes about half of the MACs and one that removes about three quarters, it measures

* the MACs ratio (torch's FLOP counter) of the slimkit-pruned model against the dense one;
* CPU latency ratios at batch 1 and batch 32, dense / pruned, timed A/B interleaved in one process
  with 2 threads and flushed denormals (medians over rounds, so drift hits every model alike);
* the same model pruned by Torch-Pruning's own ``BasePruner`` (L2 magnitude) at the same ratio on
  the same units (residual stream and stem/classifier left whole, heads pruned whole), in the same run;
* one training step with pruning masks (prepared model, masks re-applied after the step) against a
  plain training step of the same model.

Goals (issue 3): speed-up >= 0.85 x the MACs reduction at about 2x fewer MACs and >= 0.65 x at 4x;
a masked training step <= 1.05 x a plain step. Prints ratios, writes benchmarks/results/prune_speed.json.

    python benchmarks/prune_speed.py [--rounds-b1 30] [--rounds-b32 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import timm
import torch
import torch_pruning as tp
from torch import nn

import slimkit
from slimkit.prune import count_macs, count_parameters

RESULTS = Path(__file__).parent / "results"


def dense_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def slimkit_pruned(model: nn.Module, ratio: float, heads: bool) -> nn.Module:
    model = copy.deepcopy(model)
    section = {"channels": ratio, "round_to": 8}
    if heads:
        section["heads"] = ratio
    slimkit.prepare(model, {"prune": section}, example_inputs=torch.randn(1, 3, 224, 224))
    return slimkit.convert_(model).eval()


def torch_pruning_pruned(model: nn.Module, ratio: float, heads: bool) -> nn.Module:
    """Torch-Pruning's own pruner, L2 magnitude, on the units slimkit prunes."""
    model = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    imp = tp.importance.MagnitudeImportance(p=2)
    if not heads:
        ignored = [model.fc, model.conv1]
        pruner = tp.pruner.BasePruner(model, x, imp, pruning_ratio=ratio, ignored_layers=ignored, round_to=8)
        pruner.step()
        return model.eval()
    from timm.layers import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    ignored = [model.head, model.patch_embed.proj]
    for block in model.blocks:  # the residual stream (LayerNorm'd) stays whole, as in slimkit
        ignored += [block.attn.proj, block.mlp.fc2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            x,
            imp,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=8,
            num_heads={m.qkv: m.num_heads for m in attns},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
        pruner.step()
    for m in attns:  # Torch-Pruning leaves the module attributes to the user
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim = m.num_heads * m.head_dim
    return model.eval()


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """min (the least-disturbed round: other processes only ever add time) and median."""
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


@torch.no_grad()
def interleaved_latency(
    models: dict[str, nn.Module], batch: int, rounds: int, calls: int
) -> dict[str, dict[str, float]]:
    """Seconds per forward; every round times each model once, in turn (order alternating)."""
    x = torch.randn(batch, 3, 224, 224)
    for m in models.values():  # warm-up: kernel selection for each shape
        m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(rounds):
        order = list(models.items())
        for name, m in order if i % 2 == 0 else order[::-1]:  # alternate: no model always goes first
            start = time.perf_counter()
            for _ in range(calls):
                m(x)
            times[name].append((time.perf_counter() - start) / calls)
    return _summary(times)


def training_step_overhead(name: str, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per training step: a plain model vs the same weights with pruning masks (l2, masks
    re-applied after every step) and with Taylor statistics being collected (cubic schedule).

    All three start from the very same weights, zeros included, so the numerics are alike and
    only slimkit's work (forward hook, statistics, re-masking) differs."""
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    masked = dense_model(name).train()
    slimkit.prepare(masked, {"prune": {"channels": 0.5, "round_to": 8}}, example_inputs=x[:1])
    weights = {k: v for k, v in masked.state_dict().items() if not k.startswith("slimkit.")}
    plain = dense_model(name).train()
    plain.load_state_dict(weights)
    taylor = dense_model(name).train()
    taylor.load_state_dict(weights)
    schedule = {"kind": "cubic", "start_step": 0, "end_step": 10_000, "every": 1000}
    recipe = {"prune": {"channels": 0.5, "round_to": 8, "importance": "taylor", "schedule": schedule}}
    slimkit.prepare(taylor, recipe, example_inputs=x[:1])
    setups = {}
    for key, model in (("plain", plain), ("masked", masked), ("masked_taylor", taylor)):
        params = [p for n, p in model.named_parameters() if not n.startswith("slimkit.")]
        setups[key] = (model, torch.optim.SGD(params, lr=1e-3, momentum=0.9))

    def step(key: str) -> None:
        model, opt = setups[key]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if key != "plain":
            slimkit.step(model)

    for key in setups:
        step(key)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for i in range(rounds):
        for key in list(setups) if i % 2 == 0 else list(setups)[::-1]:
            start = time.perf_counter()
            step(key)
            times[key].append(time.perf_counter() - start)
    return _summary(times)


def measure_model(name: str, heads: bool, ratios: list[float], args) -> dict:
    dense = dense_model(name)
    x1 = torch.randn(1, 3, 224, 224)
    models = {"dense": dense}
    for r in ratios:
        models[f"slimkit@{r}"] = slimkit_pruned(dense, r, heads)
        models[f"torch_pruning@{r}"] = torch_pruning_pruned(dense, r, heads)
    macs = {k: count_macs(m, x1) for k, m in models.items()}
    params = {k: count_parameters(m) for k, m in models.items()}
    b1 = interleaved_latency(models, 1, args.rounds_b1, calls=3)
    b32 = interleaved_latency(models, 32, args.rounds_b32, calls=1)
    out = {"macs": macs, "params": params, "latency_s": {"batch1": b1, "batch32": b32}, "configs": {}}
    for k in models:
        if k == "dense":
            continue
        mac_ratio = macs["dense"] / macs[k]
        entry = {"macs_reduction": mac_ratio, "params_reduction": params["dense"] / params[k]}
        goal = 0.85 if mac_ratio < 3.0 else 0.65
        entry["goal_efficiency"] = goal
        for batch, lat in (("batch1", b1), ("batch32", b32)):
            for stat in ("min", "median"):
                speed = lat["dense"][stat] / lat[k][stat]
                entry[f"speedup_{batch}_{stat}"] = speed
                entry[f"efficiency_{batch}_{stat}"] = speed / mac_ratio  # 1.0: latency falls as MACs do
            entry[f"goal_met_{batch}"] = entry[f"efficiency_{batch}_min"] >= goal
        out["configs"][k] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds-b1", type=int, default=30)
    parser.add_argument("--rounds-b32", type=int, default=5)
    parser.add_argument("--train-rounds", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run, noisy numbers)")
    parser.add_argument("--output", type=Path, default=RESULTS / "prune_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds_b1, args.rounds_b32, args.train_rounds = 3, 1, 2
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)

    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
        },
        "torch": torch.__version__,
        "resnet50": measure_model("resnet50", heads=False, ratios=[0.3, 0.5], args=args),
        "vit_small_patch16_224": measure_model("vit_small_patch16_224", heads=True, ratios=[0.5, 0.8], args=args),
        "training_step_s": {},
    }
    for name in ("resnet50", "vit_small_patch16_224"):
        t = training_step_overhead(name, args.train_batch, args.train_rounds)
        entry = {"seconds": t}
        for stat in ("min", "median"):
            entry[f"masked_over_plain_{stat}"] = t["masked"][stat] / t["plain"][stat]
            entry[f"taylor_over_plain_{stat}"] = t["masked_taylor"][stat] / t["plain"][stat]
        entry["goal_met"] = entry["masked_over_plain_min"] <= 1.05
        report["training_step_s"][name] = entry

    print("speed-ups are dense / pruned latency; min = least-disturbed round, median in brackets")
    for name in ("resnet50", "vit_small_patch16_224"):
        print(f"\n{name}")
        print(f"{'model':>20} {'MACs':>7} {'batch 1':>16} {'batch 32':>16} {'eff b1':>7} {'eff b32':>8}")
        for key, e in report[name]["configs"].items():
            b1 = f"{e['speedup_batch1_min']:5.2f}x ({e['speedup_batch1_median']:.2f}x)"
            b32 = f"{e['speedup_batch32_min']:5.2f}x ({e['speedup_batch32_median']:.2f}x)"
            eff = f"{e['efficiency_batch1_min']:7.2f} {e['efficiency_batch32_min']:8.2f}"
            print(f"{key:>20} {e['macs_reduction']:6.2f}x {b1:>16} {b32:>16} {eff}")
    print(f"\ntraining step with masks / plain step (batch {args.train_batch}), min (median):")
    for name, t in report["training_step_s"].items():
        masks = f"{t['masked_over_plain_min']:.3f}x ({t['masked_over_plain_median']:.3f}x)"
        taylor = f"{t['taylor_over_plain_min']:.3f}x ({t['taylor_over_plain_median']:.3f}x)"
        print(f"  {name}: masks {masks}, with Taylor statistics {taylor}")
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
