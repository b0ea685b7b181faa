"""LSQ's asymmetric option: unsigned codes with a learned integer zero point (LSQ+-style offset)."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import make_quantizer
from lowbit.quant.mse_step import mse_optimal_affine, mse_optimal_step
from lowbit.quant.grid import Granularity


def skewed(n=4000, seed=0):
    """One-sided data: exponential with mean 2, shifted down by 0.5."""
    gen = torch.Generator().manual_seed(seed)
    return -2.0 * torch.log(torch.rand(n, generator=gen)) - 0.5


def quantizer(init="mse", bits=4):
    return make_quantizer("lsq", bits=bits, role="activation", init=init, asymmetric=True)


def test_forward_is_integer_codes_times_step_around_a_zero_point():
    x = skewed()
    q = quantizer()
    q.init_from(x)
    s, z = q.get_scale().detach(), q.get_zero_point().detach()
    assert q.signed is False and z == z.round() and 0 <= z <= 15
    codes = q(x).detach() / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -1e-4 and codes.max() <= 15 + 1e-4
    assert torch.equal(q.quantize_int(x), codes.round().int())


def test_zero_point_gradient_is_minus_step_on_clipped_elements():
    x = torch.tensor([-3.0, -0.2, 0.1, 0.4, 5.0])
    q = quantizer(init="paper")
    q.init_from(torch.tensor([-0.5, 0.5]))
    x.requires_grad_(True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (q(x) * upstream).sum().backward()
    s = float(q.get_scale().detach())
    g = 1.0 / (5 * 15) ** 0.5  # LSQ's gradient scale: 5 features, Q_P = 15
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))  # straight through inside only
    assert q.zero_point.grad.item() == pytest.approx(-s * (1.0 + 5.0) * g, rel=1e-5)


def test_mse_affine_beats_the_symmetric_grid_on_one_sided_data():
    x = skewed().reshape(1, -1)
    g = Granularity()
    s, z = mse_optimal_affine(x, g, 0, 15)
    affine = ((torch.clamp(torch.round(x / s + z), 0, 15) - z) * s - x).pow(2).mean()
    s_sym = mse_optimal_step(x, g, -8, 7)
    symmetric = (torch.clamp(torch.round(x / s_sym), -8, 7) * s_sym - x).pow(2).mean()
    assert affine < 0.5 * symmetric


def test_training_moves_the_zero_point_to_a_shifted_distribution():
    q = quantizer(init="paper")
    q.init_from(torch.linspace(-1, 1, 101))
    before = float(q.get_zero_point().detach())
    opt = torch.optim.Adam([q.zero_point], lr=0.2)  # the step stays: only the zero point can follow the data
    x = torch.linspace(0.5, 2.5, 101)  # the data moved up: clipping on top
    error_before = (q(x) - x).pow(2).mean().item()
    for _ in range(60):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert float(q.get_zero_point().detach()) < before - 3  # fewer codes below zero, more above
    assert (q(x) - x).pow(2).mean().item() < 0.2 * error_before


def test_asymmetric_with_signed_is_refused():
    with pytest.raises(ValueError, match="unsigned codes and a zero point"):
        make_quantizer("lsq", bits=8, role="activation", signed=True, asymmetric=True)
