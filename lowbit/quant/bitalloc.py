"""Per-channel bit allocation (Banner, Nahshan, Soudry, NeurIPS 2019, Eqs. 10-11).

Minimising the total rounding noise ``sum_i alpha_i^2 / (3 B_i^2)`` of ``C`` channels under a
fixed total number of bins ``sum_i B_i = B = C 2^M`` gives (Lagrange multipliers)

    B_i = alpha_i^(2/3) / sum_j alpha_j^(2/3) * B                        (Eq. 10)
    M_i = round(log2(alpha_i^(2/3) / sum_j alpha_j^(2/3) * B))            (Eq. 11)

with ``alpha_i`` the channel's range statistic (its std for weights; std or Laplace ``b`` for
activations). Bits are clamped to ``[min_bits, max_bits]`` (the paper: [0, 8]). Rounding and
clamping move the mean away from ``M``; as in the reference code (``get_bits_alloc_fixed_target``)
the target is nudged by half the error, ``M' += (M - mean(M_i)) / 2``, for up to 10 rounds until
the mean is within 0.01. Note Eq. 10 sets the number of *bins* proportional to ``alpha^(2/3)``,
so the step ``2 alpha / B_i`` goes as ``alpha^(1/3)``.

:func:`allocate_bits_exact` (lowbit's addition, not in the paper) solves the integer problem
exactly: minimise the same noise with the *bits* summing to ``round(C M)``. The noise is a
separable convex function of each ``M_i``, so adding one bit at a time to the channel whose
noise falls most (marginal allocation, Fox 1966) reaches the integer optimum.
"""

from __future__ import annotations

import heapq

import torch

from lowbit.errors import RecipeError


def _check_budget(mean_bits: float, min_bits: int, max_bits: int) -> None:
    if not min_bits <= mean_bits <= max_bits:
        raise RecipeError(f"an average of {mean_bits} bits per channel is not achievable with channel widths "
                          f"in [{min_bits}, {max_bits}]; choose an average in that range")


def allocate_bits(alpha: torch.Tensor, mean_bits: float, *, min_bits: int = 0, max_bits: int = 8,
                  rounding: str = "round", iterations: int = 10, tolerance: float = 0.01) -> torch.Tensor:
    """Eq. 11 with the fixed-target correction: int64 bits shaped like ``alpha``, mean close to ``mean_bits``."""
    _check_budget(mean_bits, min_bits, max_bits)
    if rounding not in ("round", "ceil"):
        raise ValueError(f"rounding must be 'round' or 'ceil', got {rounding!r}")
    alpha = alpha.detach().double().clamp_min(0).flatten()
    weight = alpha.pow(2.0 / 3.0)
    if weight.sum() <= 0:  # every channel constant: nothing to allocate, give all the nominal width
        return torch.full_like(alpha, round(mean_bits), dtype=torch.int64)
    share = weight / weight.sum()
    target = float(mean_bits)
    best = None
    for _ in range(iterations):
        with torch.no_grad():
            raw = torch.log2(share * alpha.numel() * 2.0**target)
        bits = (torch.ceil(raw) if rounding == "ceil" else torch.round(raw)).clamp(min_bits, max_bits)
        error = mean_bits - bits.mean().item()
        if best is None or abs(error) < abs(best[1]):
            best = (bits, error)
        if abs(error) < tolerance:
            break
        target += error / 2.0
    return best[0].to(torch.int64).reshape(alpha.shape)


def noise_power(alpha: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The objective of Eq. 10: ``sum_i alpha_i^2 / (3 * 4^M_i)`` (bins ``B_i = 2^M_i``)."""
    return (alpha.double().pow(2) / (3.0 * 4.0 ** bits.double())).sum()


def allocate_bits_exact(alpha: torch.Tensor, mean_bits: float, *, min_bits: int = 0,
                        max_bits: int = 8) -> torch.Tensor:
    """Integer bits minimising :func:`noise_power` with ``sum(bits) == round(C * mean_bits)`` exactly."""
    _check_budget(mean_bits, min_bits, max_bits)
    flat = alpha.detach().double().clamp_min(0).flatten()
    bits = [min_bits] * flat.numel()
    power = flat.pow(2).tolist()
    gain = lambda i: power[i] / (3.0 * 4.0 ** bits[i]) * 0.75  # noqa: E731 - noise drop of one more bit
    heap = [(-gain(i), i) for i in range(len(bits)) if bits[i] < max_bits]
    heapq.heapify(heap)
    for _ in range(round(flat.numel() * mean_bits) - min_bits * flat.numel()):
        _, i = heapq.heappop(heap)
        bits[i] += 1
        if bits[i] < max_bits:
            heapq.heappush(heap, (-gain(i), i))
    return torch.tensor(bits, dtype=torch.int64).reshape(alpha.shape)
