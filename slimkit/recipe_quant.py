"""The ``quant`` section of a recipe: how weights and activations are fake-quantized, and when.

Its own module to keep :mod:`slimkit.recipe` small; import the names from ``slimkit.recipe``
(or ``slimkit``), which re-exports them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from ._config import Config, help_field

Observer = Literal["minmax", "moving_average_minmax", "histogram", "percentile"]


@dataclasses.dataclass
class WeightQuantConfig(Config):
    """How weights are fake-quantized: int8, per output channel, symmetric by default."""

    bits: int | Literal["auto"] = help_field(
        "auto",
        "weights: 8 (levels -127..127), 7 (-63..63), or auto: 7 on an x86 CPU without VNNI, whose u8 x s8 "
        "int8 kernels saturate with 8-bit weights, else 8 (decided where the model is prepared; see "
        "slimkit.quant.int8_hardware); activations: 8",
    )
    granularity: Literal["per_channel", "per_tensor"] = help_field("per_channel", "per_channel | per_tensor")
    symmetric: bool = help_field(True, "symmetric (zero-point 0) or affine")
    observer: Observer = help_field("minmax", "how the range is estimated")
    percentile: float = help_field(99.99, "percentile / histogram observers: the kept quantile in percent")

    def validate(self, path: str) -> None:
        if self.bits not in (7, 8, "auto"):
            self.fail(path, "bits", f"must be 8, 7 (exact on CPUs without VNNI) or auto; got {self.bits}")
        if not 50.0 < self.percentile <= 100.0:
            self.fail(path, "percentile", f"must be in (50, 100], got {self.percentile}")


@dataclasses.dataclass
class ActivationQuantConfig(WeightQuantConfig):
    """How activations are fake-quantized: 8-bit, per tensor, affine by default."""

    bits: int = help_field(8, "activations are 8-bit (uint8)")
    granularity: Literal["per_tensor"] = help_field("per_tensor", "activations are quantized per tensor")
    symmetric: bool = help_field(False, "symmetric or affine (default)")
    observer: Observer = help_field("moving_average_minmax", "how the range is estimated")
    averaging_constant: float = help_field(0.01, "moving_average_minmax: the EMA factor")

    def validate(self, path: str) -> None:
        if self.bits != 8:
            self.fail(
                path,
                "bits",
                f"activations are 8-bit (uint8); for CPUs without VNNI use weights.bits: 7, got {self.bits}",
            )
        super().validate(path)
        if not 0.0 < self.averaging_constant <= 1.0:
            self.fail(path, "averaging_constant", f"must be in (0, 1], got {self.averaging_constant}")


@dataclasses.dataclass
class QuantConfig(Config):
    """Quantization-aware training (fake-quant), PTQ calibration and INT8 conversion."""

    section: ClassVar[str] = "quant"
    stage_name: ClassVar[str] = "quantized"

    mode: Literal["qat", "ptq", "dynamic"] = help_field("qat", "qat | ptq (static calibration) | dynamic")
    weights: WeightQuantConfig = help_field(
        dataclasses.MISSING, "how weights are fake-quantized", default_factory=WeightQuantConfig
    )
    activations: ActivationQuantConfig = help_field(
        dataclasses.MISSING, "how activations are fake-quantized", default_factory=ActivationQuantConfig
    )
    learn_scales: bool = help_field(False, "learn scale and zero-point (LSQ-style)")
    fold_bn: bool = help_field(True, "fold BatchNorm into the preceding conv during QAT")
    start_step: int = help_field(0, "step at which fake-quant switches on")
    freeze_observers_step: int | None = help_field(None, "step after which ranges stop updating")
    freeze_bn_step: int | None = help_field(None, "step after which BN statistics stop updating")
    exclude: list[str] = help_field([], "module names or fnmatch patterns kept in floating point")
    embeddings: bool | None = help_field(
        None,
        "also store nn.Embedding tables as int8, one symmetric scale per row (weight-only: lookups return "
        "float); embeddings tied to another module's weight stay float. null (default): on for Hugging Face "
        "transformers models (measured on MiniLM: QAT+KD cosine 0.99479 vs 0.99485 without), off for others",
    )
    equalization: bool = help_field(
        False,
        "cross-layer equalization at prepare (Nagel et al. 2019): rescale consecutive Conv2d / Linear pairs "
        "joined by ReLU, pooling or BatchNorm (depthwise convs included) so their weight ranges match; the "
        "float function is unchanged",
    )
    bias_correction: bool = help_field(
        False,
        "during slimkit.calibrate, measure each layer's mean output shift caused by weight rounding and "
        "subtract it from the bias (PTQ, or calibrate before QAT)",
    )
    compile: Literal["auto", "always", "never", "onnxruntime"] = help_field(
        "auto",
        "how the converted model runs: auto compiles models with INT8 convolutions on their first inference "
        "call (torch.compile, one graph per input shape; others run eagerly) and, where onnxruntime is "
        "installed, keeps that shape's onnxruntime session instead when it measures faster; always (compiled "
        "only), never (eager oneDNN "
        "kernels only), or onnxruntime (inference calls run on an onnxruntime CPU session of slimkit's QDQ "
        "export, one per input shape, built and checked against the eager kernels on its first call; needs "
        "pip install 'slimkit[quant]'); slimkit.quant.set_compile changes it later",
    )
    keep_fp32: float | Literal["auto"] | None = help_field(
        None,
        "mixed precision: at slimkit.calibrate, measure in fake-quant how much each layer alone gives back "
        "when it computes in float, and keep the most helpful in float: a whole number >= 1 of layers, a "
        "fraction in (0, 1) of the quantized layers, or auto (as few as bring the output cosine to float to "
        "keep_fp32_floor, at most keep_fp32_max of the layers); null: off. The choice is in the model card",
    )
    keep_fp32_floor: float = help_field(
        0.999, "keep_fp32 auto: the output cosine to the float model (fake-quant) at which it stops"
    )
    keep_fp32_max: float = help_field(0.1, "keep_fp32 auto: the largest fraction of quantized layers kept in float")
    keep_fp32_batches: int = help_field(
        4, "keep_fp32: the calibration batches its measurements run on (one pass of them per quantized layer)"
    )
    conv_outputs: bool = help_field(
        True,
        "also quantize Conv2d outputs (after folded BatchNorm and ReLU) and the residual adds they feed, "
        "so INT8 CNNs stay uint8 between layers (as onnxruntime's quantize_static); false: layer inputs only",
    )
    gates: bool = help_field(
        True,
        "with conv_outputs: also quantize the sigmoid inside nn.SiLU modules and sigmoid gates of quantized "
        "tensors, and the products they feed (EfficientNet's SiLU and squeeze-excite), as quantize_static does: "
        "onnxruntime then runs int8 sigmoids and products; false keeps them in float",
    )

    def phase_start(self) -> int | None:
        return self.start_step if self.mode == "qat" else None  # PTQ and dynamic do not train

    def fit_problems(self, max_steps: int, source: str) -> list[str]:
        """QAT must train at least one step after ``start_step``."""
        if self.mode != "qat" or self.start_step < max_steps:
            return []
        return [
            f"quant.start_step is {self.start_step} but the run stops after {source}={max_steps} steps, "
            f"so QAT would never train (fake-quant ranges would never be observed); set quant.start_step "
            f"below {max_steps} or raise {source}"
        ]

    def validate(self, path: str) -> None:
        if self.start_step < 0:
            self.fail(path, "start_step", f"must be >= 0, got {self.start_step}")
        if not self.weights.symmetric:
            self.fail(
                path,
                "weights.symmetric",
                "false is not supported: the INT8 kernels (oneDNN, onnxruntime) take symmetric int8 "
                "weights (zero-point 0); use true",
            )
        if self.weights.observer == "moving_average_minmax":
            self.fail(
                path,
                "weights.observer",
                "'moving_average_minmax' is for activations; weights are seen whole every step, so "
                "use 'minmax', 'percentile' or 'histogram'",
            )
        if self.bias_correction and self.mode == "dynamic":
            self.fail(
                path,
                "bias_correction",
                "needs calibration data (slimkit.calibrate), which mode 'dynamic' has none of; use mode ptq or qat",
            )
        self._validate_keep_fp32(path)
        for name in ("freeze_observers_step", "freeze_bn_step"):
            value = getattr(self, name)
            if value is not None and value < self.start_step:
                self.fail(path, name, f"must be >= start_step ({self.start_step}), got {value}")

    def _validate_keep_fp32(self, path: str) -> None:
        value = self.keep_fp32
        if value is None:
            return
        if value != "auto" and not (0.0 < value < 1.0 or (value >= 1 and float(value).is_integer())):
            self.fail(path, "keep_fp32", f"must be a whole number >= 1, a fraction in (0, 1) or 'auto', got {value}")
        if self.mode == "dynamic":
            self.fail(
                path,
                "keep_fp32",
                "chooses layers from calibration data (slimkit.calibrate), which mode 'dynamic' has none of; use "
                "mode ptq or qat, or list the layers in quant.exclude",
            )
        if not 0.0 < self.keep_fp32_floor <= 1.0:
            self.fail(path, "keep_fp32_floor", f"must be in (0, 1], got {self.keep_fp32_floor}")
        if not 0.0 < self.keep_fp32_max < 1.0:
            self.fail(path, "keep_fp32_max", f"must be in (0, 1), got {self.keep_fp32_max}")
        if self.keep_fp32_batches < 1:
            self.fail(path, "keep_fp32_batches", f"must be >= 1, got {self.keep_fp32_batches}")
