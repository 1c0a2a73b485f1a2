"""Recurrent layers (nn.LSTM / nn.GRU) in INT8: what slimkit refuses, and the alternatives measured.

    .venv/bin/python benchmarks/int8_recurrent.py        # about 2 min on 2 cores

slimkit keeps ``nn.LSTM`` / ``nn.GRU`` in float (``quant.exclude`` names them; the Linear
layers around them are quantized as usual). This measures, on a 2-layer LSTM and GRU
(input 64, hidden 256, sequence 50) with a Linear head, against FP32 eager:

* ``torch_dynamic``: ``torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear})``
  (the tutorial's call; deprecated, fbgemm packed weights that are pickled objects, so they
  cannot be saved as safetensors);
* ``ort_fp32`` / ``ort_dynamic``: ``slimkit.export_onnx`` of the float model on onnxruntime,
  and onnxruntime's ``quantize_dynamic`` of it (``DynamicQuantizeLSTM`` for LSTM; GRU stays
  float there);

with the largest output difference to FP32 and the file sizes. Writes
``benchmarks/results/int8_recurrent.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_common import (  # noqa: E402
    interleaved,
    machine_info,
    ort_dynamic_quantize,
    ort_runner,
    ort_session,
    setup_machine,
    speedups,
    write_json,
)

import slimkit  # noqa: E402


class Tagger(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def bench(cell: type[nn.RNNBase], batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    fp32 = Tagger(cell).eval()
    x = torch.randn(batch, 50, 64)
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.LSTM, nn.GRU, nn.Linear}, torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = slimkit.export_onnx(copy.deepcopy(fp32), Path(tmp) / "fp32.onnx", x)
        ort_dyn = ort_dynamic_quantize(fp32_onnx, Path(tmp) / "dynamic.onnx")
        sessions = {"ort_fp32": ort_session(fp32_onnx), "ort_dynamic": ort_session(ort_dyn)}
        sizes = {
            "fp32_onnx_mb": fp32_onnx.stat().st_size / 2**20,
            "ort_dynamic_onnx_mb": ort_dyn.stat().st_size / 2**20,
        }
        variants = {"fp32_eager": lambda: fp32(x), "torch_dynamic": lambda: dynamic(x)}
        variants.update({name: ort_runner(s, x) for name, s in sessions.items()})
        with torch.inference_mode():
            reference = fp32(x)
            diffs = {
                "torch_dynamic": float((dynamic(x) - reference).abs().max()),
                **{
                    n: float(
                        (torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]) - reference).abs().max()
                    )
                    for n, s in sessions.items()
                },
            }
        timings = interleaved(variants, rounds=rounds, iters=3)
        import onnx

        ops = sorted({node.op_type for node in onnx.load(str(ort_dyn)).graph.node})
    result = {
        "ort_dynamic_ops": ops,
        "batch": batch,
        "speedup_vs_fp32_eager": speedups(timings),
        "max_abs_diff_vs_fp32": {k: round(v, 5) for k, v in diffs.items()},
        "output_scale": round(float(reference.abs().max()), 4),
        "sizes": {k: round(v, 3) for k, v in sizes.items()},
        "timings": timings,
    }
    print(f"{cell.__name__} batch {batch}: {result['speedup_vs_fp32_eager']} diff {result['max_abs_diff_vs_fp32']}")
    return result


def main() -> None:
    setup_machine()
    report = {"machine": machine_info(), "models": {}}
    for cell in (nn.LSTM, nn.GRU):
        report["models"][cell.__name__] = {str(b): bench(cell, b, rounds=5) for b in (1, 16)}
    print(f"wrote {write_json('int8_recurrent.json', report)}")


if __name__ == "__main__":
    main()
