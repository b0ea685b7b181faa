"""Min-max and percentile quantizers: the baselines every method is compared against.

Min-max: the grid spans the observed range, ``[min, max]`` over all calibration batches.
Symmetric (default, ``z = 0``): ``s = max(|min|, |max|) / qmax``; unsigned data:
``s = max / qmax``; asymmetric: ``s = (max - min) / (qmax - qmin)``, ``z = round(qmin - min / s)``.

Per token (``granularity: token``, activations): the range is each token's own min and max, taken from
every input as it arrives, in training and in inference (dynamic per-token quantization, as ZeroQuant,
Yao et al., NeurIPS 2022, quantizes a transformer's activations); calibration only settles the sign.

Percentile: the same with the range clipped at the ``p``-th percentile of ``|x|`` (signed) or
``x`` (unsigned) of each batch, averaged over batches (a common calibration baseline,
e.g. TensorRT's and fms-model-optimizer's percentile calibrators).
"""

from __future__ import annotations

import torch

from lowbit.quant.base import Quantizer, affine_grid, symmetric_grid
from lowbit.quant.stats import percentile


def minmax_grid(lo: torch.Tensor, hi: torch.Tensor, signed: bool, symmetric: bool, qmin: int, qmax: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of the grid spanning ``[lo, hi]`` (module docstring's three cases)."""
    if not signed:
        return symmetric_grid(hi.clamp_min(0), qmin, qmax)
    if symmetric:
        return symmetric_grid(torch.maximum(lo.abs(), hi.abs()), qmin, qmax)
    return affine_grid(lo, hi, qmin, qmax)


class MinMaxQuantizer(Quantizer):
    method = "minmax"
    dynamic = True
    supports_bit_allocation = True
    supports_token = True

    def __init__(self, bits: int = 8, signed: bool | None = None, granularity=None, *, symmetric: bool = True,
                 role: str = "activation", **kw):
        self.symmetric = symmetric
        super().__init__(bits, signed, granularity, **kw)
        self.dynamic = role == "weight"

    def _reset_stats(self):
        self._lo = self._hi = None

    def _observe(self, v):
        lo, hi = self.granularity.reduce(v, "amin"), self.granularity.reduce(v, "amax")
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lo is None:
            raise self._nothing_observed()
        return self._lo, self._hi

    def _compute(self):
        lo, hi = self._range()
        return minmax_grid(lo, hi, bool(self.signed), self.symmetric, self.qmin, self.qmax)

    def token_grid(self, lo, hi):
        return minmax_grid(lo, hi, bool(self.signed), self.symmetric, self.qmin, self.qmax)


class PercentileQuantizer(MinMaxQuantizer):
    method = "percentile"
    supports_token = False

    def __init__(self, bits: int = 8, signed: bool | None = None, granularity=None, *, percentile: float = 99.99,
                 **kw):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(bits, signed, granularity, **kw)

    def _reset_stats(self):
        super()._reset_stats()
        self._sum_lo = self._sum_hi = None
        self._batches = 0

    def _observe(self, v):
        g, p = self.granularity, self.percentile
        if self.signed and self.symmetric:
            hi = percentile(v.abs(), g, p)
            lo = -hi
        else:
            hi, lo = percentile(v, g, p), percentile(v, g, 100.0 - p)
        self._sum_lo = lo if self._sum_lo is None else self._sum_lo + lo
        self._sum_hi = hi if self._sum_hi is None else self._sum_hi + hi
        self._batches += 1

    def _range(self):
        if not self._batches:
            raise self._nothing_observed()
        return self._sum_lo / self._batches, self._sum_hi / self._batches
