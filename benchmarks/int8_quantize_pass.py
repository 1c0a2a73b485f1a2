"""The eager INT8 layers' input quantization: four fresh tensors against one tensor in place.

Every eager INT8 linear / conv quantizes its fp32 input to uint8 before oneDNN's kernel runs
(``slimkit.quant.numerics.quantize_activation``). Written as ``clamp(round(x / s) + z).to(uint8)``
that is four full-size temporaries; the shipped version computes the same values in place on
one. Static PTQ of the real all-MiniLM-L6-v2 (32 ``stdlib-docs`` sentences), then, in one
process, interleaved: the eager INT8 model at batch 32 x 128 tokens with each formula, and the
function alone on a [4096, 1536] tensor (an FFN input of that batch). The outputs are checked
bit-equal. Writes benchmarks/results/int8_quantize_pass.json. Needs a quiet machine.

    python benchmarks/int8_quantize_pass.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

import slimkit
import slimkit.quant.int8 as int8_layers
from slimkit.quant.numerics import ACT_QMAX, ACT_QMIN, quantize_activation
from slimkit.report import interleaved_latencies

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_common as common  # noqa: E402
from prune_quality import minilm_data  # noqa: E402


def four_temporaries(x: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """The formula before: the same values, a fresh tensor per step."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, ACT_QMIN, ACT_QMAX).to(torch.uint8)


class WithQuantize(nn.Module):
    """The INT8 model run with one of the two formulas (swapped in before each call)."""

    def __init__(self, model: nn.Module, formula) -> None:
        super().__init__()
        self.model, self.formula = model, formula

    def forward(self, **inputs):
        int8_layers.quantize_activation = self.formula
        return self.model(**inputs)


def function_ms(formula, x: torch.Tensor, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(10):
            formula(x, 0.05, 128)
        best = min(best, (time.perf_counter() - start) / 10 * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    common.setup_machine()
    tokenizer, fp32 = common.minilm()
    calibration = minilm_data(tokenizer, 32)["calibration"]
    model = copy.deepcopy(fp32)
    slimkit.prepare(model, {"quant": {"mode": "ptq"}}, example_inputs=calibration[0])
    slimkit.calibrate(model, calibration)
    model = slimkit.convert(model).eval()
    sentences = [f"slimkit benchmark sentence {i}: distillation, pruning and quantization on a CPU" for i in range(32)]
    batch = dict(tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
    variants = {
        "four_temporaries": WithQuantize(model, four_temporaries),
        "in_place": WithQuantize(model, quantize_activation),
    }
    with torch.inference_mode():
        outs = {k: v(**batch).last_hidden_state for k, v in variants.items()}
        model_ms = interleaved_latencies(variants, batch, args.rounds)
    int8_layers.quantize_activation = quantize_activation
    x = torch.randn(4096, 1536) * 3
    report = {
        "machine": common.machine_info(),
        "bit_equal_outputs": torch.equal(outs["four_temporaries"], outs["in_place"])
        and torch.equal(four_temporaries(x, 0.05, 128), quantize_activation(x, 0.05, 128)),
        "minilm_int8_eager_b32x128_ms": {k: round(v, 1) for k, v in model_ms.items()},
        "minilm_speedup": round(model_ms["four_temporaries"] / model_ms["in_place"], 3),
        "function_4096x1536_ms": {
            "four_temporaries": round(function_ms(four_temporaries, x, args.rounds), 2),
            "in_place": round(function_ms(quantize_activation, x, args.rounds), 2),
        },
    }
    for key, value in report.items():
        if key != "machine":
            print(f"{key}: {value}")
    print(f"wrote {common.write_json('int8_quantize_pass.json', report)}")


if __name__ == "__main__":
    main()
