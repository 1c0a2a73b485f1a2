"""Range estimation: activation observers (stateful) and weight ranges (computed from the weight).

Activation observers keep 0-dim buffers (plus a histogram for the histogram / percentile
kinds), so their state is part of ``model.state_dict()``: Trainer checkpoints and
``resume_from_checkpoint`` restore it. Each observer reports a ``(min, max)`` range;
:func:`slimkit.quant.numerics.activation_qparams` turns it into a scale and zero-point.

* ``minmax``: the running minimum and maximum of everything seen.
* ``moving_average_minmax``: exponential moving averages of each batch's min and max.
* ``percentile``: a histogram of everything seen; the range keeps the central
  ``percentile`` percent of the mass (e.g. 99.99 drops 0.005 % on each side).
* ``histogram``: the same histogram; the range minimises the expected squared quantization
  error (rounding noise inside the range plus clipping error outside), searched over clipping
  points on both tails.

Weights are observed whole every step, so their ranges are computed from the weight itself
(no state): per output channel absolute maximum, percentile of ``|w|``, or the clipping
threshold that minimises the squared error.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .numerics import WEIGHT_QMAX, weight_scale_from_amax

HISTOGRAM_BINS = 2048
# Tail fractions tried by the MSE search of the histogram observer (on each side): 0 and a
# log-spaced grid from 1e-7 to 5e-2 (every pair is evaluated: 625 candidate ranges).
_TAIL_FRACTIONS = (0.0, *torch.logspace(-7, torch.log10(torch.tensor(5e-2)).item(), 24).tolist())


logger = logging.getLogger("slimkit")


class RangeObserver(nn.Module):
    """Base of activation observers: ``update(x)`` and ``range() -> (min, max)``.

    A batch holding NaN or inf is ignored: it is counted in ``nonfinite_batches`` (a buffer, so
    checkpoints keep the count), logged, and leaves the range as it was, so one bad batch can
    never make a range (and every later output) NaN. Ignoring rather than raising keeps a long
    training run alive through a rare bad batch; the count shows up in the Trainer's logs as
    ``quant/nonfinite_batches``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.long))

    @property
    def has_data(self) -> bool:
        return bool(self.observed > 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        # checkpoints written before the count existed load with a count of 0
        state_dict.setdefault(prefix + "nonfinite_batches", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def _finite_extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This batch's (min, max), or None (counted and logged) when it holds NaN / inf."""
        lo, hi = torch.aminmax(x.detach().float())
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return lo, hi
        self.nonfinite_batches += 1
        count = int(self.nonfinite_batches)
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time: visible, not a flood
            logger.warning(
                "quant: an activation observer ignored a batch holding NaN / inf (%d such batch(es) so far); "
                "its range is unchanged",
                count,
            )
        return None

    def update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used as a layer
        self.update(x)
        return x


class MinMaxObserver(RangeObserver):
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        extremes = self._finite_extremes(x)
        if extremes is None:
            return
        lo, hi = extremes
        if self.has_data:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.observed += 1


class MovingAverageMinMaxObserver(RangeObserver):
    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.averaging_constant = averaging_constant

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        extremes = self._finite_extremes(x)
        if extremes is None:
            return
        lo, hi = extremes
        if self.has_data:
            c = self.averaging_constant
            lo = self.min_val + c * (lo - self.min_val)
            hi = self.max_val + c * (hi - self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.observed += 1


def _rebin(hist: torch.Tensor, old_lo: float, old_hi: float, new_lo: float, new_hi: float) -> torch.Tensor:
    """Spread the counts of ``hist`` over [old_lo, old_hi] onto the same number of bins over
    the wider [new_lo, new_hi], assuming counts are uniform within a bin."""
    bins = hist.numel()
    if old_hi <= old_lo:  # all mass at one point
        out = torch.zeros_like(hist)
        index = int((old_lo - new_lo) / max(new_hi - new_lo, 1e-30) * bins)
        out[min(max(index, 0), bins - 1)] = hist.sum()
        return out
    cdf = torch.cat([hist.new_zeros(1), torch.cumsum(hist, 0)])
    edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=hist.device)
    pos = ((edges - old_lo) / (old_hi - old_lo) * bins).clamp(0, bins)
    index = pos.floor().long().clamp(max=bins - 1)
    at_edges = cdf[index] + (pos - index) * hist[index]
    return torch.diff(at_edges).clamp_min(0)


class HistogramObserver(RangeObserver):
    """A histogram over the observed range; the range is chosen by percentile or by MSE."""

    def __init__(self, method: str = "histogram", percentile: float = 99.99, bins: int = HISTOGRAM_BINS):
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        extremes = self._finite_extremes(x)
        if extremes is None:
            return
        lo, hi = (float(v) for v in extremes)
        bins = self.histogram.numel()
        if self.has_data:
            old_lo, old_hi = float(self.min_val), float(self.max_val)
            new_lo, new_hi = min(lo, old_lo), max(hi, old_hi)
            if (new_lo, new_hi) != (old_lo, old_hi):
                self.histogram.copy_(_rebin(self.histogram, old_lo, old_hi, new_lo, new_hi))
            lo, hi = new_lo, new_hi
        if hi <= lo:
            hi = lo + 1e-12
        self.histogram += torch.histc(x, bins=bins, min=lo, max=hi).double()
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        self.observed += 1

    def _edges(self) -> torch.Tensor:
        bins = self.histogram.numel()
        return torch.linspace(
            float(self.min_val),
            float(self.max_val),
            bins + 1,
            dtype=torch.float64,
            device=self.histogram.device,
        )

    def _quantile(self, fraction: torch.Tensor) -> torch.Tensor:
        """Values below which ``fraction`` of the mass lies (linear within a bin)."""
        hist = self.histogram
        cdf = torch.cumsum(hist, 0) / hist.sum().clamp_min(1e-30)
        edges = self._edges()
        index = torch.searchsorted(cdf, fraction.clamp(0, 1)).clamp(max=hist.numel() - 1)
        below = torch.where(index > 0, cdf[index - 1], torch.zeros_like(fraction))
        within = ((fraction - below) / (cdf[index] - below).clamp_min(1e-30)).clamp(0, 1)
        return edges[index] + within * (edges[index + 1] - edges[index])

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_data:
            return self.min_val, self.max_val
        if self.method == "percentile":
            tail = (100.0 - self.percentile) / 200.0
            lo, hi = self._quantile(torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
        else:
            lo, hi = self._mse_range()
        return lo.float().reshape(()), hi.float().reshape(())

    def _mse_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) among tail-clipping candidates with the least expected squared error:
        rounding noise ``step^2 / 12`` for the mass inside plus the squared distance to the
        clipping point for the mass outside (prefix sums make each candidate O(1))."""
        tails = torch.tensor(_TAIL_FRACTIONS, dtype=torch.float64)
        los = torch.clamp(self._quantile(tails), max=0.0)  # the range always holds 0
        his = torch.clamp(self._quantile(1.0 - tails), min=0.0)
        lo, hi = (t.reshape(-1) for t in torch.meshgrid(los, his, indexing="ij"))
        edges = self._edges()
        centers = (edges[:-1] + edges[1:]) / 2
        hist = self.histogram
        zero = hist.new_zeros(1)
        count = torch.cat([zero, torch.cumsum(hist, 0)])  # prefix sums over bins [0, i)
        first = torch.cat([zero, torch.cumsum(hist * centers, 0)])
        second = torch.cat([zero, torch.cumsum(hist * centers**2, 0)])
        below = torch.searchsorted(centers, lo)  # bins whose center lies below lo
        above = torch.searchsorted(centers, hi, right=True)  # bins from here on lie above hi
        n_lo, s1_lo, s2_lo = count[below], first[below], second[below]
        n_hi, s1_hi, s2_hi = count[-1] - count[above], first[-1] - first[above], second[-1] - second[above]
        clip = (lo**2 * n_lo - 2 * lo * s1_lo + s2_lo) + (hi**2 * n_hi - 2 * hi * s1_hi + s2_hi)
        inside = count[-1] - n_lo - n_hi
        step = ((hi - lo) / 255.0).clamp_min(1e-30)
        best = int(torch.argmin(clip + inside * step**2 / 12.0))
        return lo[best], hi[best]


def make_observer(kind: str, percentile: float, averaging_constant: float) -> RangeObserver:
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "moving_average_minmax":
        return MovingAverageMinMaxObserver(averaging_constant)
    return HistogramObserver(kind, percentile)


# ----------------------------------------------------------------------------------------
# weights: ranges computed from the weight itself
# ----------------------------------------------------------------------------------------

_WEIGHT_MSE_RATIOS = torch.linspace(0.5, 1.0, 26)


def _rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """|w| as [channels, everything else] for per-channel statistics along ``axis``."""
    return weight.detach().float().abs().movedim(axis, 0).reshape(weight.shape[axis], -1)


def weight_scale(
    weight: torch.Tensor, axis: int, per_channel: bool, observer: str, percentile: float, qmax: int = WEIGHT_QMAX
):
    """Symmetric weight scale(s) for levels ``[-qmax, qmax]``: shape [channels] per channel,
    0-dim per tensor."""
    rows = _rows(weight, axis)
    if not per_channel:
        rows = rows.reshape(1, -1)
    if observer == "percentile":
        k = max(1, min(rows.shape[1], round(rows.shape[1] * percentile / 100.0)))
        amax = rows.kthvalue(k, dim=1).values
    elif observer == "histogram":
        amax = _mse_weight_amax(rows, qmax)
    else:
        amax = rows.amax(dim=1)
    scale = weight_scale_from_amax(amax, qmax)
    return scale if per_channel else scale.reshape(())


def _mse_weight_amax(rows: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Per row, the clipping threshold (a fraction of the max) with the least squared error."""
    amax = rows.amax(dim=1, keepdim=True)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for ratio in _WEIGHT_MSE_RATIOS.tolist():
        clip = amax * ratio
        scale = (clip / qmax).clamp_min(1e-12)
        q = torch.clamp(torch.round(rows / scale), 0, qmax) * scale
        err = ((q - rows) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best.reshape(-1)
