"""slimkit: distill, prune and quantize models while they train.

``import slimkit`` imports torch and safetensors only; the timm / transformers / accelerate
integrations live in ``slimkit.plugins`` and are imported on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import calibrate, compute_loss, convert, log_values, prepare, step
from .distill import uniform_layer_map
from .errors import (
    ConfigError,
    FormatError,
    IncompatibleError,
    ModuleNameError,
    SlimkitError,
    UnsupportedModelError,
)
from .hub import from_pretrained, save_pretrained
from .quant import export_onnx
from .recipe import (
    ActivationQuantConfig,
    AttentionPair,
    DistillConfig,
    FeaturePair,
    PruneConfig,
    QuantConfig,
    Recipe,
    ScheduleConfig,
    WeightQuantConfig,
)

__all__ = [
    "ActivationQuantConfig",
    "AttentionPair",
    "ConfigError",
    "DistillConfig",
    "FeaturePair",
    "FormatError",
    "IncompatibleError",
    "ModuleNameError",
    "PruneConfig",
    "QuantConfig",
    "Recipe",
    "ScheduleConfig",
    "SlimkitError",
    "UnsupportedModelError",
    "WeightQuantConfig",
    "__version__",
    "calibrate",
    "compute_loss",
    "convert",
    "export_onnx",
    "from_pretrained",
    "log_values",
    "prepare",
    "save_pretrained",
    "step",
    "uniform_layer_map",
]
