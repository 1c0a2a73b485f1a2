"""The fast path of a converted model: ``torch.compile`` with PyTorch's x86 int8 lowering.

    int8 = slimkit.convert(model)
    slimkit.quant.compile(int8)          # in place; the model keeps its class
    with torch.inference_mode():
        int8(x)

Traced, each INT8 layer emits ``dequantize(quantize(x)) -> conv/linear(dequantize(w_int8))``.
With Inductor's freezing on, torchao's x86 passes (the ones its PT2E ``X86InductorQuantizer``
flow uses) prepack the int8 weights once and lower every such pattern to
``onednn.qconv_pointwise`` / ``qlinear_pointwise`` with ReLU, residual adds and the next
layer's requantization fused, so activations often stay uint8 between layers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import SlimkitError
from ..quiet import quiet_imports, silence_inductor_int8_notice
from .int8 import is_int8_layer, prepare_for_tracing, require_int8_engine


def _register_x86_int8_lowering() -> None:
    try:
        # Importing the quantizer registers torchao's Inductor passes for x86 int8 (weight
        # prepack, conv/linear + post-op fusion); it is the supported way to get them.
        with quiet_imports():  # torchao's and cpp_extension's import-time notices (slimkit/quiet.py)
            import torch.utils.cpp_extension  # noqa: F401
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
        silence_inductor_int8_notice()
    except ImportError as exc:
        raise SlimkitError(
            f"slimkit.quant.compile needs torchao ({exc}); install it with pip install 'slimkit[quant]'"
        ) from None


def compile(model: nn.Module, **compile_kwargs) -> nn.Module:  # noqa: A001 - mirrors torch.compile
    """Compile a converted INT8 model in place for the oneDNN int8 kernels with fused post-ops;
    returns the same model object (its ``forward`` becomes the compiled one). Call it under
    ``torch.no_grad()`` or ``torch.inference_mode()``: Inductor freezes (constant-folds and
    prepacks) the int8 weights only for inference graphs. Compile last: weights loaded or
    changed afterwards are not seen by the frozen graph.

    This sets ``torch._inductor.config.freezing = True`` for the process, which affects only
    graphs compiled without gradients.
    """
    require_int8_engine("slimkit.quant.compile")
    if not any(is_int8_layer(m) for m in model.modules()):
        raise SlimkitError(
            f"slimkit.quant.compile: {type(model).__name__} has no INT8 layers; call slimkit.convert(model) "
            "on a model prepared with a quant recipe first (plain models: use torch.compile)"
        )
    _register_x86_int8_lowering()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    prepare_for_tracing(model)
    model.eval()
    compiled_forward = torch.compile(model.forward, **compile_kwargs)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        # Checked here, outside the compiled region: a graph traced with gradients on would
        # not be frozen, and its int8 weights could not be prepacked.
        if torch.is_grad_enabled():
            raise SlimkitError(
                f"the compiled INT8 {type(model).__name__} runs for inference only: call it under "
                "torch.no_grad() or torch.inference_mode()"
            )
        return compiled_forward(*args, **kwargs)

    model.forward = forward  # an instance attribute: the model keeps its class and its hooks
    return model


__all__ = ["compile"]
