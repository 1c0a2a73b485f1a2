"""The fast path of a converted model: ``torch.compile`` with PyTorch's x86 int8 lowering.

    int8 = slimkit.convert(model)        # compiles itself on first inference call (quant.compile: auto)
    slimkit.quant.compile_int8(int8)     # in place, any model: compile on first inference call
    with torch.inference_mode():
        int8(x)

Traced, each INT8 layer emits ``dequantize(quantize(x)) -> conv/linear(dequantize(w_int8))``.
With Inductor's freezing on, torchao's x86 passes (the ones its PT2E ``X86InductorQuantizer``
flow uses) prepack the int8 weights once and lower every such pattern to
``onednn.qconv_pointwise`` / ``qlinear_pointwise`` with ReLU, residual adds and the next
layer's requantization fused, so activations often stay uint8 between layers. When and how
graphs are compiled (one per input signature, never recompiled) is
:mod:`slimkit.quant.runtime`.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import SlimkitError
from ..quiet import quiet_imports, silence_inductor_int8_notice
from .int8 import is_int8_layer, prepare_for_tracing, require_int8_engine
from .runtime import install, runtime_of


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
            f"slimkit.quant.compile_int8 needs torchao ({exc}); install it with pip install 'slimkit[quant]'"
        ) from None


def prepare_compilation(model: nn.Module) -> None:
    """Everything a compiled INT8 graph needs: the int8 lowering passes, Inductor's freezing
    (which constant-folds and prepacks the int8 weights of inference graphs; it affects only
    graphs compiled without gradients), and the qparams as Python constants."""
    require_int8_engine("compiling an INT8 model")
    _register_x86_int8_lowering()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    prepare_for_tracing(model)


def compile_int8(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile a converted INT8 model for the oneDNN int8 kernels with fused post-ops, in place;
    returns the same model object. Graphs are compiled on the first call of each input shape
    under ``torch.no_grad()`` / ``torch.inference_mode()`` in eval mode (other calls run the
    eager INT8 kernels); ``compile_kwargs`` go to ``torch.compile``. Compile last: weights
    loaded or changed after a shape's first call are not seen by its frozen graph.
    ``slimkit.quant.runtime_report(model)`` says what ran where."""
    require_int8_engine("slimkit.quant.compile_int8")
    if not any(is_int8_layer(m) for m in model.modules()):
        raise SlimkitError(
            f"slimkit.quant.compile_int8: {type(model).__name__} has no INT8 layers; call slimkit.convert(model) "
            "on a model prepared with a quant recipe first (plain models: use torch.compile)"
        )
    _register_x86_int8_lowering()
    previous = runtime_of(model)
    install(model, "always", compile_kwargs or (previous.compile_kwargs if previous else None))
    model.eval()
    return model


_warned_compile = False


def compile(model: nn.Module, **compile_kwargs) -> nn.Module:  # noqa: A001 - the old name, kept for callers
    """Deprecated alias of :func:`compile_int8` (the name shadowed the builtin ``compile``);
    warns once per process."""
    global _warned_compile
    if not _warned_compile:
        _warned_compile = True
        warnings.warn(
            "slimkit.quant.compile is deprecated: use slimkit.quant.compile_int8 (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
    return compile_int8(model, **compile_kwargs)


__all__ = ["compile_int8", "prepare_compilation"]
