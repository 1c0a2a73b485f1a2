"""Recipes: one file, three optional sections (``distill``, ``prune``, ``quant``), and one more
for each method registered with :func:`slimkit.register_method`.

Each section is a config dataclass that validates itself; ``Recipe.from_file`` reads YAML or
JSON and ``Recipe.to_dict`` round-trips. See the README's "Recipe reference" for every field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from ._config import Config, help_field
from .errors import ConfigError
from .recipe_io import short_repr
from .recipe_quant import ActivationQuantConfig as ActivationQuantConfig  # re-exported: slimkit.recipe's names
from .recipe_quant import QuantConfig
from .recipe_quant import WeightQuantConfig as WeightQuantConfig
from .recipe_target import TargetConfig

# ----------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------

LayerMap = Literal["uniform"] | list[list[int]]


def _check_pair_names(cfg: Any, path: str) -> None:
    for side in ("student", "teacher"):
        name = getattr(cfg, side)
        if not name:
            Config.fail(path, side, "must name a module, e.g. 'encoder.layer.3'")
        if name.count("*") > 1:
            Config.fail(path, side, f"{name!r} has more than one '*'; use one '*' for the layer index")
    wild = ["*" in cfg.student, "*" in cfg.teacher]
    if any(wild) and not all(wild):
        Config.fail(
            path,
            "student" if not wild[0] else "teacher",
            "both names need a '*' for the layer index when one has it "
            f"(got student={cfg.student!r}, teacher={cfg.teacher!r})",
        )
    if cfg.map is not None and not all(wild):
        Config.fail(path, "map", "a layer map needs '*' in both names, e.g. 'encoder.layer.*'")
    if isinstance(cfg.map, list):
        for i, pair in enumerate(cfg.map):
            if len(pair) != 2 or any(p < 0 for p in pair):
                Config.fail(path, f"map[{i}]", f"expected [student_layer, teacher_layer] >= 0, got {short_repr(pair)}")
    if cfg.weight < 0:
        Config.fail(path, "weight", f"must be >= 0, got {cfg.weight}")


@dataclasses.dataclass
class FeaturePair(Config):
    """Projected feature KD between one student module and one teacher module."""

    student: str = help_field("", "student module name; '*' stands for the layer index")
    teacher: str = help_field("", "teacher module name; '*' stands for the layer index")
    weight: float = help_field(1.0, "weight of this term in the loss")
    loss: Literal["mse", "cosine", "relation"] = help_field(
        "mse",
        "mse, cosine (1 - cosine similarity), or relation (squared difference of the batch's "
        "pairwise cosine similarities: what ranking by similarity depends on)",
    )
    pool: Literal["none", "mean"] = help_field(
        "none", "mean: average over valid tokens / positions first (a mean-pooled sentence embedding)"
    )
    map: LayerMap | None = help_field(
        None, "with '*': 'uniform' (default) or explicit [[student_layer, teacher_layer], ...]"
    )

    def validate(self, path: str) -> None:
        _check_pair_names(self, path)


@dataclasses.dataclass
class AttentionPair(Config):
    """Attention-map KD: KL between the attention probabilities of mapped layers."""

    student: str = help_field("", "student attention module; '*' stands for the layer index")
    teacher: str = help_field("", "teacher attention module; '*' stands for the layer index")
    weight: float = help_field(1.0, "weight of this term in the loss")
    heads: Literal["auto", "average", "per_head"] = help_field(
        "auto", "per_head when both have the same head count, else the head-averaged maps"
    )
    map: LayerMap | None = help_field(None, "with '*': 'uniform' (default) or explicit pairs")

    def validate(self, path: str) -> None:
        _check_pair_names(self, path)


@dataclasses.dataclass
class DistillConfig(Config):
    """Knowledge distillation: alpha*T^2*KL(teacher||student) + (1-alpha)*task + features + attention."""

    section: ClassVar[str] = "distill"
    stage_name: ClassVar[str] = "distilled"

    temperature: float = help_field(4.0, "softmax temperature T (> 0)")
    alpha: float = help_field(0.5, "weight of the logit KD term; the task loss gets 1 - alpha")
    features: list[FeaturePair] = help_field([], "projected feature KD pairs")
    attention: list[AttentionPair] = help_field([], "attention-map KD pairs")
    dropout: Literal["keep", "off"] = help_field(
        "keep", "off: no dropout in the student while it trains (helps feature KD from a pre-trained encoder)"
    )
    chunk_tokens: int | None = help_field(
        None, "positions per chunk of the logit KD loss (null: about 4M logits per chunk, 128 tokens at 32k vocabulary)"
    )

    def phase_start(self) -> int | None:
        return 0  # distillation trains the student from the first step

    def validate(self, path: str) -> None:
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            self.fail(path, "chunk_tokens", f"must be >= 1 (or null for automatic), got {self.chunk_tokens}")
        if not self.temperature > 0:
            self.fail(path, "temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            self.fail(path, "alpha", f"must be in [0, 1], got {self.alpha}")


# ----------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScheduleConfig(Config):
    """When units are removed: all at once, in stages, or gradually (linear, exponential, cubic)."""

    section: ClassVar[str] = "prune.schedule"

    kind: Literal["one_shot", "iterative", "linear", "exponential", "cubic"] = help_field(
        "one_shot", "one_shot | iterative | linear | exponential | cubic"
    )
    start_step: int = help_field(0, "first pruning step")
    end_step: int | None = help_field(None, "step at which the final ratio is reached (all but one_shot)")
    every: int = help_field(100, "linear / exponential / cubic: re-rank and prune every this many steps")
    stages: int = help_field(3, "iterative: number of stages between start_step and end_step")

    def validate(self, path: str) -> None:
        if self.start_step < 0:
            self.fail(path, "start_step", f"must be >= 0, got {self.start_step}")
        if self.every < 1:
            self.fail(path, "every", f"must be >= 1, got {self.every}")
        if self.stages < 1:
            self.fail(path, "stages", f"must be >= 1, got {self.stages}")
        if self.kind != "one_shot":
            if self.end_step is None:
                self.fail(path, "end_step", f"is required for kind={self.kind!r}")
            if self.end_step <= self.start_step:
                self.fail(path, "end_step", f"must be > start_step ({self.start_step}), got {self.end_step}")

    @property
    def last_step(self) -> int:
        """The step after which no unit is pruned any more."""
        return self.start_step if self.kind == "one_shot" else int(self.end_step)


def _ratio(cfg: Config, path: str, name: str) -> None:
    value = getattr(cfg, name)
    if not 0.0 <= value < 1.0:
        cfg.fail(path, name, f"must be in [0, 1), got {value}")


@dataclasses.dataclass
class PruneConfig(Config):
    """Structured pruning (channels, MLP neurons, heads) and unstructured / N:M masks."""

    section: ClassVar[str] = "prune"
    stage_name: ClassVar[str] = "pruned"

    channels: float = help_field(0.0, "fraction of prunable conv channels / MLP neurons to remove")
    heads: float = help_field(0.0, "fraction of attention heads to remove (never all of a layer)")
    importance: Literal["l1", "l2", "taylor", "bn_scale", "activation", "obs", "fisher"] = help_field(
        "l2",
        "how units are ranked: weight norms (l1, l2, bn_scale), recorded inputs (activation: |W|*||X||; obs: "
        "what the least-squares refit cannot compensate; no labels), or gradients of the loss (taylor, fisher)",
    )
    reconstruct: bool = help_field(
        False,
        "at every pruning point, refit the layers that read the removed units by least squares on recorded "
        "inputs (and, at slimkit.calibrate, recompute BatchNorm statistics)",
    )
    sequential: bool = help_field(
        False,
        "reconstruct inside slimkit.calibrate layer by layer on the already-pruned model's inputs, towards the "
        "dense model's outputs (costs a model copy and a pass per layer; measured no better than the default: "
        "every layer refit on the dense model's inputs)",
    )
    damping: float = help_field(
        0.001, "reconstruct: ridge term, as a fraction of the mean diagonal of each layer's input Gram matrix"
    )
    statistics_steps: int = help_field(
        16,
        "activation / reconstruct / sensitivity during training: forwards of this many steps before each "
        "pruning point are recorded (a point at step 0 takes its data from slimkit.calibrate)",
    )
    scope: Literal["local", "global"] = help_field("local", "same ratio per layer, or one global threshold")
    allocation: Literal["sensitivity", "score"] = help_field(
        "sensitivity",
        "global scope: spread the ratio where the measured output error is smallest (needs recorded inputs), "
        "or by mean-normalised scores",
    )
    max_layer_ratio: float = help_field(0.9, "global scope: the most any one layer may lose")
    round_to: int | None = help_field(None, "keep widths a multiple of this")
    schedule: ScheduleConfig = help_field(dataclasses.MISSING, "when to prune", default_factory=ScheduleConfig)
    exclude: list[str] = help_field([], "module names or fnmatch patterns never pruned (classifier and stem are)")
    include: list[str] = help_field(
        [],
        "if given, prune only these modules (names or fnmatch patterns), even those the adapter excludes by "
        "default (stem, classifier); exclude still wins",
    )
    layers: float = help_field(
        0.0,
        "depth pruning: a whole number >= 1 of blocks (transformer layers, residual blocks) or a fraction in "
        "(0, 1); with a target, the most blocks the solver may remove (it chooses how many, from 0)",
    )
    layer_importance: Literal["block_influence", "output_cosine"] = help_field(
        "output_cosine",
        "how blocks are ranked: output_cosine (the output's cosine drop when a block is skipped, on calibration "
        "batches) | block_influence (1 - cos(block input, output), ShortGPT)",
    )
    sparsity: float = help_field(0.0, "unstructured magnitude sparsity of weights (masks only)")
    nm: str | None = help_field(None, "semi-structured N:M mask such as '2:4' (masks only)")
    verify: bool = help_field(
        True, "at prepare, check on a copy of the model that masking equals removal (costs one copy)"
    )
    target: TargetConfig | None = help_field(
        None,
        "a budget instead of channels / heads ratios: {speedup: 2.0, batch: 1}, {latency_ms: 12}, {macs: 0.5} "
        "or {params: 0.5}; per-layer widths are chosen where they cost least quality",
    )

    def validate(self, path: str) -> None:
        for name in ("channels", "heads", "sparsity"):
            _ratio(self, path, name)
        if self.layers < 0 or (self.layers >= 1 and not float(self.layers).is_integer()):
            self.fail(
                path,
                "layers",
                f"must be a whole number of blocks (>= 1) or a fraction in (0, 1), got {self.layers}",
            )
        if not 0.0 <= self.damping < 1.0:
            self.fail(path, "damping", f"must be in [0, 1), got {self.damping}")
        if self.statistics_steps < 1:
            self.fail(path, "statistics_steps", f"must be >= 1, got {self.statistics_steps}")
        if self.reconstruct and not self.width:
            self.fail(
                path, "reconstruct", "refits the layers that read removed channels / heads; set channels or heads"
            )
        if not 0.0 < self.max_layer_ratio < 1.0:
            self.fail(path, "max_layer_ratio", f"must be in (0, 1), got {self.max_layer_ratio}")
        if self.round_to is not None and self.round_to < 1:
            self.fail(path, "round_to", f"must be >= 1, got {self.round_to}")
        if self.nm is not None:
            m = re.fullmatch(r"(\d+):(\d+)", self.nm)
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                self.fail(path, "nm", f"expected 'N:M' with 0 < N < M, such as '2:4', got {self.nm!r}")
        if self.sparsity and self.nm:
            self.fail(path, "nm", "use either sparsity (unstructured) or nm (N:M), not both")
        if self.target is not None:
            for name in ("channels", "heads"):
                if getattr(self, name):
                    self.fail(
                        path,
                        name,
                        f"prune.target chooses the widths itself; remove {name} (or the target); "
                        "prune.layers stays allowed: the most blocks the target may remove",
                    )

    def phase_start(self) -> int | None:
        return self.schedule.start_step

    def fit_problems(self, max_steps: int, source: str) -> list[str]:
        """Pruning must reach its last step (``schedule.end_step``, or ``start_step`` for one-shot)."""
        if not (self.structured or self.sparsity or self.nm):
            return []
        field = "start_step" if self.schedule.kind == "one_shot" else "end_step"
        if self.schedule.last_step <= max_steps:
            return []
        return [
            f"prune.schedule.{field} is {self.schedule.last_step} but the run stops after {source}={max_steps} "
            f"steps, so pruning would never finish; lower prune.schedule.{field} or raise {source}"
        ]

    @property
    def structured(self) -> bool:
        """True when pruning changes shapes at convert time."""
        return self.width or self.layers > 0

    @property
    def width(self) -> bool:
        """True when channels / MLP neurons or heads are pruned (units inside layers)."""
        return self.channels > 0 or self.heads > 0 or self.target is not None

    @property
    def measures_sensitivity(self) -> bool:
        """Whether each group's error curve is measured on recorded inputs (global allocation by
        sensitivity, or a target, which trades those curves against latency / MACs)."""
        return self.width and (self.target is not None or (self.scope == "global" and self.allocation == "sensitivity"))

    @property
    def gradient_based(self) -> bool:
        """Units ranked by gradients of a loss (from training or from slimkit.calibrate)."""
        return self.width and self.importance in ("taylor", "fisher")

    @property
    def records_inputs(self) -> bool:
        """Whether the pruning points use recorded layer inputs."""
        return self.width and (
            self.importance in ("activation", "obs") or self.reconstruct or self.measures_sensitivity
        )


# ----------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------


# Sections of methods registered by other packages (slimkit.register_method): name -> Config class.
_EXTRA_SECTIONS: dict[str, type[Config]] = {}
_BUILTIN_SECTIONS = ("distill", "prune", "quant")


def register_section(name: str, config: type[Config] | None) -> None:
    """Let recipes carry the section ``name`` read by ``config`` (None: forget it). Called by
    :func:`slimkit.register_method`; the three built-in sections are the Recipe's own fields."""
    if name in _BUILTIN_SECTIONS:
        return
    if config is None:
        _EXTRA_SECTIONS.pop(name, None)
    else:
        _EXTRA_SECTIONS[name] = config


