"""slimkit: distill, prune and quantize models while they train.

``import slimkit`` imports torch and safetensors only; the timm / transformers / accelerate
integrations live in ``slimkit.plugins`` and are imported on demand.
"""

from __future__ import annotations

# isort: off
from . import omp  # noqa: F401  first: may set OMP_WAIT_POLICY before torch loads OpenMP (slimkit/omp.py)

# isort: on
from .api import compute_loss, convert, convert_, log_values, methods_of, prepare, step
from .calibration import calibrate, needs_calibration
from .distill import uniform_layer_map
from .dropout import disable_dropout
from .errors import (
    ConfigError,
    FormatError,
    IncompatibleError,
    ModuleNameError,
    SlimkitError,
    UnsupportedModelError,
)
from .hub import from_pretrained, save_pretrained
from .malloc import steady_malloc
from .methods import HubBlock, register_method, registered_methods
from .model_info import ModelInfo, model_info
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
from .sensitivity import Sensitivity, sensitivity

__version__ = "0.1.0"

__all__ = [
    "Sensitivity",
    "sensitivity",
    "ActivationQuantConfig",
    "AttentionPair",
    "ConfigError",
    "DistillConfig",
    "FeaturePair",
    "FormatError",
    "HubBlock",
    "IncompatibleError",
    "ModelInfo",
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
    "convert_",
    "disable_dropout",
    "export_onnx",
    "from_pretrained",
    "log_values",
    "methods_of",
    "model_info",
    "needs_calibration",
    "prepare",
    "register_method",
    "registered_methods",
    "save_pretrained",
    "step",
    "steady_malloc",
    "uniform_layer_map",
]
