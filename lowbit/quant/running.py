"""Streaming per-channel statistics: one pass over calibration batches, no activations kept.

For each step group (see :class:`~lowbit.quant.grid.Granularity`) it keeps the exact count,
mean and variance (Chan et al.'s parallel merge of per-batch moments), min and max, and, as
the ACIQ reference code does (``stats_kind='mean'``), batch-averaged statistics: the mean
absolute deviation from the batch mean (the Laplace scale ``b``), the batch std, the mean and
root mean square of the positive values (``pos_mean``, ``pos_rms``: the scales of a one-sided
tensor's tail, see :mod:`lowbit.quant.aciq`), and any requested percentiles.
"""

from __future__ import annotations

import torch

from lowbit.quant.grid import Granularity
from lowbit.quant.stats import percentile


class RunningStats:
    def __init__(self, granularity: Granularity | None = None, percentiles: tuple[float, ...] = ()):
        self.granularity = granularity or Granularity()
        self.percentiles = tuple(percentiles)
        self.batches = 0
        self.count = 0
        self._mean = self._m2 = self.min = self.max = None
        self._sums: dict[str, torch.Tensor] = {}

    def update(self, v: torch.Tensor) -> None:
        """Add one batch, given in the granularity's view (``Granularity.view(x)``)."""
        g = self.granularity
        dims = g.reduce_dims(v)
        n = 1
        for d in dims:
            n *= v.shape[d]
        v = v.double()
        mean = v.mean(dim=dims, keepdim=True)
        m2 = (v - mean).pow(2).sum(dim=dims)
        positive = v.clamp_min(0)
        n_pos = (v > 0).sum(dim=dims).clamp_min(1)
        batch = {"mad": (v - mean).abs().mean(dim=dims),
                 "std": (m2 / max(n - 1, 1)).sqrt(),
                 "pos_mean": positive.sum(dim=dims) / n_pos,
                 "pos_rms": (positive.pow(2).sum(dim=dims) / n_pos).sqrt(),
                 **{f"p{p}": percentile(v, g, p) for p in self.percentiles}}
        mean = mean.reshape(m2.shape)
        lo, hi = v.amin(dim=dims), v.amax(dim=dims)
        if self.batches == 0:
            self._mean, self._m2, self.min, self.max = mean, m2, lo, hi
            self._sums = batch
        else:
            total = self.count + n
            delta = mean - self._mean
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + m2 + delta.pow(2) * (self.count * n / total)
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
            self._sums = {k: self._sums[k] + batch[k] for k in batch}
        self.count += n
        self.batches += 1

    def _need_data(self) -> None:
        if self.batches == 0:
            raise ValueError("no batch observed yet")

    @property
    def mean(self) -> torch.Tensor:
        self._need_data()
        return self._mean.float()

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance over every element seen (exact, not batch-averaged)."""
        self._need_data()
        return (self._m2 / max(self.count - 1, 1)).float()

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def batch_mean(self, name: str) -> torch.Tensor:
        """Average over batches of ``mad``, ``std``, ``pos_mean``, ``pos_rms`` or ``p<percentile>`` (e.g. ``"p99.9"``)."""
        self._need_data()
        if name not in self._sums:
            raise KeyError(f"no batch statistic {name!r}; have {sorted(self._sums)}")
        return (self._sums[name] / self.batches).float()
