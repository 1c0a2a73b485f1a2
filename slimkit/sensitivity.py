"""``slimkit.sensitivity``: what each layer costs in quality when it alone is pruned or INT8.

    table = slimkit.sensitivity(model, batches, ratios=(0.25, 0.5, 0.75))
    table.save("out/sensitivity")        # sensitivity.json and sensitivity.png (layers x ratios)
    table.most_harmful_int8(3)           # the layers to keep in floating point first

Every measurement goes through the public API on a copy of the model, so it is exactly what a
recipe would do to that layer: ``prepare`` with ``prune.include: [layer]`` (one-shot, the
importance and reconstruction asked for), ``calibrate`` where the method takes data, ``convert``;
for INT8, PTQ with every other layer in ``quant.exclude``. The model given is never changed.

Quality is measured on the same batches against the model's own outputs:

* ``"cosine"`` (default): mean cosine between each sample's outputs (logits, or the last hidden
  state of an encoder without a head; per real token where the batch has an attention mask)
  and the original model's; 1.0 is unchanged;
* ``"loss"``: the model's task loss (its own ``outputs.loss``, or cross-entropy of the logits
  against the batches' labels); lower is better;
* a callable ``metric(model, batches) -> float``, higher is better (e.g. accuracy).

``drop`` is always "how much worse": positive when the change hurts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import call_model, get_loss
from .api import convert_, methods_of, prepare
from .batches import collect, model_inputs
from .calibration import calibrate, needs_calibration
from .errors import SlimkitError
from .outputs import flat_outputs, mean_cosine, output_tensor
from .quant.calibration import batch_size

Metric = str | Callable[[nn.Module, list], float]


@dataclasses.dataclass
class SensitivityRow:
    """One measurement: ``layer`` pruned at ``ratio`` (kind ``channels`` / ``heads``), or
    alone in INT8 (kind ``int8``, ratio None)."""

    kind: str
    layer: str
    ratio: float | None
    quality: float | None  # None when not measured (see error)
    drop: float | None
    units: int | None = None  # units in the group (pruning rows)
    error: str | None = None  # why this layer could not be measured (the scan goes on)


@dataclasses.dataclass
class Sensitivity:
    """The result of :func:`sensitivity`: a row per (layer, ratio) and per INT8 layer."""

    metric: str
    baseline: float
    ratios: list[float]
    rows: list[SensitivityRow]

    def drops(self, kind: str) -> dict[str, dict[float | None, float]]:
        """layer -> {ratio: drop} for one kind (``channels``, ``heads`` or ``int8``)."""
        out: dict[str, dict[float | None, float]] = {}
        for row in self.rows:
            if row.kind == kind and row.error is None:
                out.setdefault(row.layer, {})[row.ratio] = row.drop
        return out

    def most_harmful_int8(self, count: int) -> list[str]:
        """The ``count`` layers whose INT8 conversion alone costs the most quality."""
        ranked = sorted(self.drops("int8").items(), key=lambda item: -item[1][None])
        return [name for name, _ in ranked[:count]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "ratios": self.ratios,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(data["metric"], data["baseline"], data["ratios"], [SensitivityRow(**r) for r in data["rows"]])

    def save(self, folder: str | Path, plot: bool = True) -> Path:
        """Write ``sensitivity.json`` (and ``sensitivity.png``, a heat map of the pruning drops
        per layer and ratio beside the INT8 drop per layer) into ``folder``; returns the JSON path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sensitivity.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if plot:
            self.plot(folder / "sensitivity.png")
        return path

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(k, self.drops(k)) for k in ("channels", "heads", "int8")]
        panels = [(k, d) for k, d in panels if d]
        if not panels:
            return
        height = max(len(d) for _, d in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(4 + 2 * len(panels), 1.5 + 0.25 * height), squeeze=False)
        for ax, (kind, drops) in zip(axes[0], panels):
            layers = list(drops)
            columns = [None] if kind == "int8" else self.ratios
            grid = [[drops[layer].get(c, math.nan) for c in columns] for layer in layers]
            image = ax.imshow(grid, aspect="auto", cmap="magma_r")
            ax.set_yticks(range(len(layers)), layers, fontsize=6)
            ax.set_xticks(range(len(columns)), ["int8" if c is None else f"{c:.0%}" for c in columns])
            ax.set_title(f"{kind}: {self.metric} drop", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def format(self) -> str:
        """A plain-text table (what ``slimkit sensitivity`` prints)."""
        lines = [f"metric: {self.metric} (unchanged model: {self.baseline:.5f}); drop = how much worse"]
        for kind in ("channels", "heads"):
            drops = self.drops(kind)
            if drops:
                header = "".join(f"{r:>9.0%}" for r in self.ratios)
                lines.append(f"\n{kind + ' pruned':<44}{header}")
                for layer, values in drops.items():
                    lines.append(f"{layer:<44}" + "".join(f"{values.get(r, math.nan):>9.4f}" for r in self.ratios))
        drops = self.drops("int8")
        if drops:
            lines.append(f"\n{'alone in int8':<44}{'drop':>9}")
            for layer, values in sorted(drops.items(), key=lambda item: -item[1][None]):
                lines.append(f"{layer:<44}{values[None]:>9.4f}")
        failed = [r for r in self.rows if r.error]
        for row in failed:
            lines.append(f"not measured: {row.kind} {row.layer}: {row.error}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list) -> float:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    for batch in batches:
        inputs = model_inputs(batch, device)
        labels = batch.get("labels") if isinstance(batch, dict) else batch[1] if isinstance(batch, tuple) else None
        if isinstance(inputs, dict) and labels is not None:
            inputs = {**inputs, "labels": labels}
        outputs = call_model(model, inputs)
        loss = get_loss(outputs)
        if loss is None:
            if labels is None:
                raise SlimkitError(
                    "sensitivity: metric 'loss' needs labels: batches as (inputs, labels) tuples or dicts with "
                    "'labels', or a model whose outputs carry a loss"
                )
            loss = F.cross_entropy(output_tensor(outputs).float().flatten(0, -2), labels.reshape(-1).to(device))
        total += float(loss)
        count += 1
    return total / max(count, 1)


class _Quality:
    """Quality of a changed model against the original, and how much worse it is."""

    def __init__(self, model: nn.Module, batches: list, metric: Metric) -> None:
        self.batches, self.metric = batches, metric
        self.name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        if isinstance(metric, str) and metric not in ("cosine", "loss"):
            raise SlimkitError(f"sensitivity: metric must be 'cosine', 'loss' or a callable, got {metric!r}")
        if metric == "cosine":
            self.reference = flat_outputs(model.eval(), batches)
        self.baseline = self.measure(model)

    def measure(self, model: nn.Module) -> float:
        model.eval()
        if self.metric == "cosine":
            value = mean_cosine(flat_outputs(model, self.batches), self.reference)
        elif self.metric == "loss":
            value = _mean_loss(model, self.batches)
        else:
            with torch.no_grad():
                value = float(self.metric(model, self.batches))
        if not math.isfinite(value):
            raise SlimkitError(f"sensitivity: the {self.name} of a changed model is {value}; check the batches")
        return value

    def drop(self, value: float) -> float:
        return value - self.baseline if self.metric == "loss" else self.baseline - value


# ----------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------
def _prunable(model: nn.Module, kind: str, example_inputs: Any) -> list[tuple[str, str, int]]:
    """(kind, root, units) of every group of ``kind`` a recipe could prune, from a prepared copy."""
    probe = prepare(copy.deepcopy(model), {"prune": {kind: 0.5}}, example_inputs=example_inputs)
    pruner = methods_of(probe)["prune"]
    unit_kind = pruner.channels if kind == "channels" else pruner.heads
    return [(kind, group.root, group.size) for group in unit_kind.groups]


def _quantizable(model: nn.Module, example_inputs: Any) -> list[str]:
    probe = prepare(
        copy.deepcopy(model), {"quant": {"mode": "ptq", "embeddings": False}}, example_inputs=example_inputs
    )
    return list(methods_of(probe)["quant"].layers)


def _pruned_copy(model, kind, root, ratio, prune_options, batches, example_inputs) -> nn.Module:
    section = {
        **prune_options,
        kind: ratio,
        "include": [root],
        "schedule": {"kind": "one_shot", "start_step": 0},
    }
    prepared = prepare(copy.deepcopy(model), {"prune": section}, example_inputs=example_inputs)
    if needs_calibration(prepared):
        calibrate(prepared, batches)
    return convert_(prepared)  # already a copy


def _int8_copy(model, layer, layers, batches, example_inputs) -> nn.Module:
    others = [name for name in layers if name != layer]
    # eager INT8 kernels: the same numbers as compiled ones, without a compilation per copy
    recipe = {"quant": {"mode": "ptq", "embeddings": False, "exclude": others, "compile": "never"}}
    prepared = prepare(copy.deepcopy(model), recipe, example_inputs=example_inputs)
    with warnings.catch_warnings():  # the few-samples warning, said once by sensitivity() itself
        warnings.simplefilter("ignore", UserWarning)
        calibrate(prepared, batches)
    return convert_(prepared)  # already a copy


def sensitivity(
    model: nn.Module,
    batches: Iterable,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    prune: Sequence[str] | bool = ("channels", "heads"),
    quant: bool = True,
    metric: Metric = "cosine",
    importance: str = "l2",
    reconstruct: bool = False,
    num_batches: int | None = 8,
    example_inputs: Any = None,
    layers: Sequence[str] | None = None,
) -> Sensitivity:
    """Measure, for each prunable group (channels of a layer, heads of an attention module),
    the quality drop when it alone is pruned at each of ``ratios``, and for each quantizable
    layer the drop when it alone is converted to INT8 (PTQ calibrated on the same batches).

    ``prune``: the unit kinds to scan (``("channels", "heads")``: those the model has; False:
    none). ``importance`` / ``reconstruct``: as in the recipe's ``prune`` section. ``layers``:
    fnmatch patterns restricting the scan. Deterministic for a fixed model and batches.
    """
    from .modules import matches_any

    if not all(0.0 < r < 1.0 for r in ratios):
        raise SlimkitError(f"sensitivity: ratios must lie in (0, 1), got {list(ratios)}")
    if not prune and not quant:
        raise SlimkitError("sensitivity: nothing to scan: prune=False and quant=False")
    data = collect(batches, num_batches)
    model = copy.deepcopy(model).eval()
    if example_inputs is None:
        example_inputs = model_inputs(data[0], torch.device("cpu"))
    quality = _Quality(model, data, metric)
    samples = sum(batch_size(model_inputs(b, torch.device("cpu"))) for b in data)
    if quant and samples < 16:
        warnings.warn(
            f"sensitivity: INT8 ranges calibrated on only {samples} samples; pass more batches (num_batches)",
            UserWarning,
            stacklevel=2,
        )
    rows: list[SensitivityRow] = []
    kinds = ("channels", "heads") if prune is True else tuple(prune or ())
    options = {"importance": importance, "reconstruct": reconstruct}
    groups = []
    for kind in kinds:
        try:
            groups.extend(_prunable(model, kind, example_inputs))
        except SlimkitError:  # a model without heads (or channels slimkit can cut): nothing of that kind
            continue
    for kind, root, units in groups:
        if layers is not None and not matches_any(root, list(layers)):
            continue
        for ratio in ratios:
            try:
                value = quality.measure(_pruned_copy(model, kind, root, ratio, options, data, example_inputs))
                rows.append(SensitivityRow(kind, root, ratio, value, quality.drop(value), units))
            except SlimkitError as exc:
                rows.append(SensitivityRow(kind, root, ratio, None, None, units, error=str(exc)[:300]))
    if quant:
        names = _quantizable(model, example_inputs)
        for layer in names:
            if layers is not None and not matches_any(layer, list(layers)):
                continue
            try:
                value = quality.measure(_int8_copy(model, layer, names, data, example_inputs))
                rows.append(SensitivityRow("int8", layer, None, value, quality.drop(value)))
            except SlimkitError as exc:
                rows.append(SensitivityRow("int8", layer, None, None, None, error=str(exc)[:300]))
    return Sensitivity(quality.name, quality.baseline, [float(r) for r in ratios], rows)
