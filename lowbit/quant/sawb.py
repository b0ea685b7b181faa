"""SAWB: statistics-aware weight binning (Choi et al., "Accurate and Efficient 2-bit Quantized
Neural Networks", MLSys 2019; arXiv:1807.06964).

The clip comes in closed form from the first two *uncentred* absolute moments:

    alpha = c1(b) * sqrt(E[w^2]) - c2(b) * E[|w|]        (alpha <= 0 falls back to max|w|)

recomputed from the current weights at every training forward (the step is not learned).
Two level sets (ALGORITHMS.md 2.2):

- ``even`` ("SAWB+", default): ``2^b`` levels ``alpha * {-1, -1 + 2/(2^b-1), ..., 1}`` with no zero;
  on lowbit's grid unsigned codes ``q in [0, 2^b - 1]`` (so the grid reports ``signed=False``; the
  values are symmetric through the zero point), ``z = (2^b - 1)/2``, ``s = 2 alpha / (2^b - 1)``;
- ``odd``: ``2^b - 1`` levels with zero, ``q in [-(2^(b-1)-1), 2^(b-1)-1]``, ``z = 0``,
  ``s = alpha / (2^(b-1) - 1)``.

Coefficients (c1, c2) are fms-model-optimizer's (verified there) where it has them; 3- and
5-bit odd come from the reproduction of the paper's regression in ALGORITHMS.md 2.3
(computed); other widths are fitted on first use by :func:`fit_coefficients`, the same
regression (MSE-optimal clip of six zero-mean distributions, least squares).
The weight gradient passes straight through by default ("SAWB+"); ``clip_grad=True`` zeroes
it where ``|w| > alpha``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from lowbit.quant.base import Quantizer
from lowbit.quant.grid import Granularity, check_bits, int_range

CONVENTIONS = ("even", "odd")
COEFFICIENTS = {
    ("even", 2): (3.12, 2.064), ("even", 3): (7.509, 6.892), ("even", 4): (12.68, 12.80),
    ("even", 5): (17.74, 18.64), ("even", 8): (31.76, 35.04),
    ("odd", 2): (2.6, 1.71), ("odd", 4): (12.035, 12.03), ("odd", 7): (28.24, 30.81), ("odd", 8): (31.76, 35.04),
    ("odd", 3): (7.05, 6.41), ("odd", 5): (16.98, 17.76),  # computed (ALGORITHMS.md 2.3), not in fms
}


def levels(bits: int, convention: str) -> np.ndarray:
    """Quantization levels for ``alpha = 1``."""
    if convention == "even":
        n = 2**bits - 1
        return -1.0 + 2.0 * np.arange(n + 1) / n
    lo, hi = int_range(bits, True, restricted=True)
    return np.arange(lo, hi + 1) / hi


@lru_cache(maxsize=None)
def fit_coefficients(bits: int, convention: str = "even", samples: int = 100_000, seed: int = 0) -> tuple[float, float]:
    """Fit ``alpha*/E|w| = c1 sqrt(E w^2)/E|w| - c2`` over six zero-mean distributions.

    For each distribution (Gaussian, Laplace, uniform, logistic, triangular, von Mises kappa=2)
    ``alpha*`` minimises the empirical quantization MSE over a grid of 600 clips in
    ``[0.2, 15] E|w|``; (c1, c2) is the least-squares line through the six points.
    """
    check_bits(bits, "SAWB fit_coefficients: ")
    rng = np.random.default_rng(seed)
    draws = [rng.standard_normal(samples), rng.laplace(size=samples), rng.uniform(-1, 1, samples),
             rng.logistic(size=samples), rng.triangular(-1, 0, 1, samples), rng.vonmises(0.0, 2.0, samples)]
    lv = torch.tensor(levels(bits, convention), dtype=torch.float64)
    xs, ys = [], []
    for w in draws:
        w = torch.from_numpy(w)
        e1, e2 = w.abs().mean().item(), w.pow(2).mean().sqrt().item()
        best, best_alpha = float("inf"), None
        for alpha in np.linspace(0.2, 15.0, 600) * e1:
            wq = _nearest(w, lv * alpha)
            err = (w - wq).pow(2).mean().item()
            if err < best:
                best, best_alpha = err, alpha
        xs.append(e2 / e1)
        ys.append(best_alpha / e1)
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(-intercept)


def _nearest(w: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    idx = torch.bucketize(w, (lv[1:] + lv[:-1]) / 2)
    return lv[idx]


def sawb_coefficients(bits: int, convention: str = "even") -> tuple[float, float]:
    check_bits(bits, "SAWB: ")  # before any table look-up or (slow) fit: 4.0 == 4 and True == 1 as dict keys
    if convention not in CONVENTIONS:
        raise ValueError(f"SAWB convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "odd" and bits < 2:
        raise ValueError("SAWB's odd level set needs at least 2 bits")
    return COEFFICIENTS.get((convention, bits)) or fit_coefficients(bits, convention)


class SAWBQuantizer(Quantizer):
    method = "sawb"
    dynamic = True

    def __init__(self, bits: int = 4, signed: bool | None = True, granularity: Granularity | None = None, *,
                 convention: str = "even", clip_grad: bool = False, role: str = "weight", **kw):
        check_bits(bits, f"{type(self).__name__}: ")
        self.convention = convention
        self.coefficients = sawb_coefficients(bits, convention)
        self.clip_grad = clip_grad
        kw.pop("restricted", None)  # set by the convention
        odd = convention == "odd"  # the even level set uses unsigned codes around a half-integer zero point
        super().__init__(bits, odd, granularity, restricted=odd, **kw)
        if role != "weight":
            raise ValueError("SAWB sets weight clips; for activations use pact, lsq, aciq, minmax or percentile")

    def _reset_stats(self):
        self._e1 = self._e2 = self._amax = None

    def _observe(self, v):
        g = self.granularity
        self._e1, self._e2 = g.reduce(v.abs(), "mean"), g.reduce(v * v, "mean")
        self._amax = g.reduce(v.abs(), "amax")

    def clip_value(self) -> torch.Tensor:
        c1, c2 = self.coefficients
        alpha = c1 * self._e2.sqrt() - c2 * self._e1
        return torch.where(alpha > 0, alpha, self._amax)  # fms's fallback for a negative clip

    def _compute(self):
        if self._e1 is None:
            raise self._nothing_observed()
        alpha = self.clip_value()
        if self.convention == "even":
            n = 2**self.bits - 1
            return 2.0 * alpha / n, torch.full_like(alpha, n / 2.0)
        return alpha / self.qmax, torch.zeros_like(alpha)

    def fake_quant(self, x):
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return self._on_grid(x, v, s, z, *self.qrange, pass_through=not self.clip_grad)

    def extra_repr(self):
        return super().extra_repr() + f", convention={self.convention}"
