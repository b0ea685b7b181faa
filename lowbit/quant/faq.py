"""FAQ: fixed power-of-two steps set from statistics, then fine-tuned weights (McKinstry et al., arXiv:1809.04191).

Rule (FAQ poster, IBM 2019, verified for 4 bits; ``pow2ceil(x) = 2^ceil(log2 x)``):

- weights:      ``s_w = pow2ceil(c_b * sigma_w / 2^(b-1))`` with ``sigma_w`` the std of the layer's
  weights; at 4 bits ``c_4 = 4.12`` (``pow2ceil(4.12 sigma / 8)``);
- activations:  ``s_a = pow2ceil(y_max / 2^b)`` (unsigned; ``2^(b-1)`` and ``max|y|`` when signed),
  ``y_max`` the maximum over the first 5 calibration batches of the 99.9th percentile.

The steps are frozen during fine-tuning; values outside the range are clipped.

Other bit widths (derived, not from the paper): the poster gives only 4-bit constants, so
``c_b = 4.12 * a*(b) / a*(4)`` where ``a*(b)`` is the MSE-optimal clip of a Laplace
distribution at ``b`` bits (ACIQ's rule, :func:`lowbit.quant.aciq.optimal_clip`): the weight
range keeps the same ratio to the MSE-optimal clip as the published 4-bit rule
(``c_2 = 2.32``, ``c_8 = 8.10``). Pass ``sigma_multiple`` to override.
"""

from __future__ import annotations

import torch

from lowbit.quant.aciq import optimal_clip
from lowbit.quant.base import Quantizer
from lowbit.quant.grid import pow2ceil
from lowbit.quant.stats import percentile

C4 = 4.12  # (verified: FAQ poster)


def faq_sigma_multiple(bits: int) -> float:
    """``c_b``: 4.12 at 4 bits (published), scaled by the Laplace MSE-optimal clip elsewhere (derived)."""
    return C4 * optimal_clip(bits, "laplace") / optimal_clip(4, "laplace")


class FAQQuantizer(Quantizer):
    method = "faq"
    dynamic = False

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, role: str = "activation",
                 sigma_multiple: float | None = None, percentile: float = 99.9, calib_batches: int = 5, **kw):
        self.role, self.pct, self.calib_batches = role, percentile, calib_batches
        self.sigma_multiple = sigma_multiple if sigma_multiple is not None else faq_sigma_multiple(bits)
        super().__init__(bits, signed, granularity, **kw)

    def _reset_stats(self):
        self._stat, self._batches = None, 0

    def _observe(self, v):
        if self.role == "weight":
            stat = v.std(dim=self.granularity.reduce_dims(v))  # sigma of the layer (or channel)
        elif self._batches >= self.calib_batches:
            return
        else:
            stat = percentile(v.abs() if self.signed else v, self.granularity, self.pct)
        self._stat = stat if self._stat is None else torch.maximum(self._stat, stat)
        self._batches += 1

    def _compute(self):
        if self._stat is None:
            raise self._nothing_observed()
        half = 2 ** (self.bits - 1)
        if self.role == "weight":
            target = self.sigma_multiple * self._stat / half
        else:
            target = self._stat / (half if self.signed else 2 ** self.bits)
        scale = pow2ceil(target.clamp_min(2.0 ** -24))
        return scale, torch.zeros_like(scale)
