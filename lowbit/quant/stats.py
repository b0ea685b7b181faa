"""Reductions over the elements that share one step (see :class:`~lowbit.quant.grid.Granularity`)."""

from __future__ import annotations

import torch

from lowbit.quant.grid import Granularity


def percentile(v: torch.Tensor, g: Granularity, p: float) -> torch.Tensor:
    """The ``p``-th percentile (0-100, linear interpolation as numpy's default) of each step's elements.

    Works on any size (``torch.quantile`` refuses inputs over 2^24 elements).
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {p}")
    dims = g.reduce_dims(v)
    keep = [d for d in range(v.dim()) if d not in dims]
    flat = v.permute(*keep, *dims).reshape(*[v.shape[d] for d in keep], -1)
    n = flat.shape[-1]
    pos = (n - 1) * p / 100.0
    lo, frac = int(pos), pos - int(pos)
    if n == 1:
        return flat[..., 0]
    vals = flat.topk(n - lo, dim=-1, largest=True).values if lo > n // 2 else None
    if vals is not None:  # the needed order statistics are among the largest: partial sort is cheaper
        low = vals[..., -1]
        high = vals[..., -2] if frac > 0 and vals.shape[-1] > 1 else low
    else:
        srt = flat.sort(dim=-1).values
        low, high = srt[..., lo], srt[..., min(lo + 1, n - 1)]
    return low + frac * (high - low)
