"""Quantization-aware training, PTQ calibration, INT8 conversion and ONNX export.

    model = slimkit.prepare(model, {"quant": {...}}, example_inputs=x)   # fake-quant layers
    slimkit.calibrate(model, loader, num_batches=32)                     # PTQ (or to start QAT)
    ...                                                                  # QAT: train as usual
    int8 = slimkit.convert(model)         # oneDNN int8 kernels, same model class
    slimkit.quant.compile_int8(int8)           # optional: fused int8 graph via torch.compile
    slimkit.quant.set_compile(int8, "onnxruntime")  # or: inference calls on onnxruntime sessions
    slimkit.save_pretrained(int8, "out")  # int8 weights + scales in safetensors
    slimkit.export_onnx(int8, "out/model.onnx", x)                       # QDQ INT8 for onnxruntime

This package imports torch only; torchao, onnx and onnxruntime are imported when compiling,
exporting or running ONNX (quant.compile onnxruntime: :mod:`slimkit.quant.ort_runtime`). The
``quantization`` block of saved folders is registered in slimkit/methods.py (by reference: this
package never imports ``slimkit.hub``).
"""

from __future__ import annotations

from ..calibration import calibrate
from .compiled import compile as compile  # noqa: A004 - the deprecated alias (warns); not in __all__
from .compiled import compile_int8
from .embeddings import is_int8_embedding
from .fold import register_norm_remainder
from .int8 import int8_engine_problem, is_int8_layer
from .layers import register_plain_forward, register_transposed_linear
from .lifecycle import phase_at
from .onnx_export import export_onnx, onnx_session, run_onnx
from .quantizer import Quantizer
from .runtime import runtime_report, set_compile
from .state import state_of

__all__ = [
    "Quantizer",
    "calibrate",
    "compile_int8",
    "export_onnx",
    "int8_engine_problem",
    "is_int8_embedding",
    "is_int8_layer",
    "onnx_session",
    "phase_at",
    "register_norm_remainder",
    "register_plain_forward",
    "register_transposed_linear",
    "run_onnx",
    "runtime_report",
    "set_compile",
    "state_of",
]
