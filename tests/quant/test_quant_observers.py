"""Observers: min-max, moving average, histogram (percentile and MSE), and weight ranges."""

from __future__ import annotations

import pytest
import torch

from slimkit.quant.numerics import activation_qparams
from slimkit.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    _rebin,
    weight_scale,
)


def test_minmax_tracks_the_extremes_of_everything_seen():
    obs = MinMaxObserver()
    assert not obs.has_data
    obs.update(torch.tensor([0.5, 2.0]))
    obs.update(torch.tensor([-1.0, 1.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 2.0)
    assert int(obs.observed) == 2


def test_moving_average_follows_batch_extremes_with_the_averaging_constant():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.update(torch.tensor([-2.0, 4.0]))  # first batch initialises
    obs.update(torch.tensor([0.0, 2.0]))
    assert float(obs.min_val) == pytest.approx(-1.0)
    assert float(obs.max_val) == pytest.approx(3.0)


def test_percentile_drops_the_requested_tail_mass():
    torch.manual_seed(0)
    x = torch.rand(100_000) * 10  # uniform on [0, 10]
    obs = HistogramObserver("percentile", percentile=98.0)
    obs.update(x[:50_000])
    obs.update(x[50_000:])
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(0.1, abs=0.03)  # 1 % below
    assert float(hi) == pytest.approx(9.9, abs=0.03)  # 1 % above


def _quantization_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    scale, zero_point = activation_qparams(torch.tensor(lo), torch.tensor(hi), symmetric=False)
    y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)
    return float(((y - x) ** 2).mean())


def test_histogram_mse_clips_heavy_tails_and_lowers_the_real_error():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))  # long tails, like many activations
    mse = HistogramObserver("histogram")
    mse.update(x)
    lo, hi = (float(v) for v in mse.range())
    assert hi - lo < 0.95 * float(x.max() - x.min()), "the MSE search should clip the tails"
    # Theory puts the 8-bit optimum of a unit Laplace near +-9.9 (Banner et al. 2019).
    assert 8.0 < hi < 11.0 and -11.0 < lo < -8.0
    assert _quantization_mse(x, lo, hi) < 0.9 * _quantization_mse(x, float(x.min()), float(x.max()))


def test_histogram_rebinning_keeps_the_mass_when_the_range_grows():
    obs = HistogramObserver("percentile", percentile=100.0, bins=64)
    obs.update(torch.linspace(0, 1, 1000))
    obs.update(torch.linspace(-3, 5, 1000))
    assert float(obs.histogram.sum()) == pytest.approx(2000.0)
    assert (float(obs.min_val), float(obs.max_val)) == (-3.0, 5.0)
    hist = torch.ones(4, dtype=torch.float64)
    assert _rebin(hist, 0.0, 1.0, 0.0, 2.0).tolist() == [2.0, 2.0, 0.0, 0.0]


def test_weight_ranges_per_channel_percentile_and_mse():
    torch.manual_seed(0)
    w = torch.randn(8, 8192)
    w[3] = torch.distributions.Laplace(0.0, 1.0).sample((8192,))  # long tails in channel 3
    w[5, 7] = 40.0  # one outlier in channel 5
    minmax = weight_scale(w, 0, True, "minmax", 99.99)
    assert minmax.shape == (8,)
    assert float(minmax[5]) == pytest.approx(40.0 / 127)
    pct = weight_scale(w, 0, True, "percentile", 99.0)
    assert float(pct[5]) < 4.0 / 127  # the 99th percentile of |N(0, 1)| is about 2.6
    mse = weight_scale(w, 0, True, "histogram", 99.99)
    assert float(mse[3]) < 0.99 * float(minmax[3])  # the MSE search clips the long tail a little
    assert torch.all(mse <= minmax + 1e-12)
    per_tensor = weight_scale(w, 0, False, "minmax", 99.99)
    assert per_tensor.dim() == 0 and float(per_tensor) == pytest.approx(40.0 / 127)
