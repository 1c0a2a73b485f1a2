"""Input statistics of the layers that read pruned units, for data-aware pruning.

A *consumer* is a layer whose input features are units of a group: the attention output
projection (heads), an MLP's down projection (neurons), the next conv / linear (channels).
While recording, a forward pre-hook on each consumer adds, over every token / position it
sees:

* ``sq``: the sum of each input position's square (per input feature of a linear layer, per
  input channel of a conv), for the activation-aware score ``|W| * ||X||``;
* ``gram``: the sum of ``z z^T`` with ``z`` the weight's input columns (a conv's unfolded
  patches) and, for layers with a bias, a constant 1 -- the least-squares statistics of
  reconstruction and of the measured sensitivity.

Padding tokens are left out when the model is called with an ``attention_mask`` whose shape
matches the consumer's input. Per-batch sums are computed in float32 and added up in float64.
Statistics are not checkpointed: a run resumed inside a recording window records again from
the resumed step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .units import is_transposed_linear


@dataclass
class InputStats:
    """What one consumer saw since the statistics were last reset."""

    layout: str  # "linear", "transposed" (HF Conv1D, weight [in, out]), "conv2d" or "conv" (no Gram)
    positions: int  # input features (linear) or input channels (conv)
    columns: int  # weight columns: positions, or channels * kernel taps for a conv
    bias: bool  # the Gram matrix has a constant feature for the bias
    count: int = 0  # rows added to the Gram matrix (tokens, or a conv's output positions)
    sq_count: int = 0  # tokens / input positions added to sq
    sq: torch.Tensor | None = None  # [positions]
    gram: torch.Tensor | None = None  # [columns + bias, columns + bias]
    cross: torch.Tensor | None = None  # [columns + bias, columns + bias]: sum z_reference z^T (sequential)
    calls: int = 0  # forwards through this consumer since the reset
    extras: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.count, self.sq_count, self.calls, self.sq, self.gram, self.cross = 0, 0, 0, None, None, None

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x^2] per input position."""
        return self.sq / max(self.sq_count, 1)

    def zeros(self, attr: str, device: torch.device) -> torch.Tensor:
        size = self.positions if attr == "sq" else self.columns + int(self.bias)
        shape = (size,) if attr == "sq" else (size, size)
        return torch.zeros(shape, dtype=torch.float64, device=device)


def consumer_layout(module: nn.Module, transposed: dict) -> str | None:
    """How a consumer's input maps to its weight columns; None when slimkit records nothing."""
    if is_transposed_linear(module, transposed):
        return "transposed"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv2d"
        return "conv"  # activation scores only: its patches are not unfolded
    return None


def new_stats(module: nn.Module, layout: str) -> InputStats:
    weight = module.weight
    if layout == "transposed":
        positions = columns = weight.shape[0]
    elif layout == "linear":
        positions = columns = weight.shape[1]
    else:
        positions = weight.shape[1]
        columns = weight[0].numel()
    has_bias = layout != "conv" and getattr(module, "bias", None) is not None
    return InputStats(layout, positions, columns, has_bias)


def columns_of(stats: InputStats, module: nn.Module, positions: list[int]) -> list[int]:
    """Weight columns of input positions (a conv channel owns all its kernel taps)."""
    if stats.layout not in ("conv2d", "conv"):
        return positions
    taps = module.weight[0, 0].numel()
    return [p * taps + t for p in positions for t in range(taps)]


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def features(module: nn.Module, stats: InputStats, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, columns] rows of the consumer's input as its weight reads them."""
    if stats.layout in ("linear", "transposed"):
        return _tokens(x, mask)
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _augment(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return rows
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)


def add_batch(
    module: nn.Module,
    stats: InputStats,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    gram: bool,
    reference: torch.Tensor | None = None,
) -> None:
    """Add one input of the consumer to its statistics (``reference``: the dense model's input
    of the same call, for the sequential cross statistic)."""
    x = x.detach().float()
    stats.calls += 1
    if stats.layout in ("conv2d", "conv"):
        channel_sq = x.square().sum(dim=[d for d in range(x.dim()) if d != 1])
        positions = x.shape[0] * x[0, 0].numel()
    else:
        rows = _tokens(x, mask)
        channel_sq = rows.square().sum(0)
        positions = rows.shape[0]
    stats.sq = channel_sq.double() if stats.sq is None else stats.sq + channel_sq.double()
    stats.sq_count += positions
    if not gram or stats.layout == "conv":
        return
    z = _augment(features(module, stats, x, mask), stats.bias)
    stats.count += z.shape[0]
    block = (z.T @ z).double()
    stats.gram = block if stats.gram is None else stats.gram + block
    if reference is not None:
        ref = _augment(features(module, stats, reference.detach().float(), mask), stats.bias)
        block = (ref.T @ z).double()
        stats.cross = block if stats.cross is None else stats.cross + block


