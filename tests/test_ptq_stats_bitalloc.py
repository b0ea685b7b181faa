"""Streaming calibration statistics against numpy, and per-channel bit allocation."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.quant.bitalloc import allocate_bits, allocate_bits_exact, noise_power
from lowbit.quant.grid import Granularity
from lowbit.quant.running import RunningStats


def batches(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    return [torch.randn(8 + i, 3, 4, 4, generator=g) * scale + torch.tensor([0.0, 1.0, -2.0]).view(1, 3, 1, 1)
            for i in range(n)]


def test_running_stats_match_numpy_exactly_and_per_batch():
    data = batches()
    stats = RunningStats(Granularity("channel", axis=1), percentiles=(90.0, 99.0))
    for b in data:
        stats.update(b)
    flat = torch.cat(data).transpose(0, 1).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(stats.mean.numpy(), flat.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std.numpy(), flat.std(1, ddof=1), rtol=1e-5)
    np.testing.assert_array_equal(stats.min.float().numpy(), flat.min(1).astype(np.float32))
    np.testing.assert_array_equal(stats.max.float().numpy(), flat.max(1).astype(np.float32))
    per_batch = [b.transpose(0, 1).reshape(3, -1).double().numpy() for b in data]
    mad = np.mean([np.abs(x - x.mean(1, keepdims=True)).mean(1) for x in per_batch], axis=0)
    p99 = np.mean([np.percentile(x, 99.0, axis=1) for x in per_batch], axis=0)
    np.testing.assert_allclose(stats.batch_mean("mad").numpy(), mad, rtol=1e-5)
    np.testing.assert_allclose(stats.batch_mean("p99.0").numpy(), p99, rtol=1e-5)
    assert stats.batches == 5 and stats.count == sum(b.numel() // 3 for b in data)
    with pytest.raises(KeyError, match="p50"):
        stats.batch_mean("p50")


def test_bit_allocation_meets_budget_and_favours_wide_channels():
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(256, generator=g) * 4 + 0.01
    for mean in (2, 3, 4):
        bits = allocate_bits(alpha, mean)
        assert abs(bits.float().mean().item() - mean) <= 0.05
        assert bits.min() >= 0 and bits.max() <= 8
        order = alpha.argsort()
        assert bits[order[-10:]].float().mean() > bits[order[:10]].float().mean()  # Eq. 10: B ~ alpha^(2/3)
        uniform = torch.full_like(bits, mean)
        assert noise_power(alpha, bits) < noise_power(alpha, uniform)


def test_closed_form_is_eq_11_when_no_correction_is_needed():
    alpha = torch.tensor([1.0, 8.0])  # alpha^(2/3) = 1, 4 -> shares 0.2, 0.8; B = 2 * 2^4 = 32
    bits = allocate_bits(alpha, 4)
    expected = torch.round(torch.log2(torch.tensor([0.2, 0.8]) * 32)).long()  # [3, 5]: mean 4 exactly
    assert torch.equal(bits, expected)


@pytest.mark.parametrize("seed", range(4))
def test_exact_allocation_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(4, generator=g) * 5
    best = min((bs for bs in itertools.product(range(9), repeat=4) if sum(bs) == 12),
               key=lambda bs: noise_power(alpha, torch.tensor(bs)).item())
    exact = allocate_bits_exact(alpha, 3)
    assert exact.sum().item() == 12
    assert noise_power(alpha, exact).item() == pytest.approx(noise_power(alpha, torch.tensor(best)).item())
    closed = allocate_bits(alpha, 3)
    assert noise_power(alpha, closed) >= noise_power(alpha, exact) - 1e-12


def test_unachievable_budget_is_a_clear_error():
    for mean in (-1, 9, 8.5):
        with pytest.raises(RecipeError, match="not achievable"):
            allocate_bits(torch.ones(4), mean)
        with pytest.raises(RecipeError, match="not achievable"):
            allocate_bits_exact(torch.ones(4), mean)


def test_constant_channels_get_the_nominal_width():
    assert torch.equal(allocate_bits(torch.zeros(3), 4), torch.full((3,), 4))
