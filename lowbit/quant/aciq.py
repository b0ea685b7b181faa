"""ACIQ: analytical clipping for integer quantization (Banner, Nahshan, Soudry, NeurIPS 2019).

A tensor clipped to ``[-alpha, alpha]`` and quantized to ``M`` bits (``2^M`` bins) has
expected squared error, for a Laplace(0, b) or Gaussian(0, sigma^2) prior:

    Laplace:   MSE(a) = 2 b^2 exp(-a/b) + a^2 / (3 4^M)
    Gaussian:  MSE(a) = (a^2 + s^2) [1 - erf(a / (sqrt2 s))] - sqrt(2/pi) a s exp(-a^2 / (2 s^2)) + a^2 / (3 4^M)

(first term: clipping noise of both tails; second: rounding noise ``Delta^2/12`` with
``Delta = 2a / 2^M``). A one-sided (post-ReLU) tensor has one tail and all ``2^M`` bins on
``[0, a]``; the reference code writes its error as ``MSE(a) = clip(a)/2 + a^2 / (24 4^M)``,
whose optimum is the two-sided optimum at ``M+1`` bits (the paper's half-range rule).

:func:`optimal_clip` minimises these expressions numerically for any ``M`` (not a table
look-up); the results match the constants of the authors' code (Laplace ``a*/b`` =
1.86, 2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89 and Gaussian ``a*/sigma`` = 1.24, 1.71, 2.15,
2.55, 2.93, 3.28, 3.61, 3.92 for M = 1..8; ALGORITHMS.md 3.2).

Statistics follow the reference code: ``b = mean|x - mean(x)|``, ``sigma = std(x)``, each
averaged over calibration batches, with one exception by default. For a one-sided (post-ReLU)
tensor the reference estimate is biased low: if the pre-activation is Laplace(0, b), the
post-ReLU tensor is half zeros and ``mean|x - mean(x)|`` comes to about 0.61 b, so the clip
lands near 3.8 b instead of the 6.2 b the half-range rule asks for at 4 bits. The positive
values of a Laplace(mu <= 0, b) are exactly exponential with scale ``b`` (memorylessness), whose
maximum-likelihood scale is their mean, so ``one_sided_scale="positive"`` (the default) takes
``b = mean(x | x > 0)`` and, for the Gaussian prior, ``sigma = sqrt(mean(x^2 | x > 0))`` (the
half-normal scale); ``one_sided_scale="reference"`` keeps the reference code's estimate. This
default is lowbit's, not the paper's; on ResNet-20 / Fashion-MNIST at W4A4 it turns ACIQ from a
loss into a gain against min-max (``docs/RESULTS.md``, post-training ablation). The range is ``[o, o + 2a]`` with ``o = max(min x, mean - a)``
(asymmetric) or ``[-a, a]`` (symmetric, for weights), and ``[0, max(mean, 0) + a]`` one-sided;
a range is never widened past the observed min/max.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit.quant.base import Quantizer, affine_grid, symmetric_grid
from lowbit.quant.running import RunningStats

PRIORS = ("laplace", "gaussian")
ONE_SIDED_SCALES = ("positive", "reference")


def clip_mse(alpha: float, bits: int, prior: str, one_sided: bool = False) -> float:
    """Expected quantization MSE of a unit-scale (b = 1 or sigma = 1) prior clipped at ``alpha``."""
    if prior == "laplace":
        clip = 2.0 * math.exp(-alpha)
    elif prior == "gaussian":
        clip = ((alpha**2 + 1.0) * math.erfc(alpha / math.sqrt(2.0))
                - math.sqrt(2.0 / math.pi) * alpha * math.exp(-alpha**2 / 2.0))
    else:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if one_sided:
        return clip / 2.0 + alpha**2 / (24.0 * 4.0**bits)
    return clip + alpha**2 / (3.0 * 4.0**bits)


@lru_cache(maxsize=None)
def optimal_clip(bits: int, prior: str = "laplace", one_sided: bool = False) -> float:
    """``alpha* / b`` (Laplace) or ``alpha* / sigma`` (Gaussian) minimising :func:`clip_mse`.

    A coarse scan brackets the minimum (the expressions are unimodal in alpha), then golden-
    section search refines it to 1e-9.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must lie in 1..16, got {bits}")
    f = lambda a: clip_mse(a, bits, prior, one_sided)  # noqa: E731
    grid = [0.05 * i for i in range(1, 801)]  # up to 40 scale units
    i = min(range(len(grid)), key=lambda k: f(grid[k]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    while hi - lo > 1e-9:
        a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2.0


class ACIQQuantizer(Quantizer):
    """ACIQ clipping; ``prior="auto"`` picks, per tensor, whichever of the Laplace clip, the Gaussian
    clip or the plain min-max range gives the lowest MSE on a bounded sample of the calibration
    data (the reference code's per-tensor selection; the sample holds at most ``sample_size``
    rows of the step view, drawn with a fixed seed)."""

    method = "aciq"
    dynamic = True
    supports_bit_allocation = True

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, prior: str = "laplace",
                 symmetric: bool | None = None, role: str = "activation", sample_size: int = 4096,
                 one_sided_scale: str = "positive", **kw):
        if prior not in PRIORS + ("auto",):
            raise ValueError(f"ACIQ prior must be one of {PRIORS + ('auto',)}, got {prior!r}")
        if one_sided_scale not in ONE_SIDED_SCALES:
            raise ValueError(f"one_sided_scale must be one of {ONE_SIDED_SCALES}, got {one_sided_scale!r}")
        self.prior, self.sample_size, self.one_sided_scale = prior, sample_size, one_sided_scale
        self.chosen_prior = None if prior == "auto" else prior
        self.symmetric = (role == "weight") if symmetric is None else symmetric
        super().__init__(bits, signed, granularity, **kw)
        self.dynamic = role == "weight"

    def _reset_stats(self):
        self._stats, self._sample = RunningStats(self.granularity), None

    def _observe(self, v):
        self._stats.update(v)
        if self.prior == "auto":
            self._keep_sample(v)

    def _keep_sample(self, v: torch.Tensor) -> None:
        """Keep up to ``sample_size`` rows (positions across every step group) for the MSE comparison."""
        g = self.granularity
        keep = [d for d in range(v.dim()) if d not in g.reduce_dims(v)]
        rows = v.permute(*g.reduce_dims(v), *keep).reshape(-1, *[v.shape[d] for d in keep])
        gen = torch.Generator().manual_seed(self._stats.batches)
        take = torch.randperm(rows.shape[0], generator=gen)[: self.sample_size]
        rows = rows[take]
        self._sample = rows if self._sample is None else torch.cat([self._sample, rows])[-4 * self.sample_size:]

    def _allocation_spread(self, stats):
        return self._spread(stats, "laplace") if self.prior == "laplace" else stats.std

    def _spread(self, stats: RunningStats, prior: str) -> torch.Tensor:
        """The prior's scale: ``b`` (Laplace) or ``sigma`` (Gaussian), batch-averaged (module docstring)."""
        if not self.signed and self.one_sided_scale == "positive":
            return stats.batch_mean("pos_mean" if prior == "laplace" else "pos_rms")
        return stats.batch_mean("mad" if prior == "laplace" else "std")

    def _multiplier(self, prior: str) -> torch.Tensor | float:
        """``alpha*/b`` or ``alpha*/sigma`` at this quantizer's width(s); per channel after bit allocation."""
        one_sided = not self.signed
        if not self.channel_bits.numel():
            return optimal_clip(self.bits, prior, one_sided)
        table = {int(b): optimal_clip(int(b), prior, one_sided) if b > 0 else 0.0
                 for b in self.channel_bits.unique().tolist()}
        return torch.tensor([table[int(b)] for b in self.channel_bits.tolist()])

    def clip_value(self, prior: str | None = None) -> torch.Tensor:
        """``alpha = alpha*(M) * b`` (or ``* sigma``) from the batch-averaged statistics."""
        prior = prior or self.chosen_prior or "laplace"
        return self._multiplier(prior) * self._spread(self._stats, prior)

    def _grid_for(self, prior: str | None):
        st = self._stats
        lo, hi = st.min.float(), st.max.float()
        if prior is None:  # plain min-max, a candidate of the auto mode
            alpha = torch.full_like(hi, float("inf"))
        else:
            alpha = self.clip_value(prior)
        mean = st.mean
        if not self.signed:
            top = torch.minimum(mean.clamp_min(0) + alpha, hi)
            return symmetric_grid(top.clamp_min(0), self.qmin, self.qmax)
        if self.symmetric:
            return symmetric_grid(torch.minimum(alpha, torch.maximum(lo.abs(), hi.abs())), self.qmin, self.qmax)
        low = torch.maximum(lo, mean - alpha)
        return affine_grid(low, torch.minimum(low + 2 * alpha, hi), self.qmin, self.qmax)

    def _compute(self):
        if not self._stats.batches:
            raise self._nothing_observed()
        if self.prior != "auto":
            return self._grid_for(self.prior)
        errors = {}
        for candidate in PRIORS + (None,):
            scale, zero = self._grid_for(candidate)
            errors[candidate] = self._sample_mse(scale.clamp_min(1e-8), zero)
        self.chosen_prior = min(errors, key=errors.get) or "minmax"
        return self._grid_for(None if self.chosen_prior == "minmax" else self.chosen_prior)

    def _sample_mse(self, scale: torch.Tensor, zero: torch.Tensor) -> float:
        qmin, qmax = self.qrange
        x = self._sample
        q = torch.clamp(torch.round(x / scale + zero), qmin, qmax)
        return float(((q - zero) * scale - x).pow(2).mean())

    def extra_repr(self):
        return super().extra_repr() + f", prior={self.prior}, one_sided_scale={self.one_sided_scale}" + (
            f" ({self.chosen_prior})" if self.prior == "auto" and self.chosen_prior else "")