def without(total: InputStats, part: InputStats) -> InputStats:
    """``total`` less the rows ``part`` recorded: the statistics are sums, so this is what a
    refit reads that must not see those rows (``cross`` is left out: it pairs a sequential
    reference's inputs, which ``part`` does not record)."""
    out = InputStats(total.layout, total.positions, total.columns, total.bias, extras=dict(total.extras))
    out.count, out.sq_count = total.count - part.count, total.sq_count - part.sq_count
    out.calls = max(total.calls - part.calls, 0)
    for attr in ("sq", "gram"):
        mine, theirs = getattr(total, attr), getattr(part, attr)
        setattr(out, attr, mine if mine is None or theirs is None else mine - theirs.to(mine.device))
    return out


def record(model: nn.Module, consumers: dict[str, nn.Module], transposed: dict, batches: list, forward) -> dict:
    """The statistics ``consumers`` of ``model`` see on ``batches`` alone (``forward(model,
    batch)`` calls the model), recorded by a recorder of their own that is removed after."""
    recorder = Recorder(model, consumers, transposed, gram=True)
    recorder.active = True
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        recorder.remove()
    return recorder.stats


class _Stop(Exception):
    """Raised inside a forward to stop it once the consumer of interest has been seen."""


class Recorder:
    """Forward pre-hooks on the consumers of a model that fill their :class:`InputStats`.

    ``active`` turns recording on and off (the pruner records during the steps before a
    pruning point, and inside ``slimkit.calibrate``); a hook only records for the module it
    was registered on, so copies of the model (``copy.deepcopy``) never write here.
    """

    def __init__(self, model: nn.Module, consumers: dict[str, nn.Module], transposed: dict, gram: bool) -> None:
        self.gram = gram
        self.active = False
        self.modules: dict[str, nn.Module] = {}
        self.stats: dict[str, InputStats] = {}
        self.mask: torch.Tensor | None = None
        self.order: list[str] = []  # consumers in the order the forward pass first reached them
        self._handles = [model.register_forward_pre_hook(self._model_hook, with_kwargs=True)]
        self._model = model
        for name, module in consumers.items():
            layout = consumer_layout(module, transposed)
            if layout is None:
                continue
            self.modules[name] = module
            self.stats[name] = new_stats(module, layout)
            self._handles.append(module.register_forward_pre_hook(self._hook(name, module)))

    def _model_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if model is not self._model:
            return
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _hook(self, name: str, owner: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.active or module is not owner or not args or not isinstance(args[0], torch.Tensor):
                return
            if self.stats[name].calls == 0:
                self.order.append(name)
            with torch.no_grad():
                add_batch(module, self.stats[name], args[0], self.mask, self.gram)

        return hook

    @property
    def seen(self) -> int:
        """Consumer inputs recorded since the last reset (0: nothing to rank or refit with)."""
        return max((s.sq_count for s in self.stats.values()), default=0)

    def reset(self) -> None:
        self.order = []
        for stats in self.stats.values():
            stats.reset()

    def all_reduce(self) -> None:
        """Sum the statistics of every process (DDP): each then ranks and refits alike."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        attrs = ("sq", "gram") if self.gram else ("sq",)
        for stats in self.stats.values():
            counts = torch.tensor([float(stats.count), float(stats.sq_count)], dtype=torch.float64)
            all_reduce_sum(counts)
            stats.count, stats.sq_count = int(counts[0]), int(counts[1])
            for attr in attrs:
                if attr == "gram" and stats.layout == "conv":
                    continue
                value = getattr(stats, attr)
                value = stats.zeros(attr, torch.device("cpu")) if value is None else value
                setattr(stats, attr, all_reduce_sum(value))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process (itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    moved = tensor.cuda() if torch.distributed.get_backend() == "nccl" else tensor
    torch.distributed.all_reduce(moved)
    return moved.to(tensor.device)
