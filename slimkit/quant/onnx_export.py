"""ONNX export: QDQ INT8 for converted models, fp32 for float ones.

``slimkit.export_onnx(model, path, example_inputs)`` exports with PyTorch's ``torch.export``
based exporter. Each INT8 layer traces to ``QuantizeLinear -> DequantizeLinear`` on its input
and ``DequantizeLinear`` on its int8 weight initializer (per output channel, axis 0) in front
of the float Conv / MatMul: the QDQ format, which onnxruntime fuses into QLinearConv /
QLinearMatMul / MatMulIntegerToFloat, and which keeps the int8 weights int8 in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..controller import CONTROLLER_ATTR, unwrap
from ..errors import IncompatibleError, SlimkitError
from .int8 import load_decomposed_ops, prepare_for_tracing


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _dynamic_shapes(args: tuple, kwargs: dict) -> Any:
    """Batch (and, for integer token inputs, sequence) axes dynamic; everything else fixed."""

    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        axes = {0: torch.export.Dim.AUTO}
        if value.dim() == 2 and not value.is_floating_point():
            axes[1] = torch.export.Dim.AUTO
        return axes

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def _dynamic_qdq_to_onnx(x):
    from onnxscript import opset18 as op

    quantized, scale, zero_point = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(quantized, scale, zero_point)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` as ONNX and return the path.

    A converted INT8 model (``slimkit.convert``) becomes a QDQ INT8 graph; a float model is
    exported in fp32. ``example_inputs`` is a tensor, a tuple of tensors or a dict of keyword
    tensors; with ``dynamic_batch`` the batch axis (and the sequence axis of token inputs) may
    vary. A model still prepared for training must be converted first.
    """
    model = unwrap(model)
    if CONTROLLER_ATTR in model.__dict__:
        raise IncompatibleError(
            f"export_onnx: {type(model).__name__} is still prepared for training (fake-quant, masks or KD "
            "hooks attached). Export the deployable model: small = slimkit.convert(model) (or "
            "slimkit.convert_(model) to convert in place), then slimkit.export_onnx(small, ...)."
        )
    try:
        import onnxscript  # noqa: F401  (the exporter's ONNX function library)
    except ImportError as exc:
        raise SlimkitError(
            f"export_onnx needs onnx and onnxscript ({exc}); install them with pip install 'slimkit[quant]'"
        ) from None
    load_decomposed_ops()  # before the exporter builds its op registry
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = _split_inputs(example_inputs)
    prepare_for_tracing(model)
    # export the class's forward, not the INT8 runtime that dispatches to it (slimkit.quant.runtime)
    runtime = model.__dict__.pop("forward", None)
    was_training = model.training
    model.eval()
    try:  # the family's export settings (transformers: no KV cache output) for the trace only
        with torch.no_grad(), get_adapter(model).export_settings(model):
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(args, kwargs) if dynamic_batch else None,
                opset_version=opset_version,
                optimize=True,
                verbose=False,
                custom_translation_table={torch.ops.slimkit.dynamic_qdq_uint8.default: _dynamic_qdq_to_onnx},
            )
    finally:
        model.train(was_training)
        if runtime is not None:
            model.__dict__["forward"] = runtime
    program.save(str(path))
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (optionally pinned to ``threads`` threads)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SlimkitError(
            f"running ONNX models needs onnxruntime ({exc}); install it with pip install 'slimkit[quant]'"
        ) from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, example_inputs: Any) -> list:
    """Run an onnxruntime session on inputs given like ``export_onnx``'s example inputs."""
    args, kwargs = _split_inputs(example_inputs)
    names = [i.name for i in session.get_inputs()]
    if kwargs:
        feed = {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in names}
    else:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
    return session.run(None, feed)