@dataclasses.dataclass
class Recipe(Config):
    """A full recipe. Any section may be left out.

    The built-in sections are fields (``recipe.prune``); a registered method's section is in
    ``recipe.section(name)`` (every present one: ``recipe.sections()``)."""

    distill: DistillConfig | None = help_field(None, "knowledge distillation")
    prune: PruneConfig | None = help_field(None, "pruning")
    quant: QuantConfig | None = help_field(None, "quantization")
    # Sections of registered methods (not init fields: Recipe(prune=...) keeps its signature).
    extra: dict[str, Config] = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_sections(cls, sections: dict[str, Config | dict | None]) -> Recipe:
        """A recipe of the given sections (name -> config object or plain dict)."""
        present = {k: v for k, v in sections.items() if v is not None}
        unknown = [k for k in present if k not in _BUILTIN_SECTIONS and k not in _EXTRA_SECTIONS]
        if unknown or not all(isinstance(v, Config) for v in present.values()):  # from_dict checks and names them
            return cls.from_dict({k: v.to_dict() if isinstance(v, Config) else v for k, v in present.items()})
        recipe = cls(**{k: v for k, v in present.items() if k in _BUILTIN_SECTIONS})
        recipe.extra = {k: v for k, v in present.items() if k not in _BUILTIN_SECTIONS}
        return recipe

    def sections(self) -> dict[str, Config]:
        """Every section present, name -> config (built-in ones first)."""
        own = {name: getattr(self, name) for name in _BUILTIN_SECTIONS if getattr(self, name) is not None}
        return {**own, **self.extra}

    def section(self, name: str) -> Config | None:
        """The section ``name`` (a built-in or a registered method's), or None if absent."""
        return getattr(self, name) if name in _BUILTIN_SECTIONS else self.extra.get(name)

    def validate(self, path: str) -> None:
        if self.prune is not None and self.quant is not None and self.prune.structured and self.quant.equalization:
            raise ConfigError(
                "quant.equalization: equalization rescales channels when the model is prepared, which would "
                "change how structured pruning ranks them; prune first (convert, save), then equalize and "
                "quantize the pruned model in a second run"
            )
        if self.prune is not None and self.quant is not None and self.prune.structured:
            last = self.prune.schedule.last_step
            if self.quant.mode == "qat" and self.quant.start_step <= last:
                raise ConfigError(
                    f"quant.start_step: QAT starts at step {self.quant.start_step} but structured pruning "
                    f"changes shapes until step {last} (prune.schedule). Fake-quant ranges observed before "
                    f"the last pruning step describe channels that are then removed; set quant.start_step "
                    f"to at least {last + 1}."
                )

    def check_fits(self, max_steps: int, source: str = "max_steps") -> None:
        """Refuse, before training starts, a schedule that cannot finish in ``max_steps``
        optimizer steps (``source`` names where that number came from, e.g. ``--max-steps``).

        Each section says what it needs (``Config.fit_problems``): pruning must reach its last
        step, QAT must train at least one step after ``quant.start_step``; otherwise the run
        would only fail at ``convert``, after all the training time was spent."""
        problems = [p for config in self.sections().values() for p in config.fit_problems(max_steps, source)]
        if problems:
            raise ConfigError("; ".join(problems))

    def phase_ends(self) -> dict[int, str]:
        """Steps at which a training phase ends -> the stage the model has reached there (where a
        loop scores it before the next phase begins): e.g. ``{270: "distilled", 540: "pruned"}``
        for KD from step 0, pruning from step 270 and QAT from step 540.

        Each section says when its phase starts (``Config.phase_start``) and what the model is
        after it (``Config.stage_name``); a phase starting at step 0 ends no earlier one."""
        sections = list(self.sections().values())  # distill, prune, quant, then registered sections
        starts = sorted((c.phase_start(), i) for i, c in enumerate(sections) if c.phase_start() is not None)
        points: dict[int, str] = {}
        reached = "trained"  # a run without a phase from step 0 (no distill) only trains at first
        for step, i in starts:  # phases starting at the same step: the later section names the stage
            if step > 0:
                points.setdefault(step, reached)
            reached = sections[i].stage_name or reached
        return points

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> Recipe:
        path = "" if path is None else path
        if not isinstance(data, dict) or not any(key in _EXTRA_SECTIONS for key in data):
            return super().from_dict(data, path)  # type: ignore[return-value]
        own = {k: v for k, v in data.items() if k not in _EXTRA_SECTIONS}
        extra = {
            key: _EXTRA_SECTIONS[key].from_dict(value, f"{path}.{key}" if path else key)
            for key, value in data.items()
            if key in _EXTRA_SECTIONS and value is not None
        }
        recipe = super().from_dict(own, path)
        recipe.extra = extra
        return recipe  # type: ignore[return-value]

    @classmethod
    def load(cls, source: Recipe | dict | str | Path) -> Recipe:
        """A recipe from any of the forms ``slimkit.prepare`` takes: a Recipe (returned as is),
        a plain dict (``from_dict``) or the path of a YAML / JSON file (``from_file``)."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        return cls.from_file(source)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a recipe from ``.yaml`` / ``.yml`` / ``.json`` (size, depth and YAML alias
        expansion bounded: see :mod:`slimkit.recipe_io`)."""
        from .recipe_io import read_recipe_file

        path = Path(path)
        data = read_recipe_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path.name}: {exc}") from None

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False))

    def to_dict(self) -> dict[str, Any]:
        own = {k: v for k, v in super().to_dict().items() if v is not None}
        return {**own, **{name: config.to_dict() for name, config in self.extra.items()}}
