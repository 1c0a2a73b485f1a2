"""The ``prune.target`` section of a recipe: a latency, MACs or parameter budget instead of ratios.

Its own module to keep :mod:`slimkit.recipe` small; import the name from ``slimkit.recipe``,
which re-exports it. How the budget is met: :mod:`slimkit.prune.target`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from ._config import Config, help_field


@dataclasses.dataclass
class TargetConfig(Config):
    """A budget instead of ratios: per-group widths are chosen to reach it with the least
    predicted quality loss (latency measured on this machine, MACs / parameters counted)."""

    section: ClassVar[str] = "prune.target"

    speedup: float | None = help_field(None, "measured speed-up over the dense model on this machine, > 1")
    latency_ms: float | None = help_field(None, "measured forward latency in milliseconds on this machine, > 0")
    macs: float | None = help_field(None, "fraction in (0, 1) of the dense model's multiply-accumulates kept")
    params: float | None = help_field(None, "fraction in (0, 1) of the dense model's parameters kept")
    batch: int = help_field(1, "speedup / latency_ms: batch size the latency is measured at")
    threads: int | None = help_field(None, "speedup / latency_ms: torch threads while timing (default: current)")
    tokens: int | None = help_field(
        None,
        "speedup / latency_ms: sequence length the latency is measured at, for token inputs (the 2-D integer "
        "tensors, input_ids and attention_mask, tiled or cut along the sequence); default: the example inputs' own",
    )
    widths: int = help_field(
        6, "candidate widths timed per group (multiples of round_to, default 8 with a target; macs / params: >= 32)"
    )
    rounds: int = help_field(
        3, "measurements of the pruned copy (timed or counted); after each miss the budget is rescaled and re-solved"
    )
    int8: bool = help_field(
        False,
        "speedup / latency_ms: time each pruned copy as the INT8 model the recipe's quant section converts it to "
        "(calibrated on the calibration batches), against the dense FP32 model: the target is the shipped INT8 "
        "model's speed",
    )
    tolerance: float = help_field(0.1, "relative miss accepted after the rounds (measured against the target)")
    compare: bool = help_field(
        True,
        "with calibration batches, also prune copies to uniform widths and to the unweighted curves' widths at the "
        "same predicted cost, and keep the plan whose outputs stay closest to the dense model's",
    )
    pool: Literal["none", "mean"] = help_field(
        "none",
        "token outputs (last_hidden_state with an attention mask): what plans are judged by (output reach, "
        "compare): none, every real token's state; mean, each sample's mean over its real tokens (the sentence "
        "embedding a mean-pooling encoder serves)",
    )
    cache: str | None = help_field(
        None, "folder of the per-machine latency tables (default: $SLIMKIT_CACHE/latency or ~/.cache/slimkit/latency)"
    )

    def validate(self, path: str) -> None:
        given = [n for n in ("speedup", "latency_ms", "macs", "params") if getattr(self, n) is not None]
        if len(given) != 1:
            self.fail(
                path,
                "speedup",
                f"give exactly one of speedup, latency_ms, macs, params (got {', '.join(given) or 'none'}), "
                "e.g. target: {speedup: 2.0}",
            )
        if self.speedup is not None and self.speedup <= 1.0:
            self.fail(path, "speedup", f"must be > 1 (a speed-up over the dense model), got {self.speedup}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            self.fail(path, "latency_ms", f"must be > 0, got {self.latency_ms}")
        for name in ("macs", "params"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                self.fail(path, name, f"must be a fraction in (0, 1) of the dense model kept, got {value}")
        if self.batch < 1:
            self.fail(path, "batch", f"must be >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            self.fail(path, "threads", f"must be >= 1, got {self.threads}")
        if self.tokens is not None and self.tokens < 1:
            self.fail(path, "tokens", f"must be >= 1, got {self.tokens}")
        if self.tokens is not None and not self.timed:
            self.fail(
                path, "tokens", f"sets the length latency is timed at; a {self.kind} target is counted, drop tokens"
            )
        if self.int8 and not self.timed:
            self.fail(
                path, "int8", f"times INT8 models; a {self.kind} target is counted on the float architecture, drop int8"
            )
        if self.widths < 2:
            self.fail(path, "widths", f"must be >= 2, got {self.widths}")
        if self.rounds < 1:
            self.fail(path, "rounds", f"must be >= 1, got {self.rounds}")
        if not 0.0 < self.tolerance < 1.0:
            self.fail(path, "tolerance", f"must be in (0, 1), got {self.tolerance}")

    @property
    def kind(self) -> str:
        """Which budget: 'speedup', 'latency_ms', 'macs' or 'params'."""
        return next(n for n in ("speedup", "latency_ms", "macs", "params") if getattr(self, n) is not None)

    @property
    def timed(self) -> bool:
        """A latency budget (measured), rather than a counted one."""
        return self.kind in ("speedup", "latency_ms")

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))
