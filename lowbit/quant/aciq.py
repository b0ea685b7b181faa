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
averaged over calibration batches; the range is ``[o, o + 2a]`` with ``o = max(min x, mean - a)``
(asymmetric) or ``[-a, a]`` (symmetric, for weights), and ``[0, max(mean, 0) + a]`` one-sided;
a range is never widened past the observed min/max.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit.quant.base import Quantizer, affine_grid, symmetric_grid
from lowbit.quant.stats import moments

PRIORS = ("laplace", "gaussian")


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
    method = "aciq"
    dynamic = True

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, prior: str = "laplace",
                 symmetric: bool | None = None, role: str = "activation", **kw):
        if prior not in PRIORS:
            raise ValueError(f"ACIQ prior must be one of {PRIORS}, got {prior!r}")
        self.prior = prior
        self.symmetric = (role == "weight") if symmetric is None else symmetric
        super().__init__(bits, signed, granularity, **kw)
        self.dynamic = role == "weight"

    def _reset_stats(self):
        self._sums, self._lo, self._hi, self._batches = None, None, None, 0

    def _observe(self, v):
        m = moments(v, self.granularity)
        spread = m["mad"] if self.prior == "laplace" else m["std"]
        stats = torch.stack([m["mean"], spread])
        self._sums = stats if self._sums is None else self._sums + stats
        self._lo = m["min"] if self._lo is None else torch.minimum(self._lo, m["min"])
        self._hi = m["max"] if self._hi is None else torch.maximum(self._hi, m["max"])
        self._batches += 1

    def clip_value(self) -> torch.Tensor:
        """``alpha = alpha*(M) * b`` (or ``* sigma``) from the batch-averaged statistics."""
        mean, spread = self._sums / self._batches
        return optimal_clip(self.bits, self.prior, one_sided=not self.signed) * spread

    def _compute(self):
        if not self._batches:
            from lowbit.errors import CalibrationError
            raise CalibrationError(f"{self._where()}finalize() before any data was observed")
        mean = self._sums[0] / self._batches
        alpha = self.clip_value()
        if not self.signed:
            hi = torch.minimum(mean.clamp_min(0) + alpha, self._hi)
            return symmetric_grid(hi.clamp_min(0), self.qmin, self.qmax)
        if self.symmetric:
            return symmetric_grid(torch.minimum(alpha, torch.maximum(self._lo.abs(), self._hi.abs())),
                                  self.qmin, self.qmax)
        lo = torch.maximum(self._lo, mean - alpha)
        return affine_grid(lo, torch.minimum(lo + 2 * alpha, self._hi), self.qmin, self.qmax)
