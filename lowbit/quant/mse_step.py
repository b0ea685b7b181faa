"""The step that minimises the quantization error of observed data, by grid search.

    s* = argmin_s  mean( (clamp(round(v / s), qmin, qmax) * s - v)^2 ),
    s  in { k / K * s_max : k = 1..K },   s_max = max(max(v) / qmax, min(v) / qmin)

(one step per group of the granularity; zero point 0). ``s_max`` is the min-max step, so the
search covers every clip from 1/K of the observed range to all of it. This is the
initialisation LSQ+ (Bhalgat et al., CVPR-W 2020) recommends over LSQ's ``2 mean|v| / sqrt(Q_P)``
heuristic; ``K = 100`` candidates resolve the optimum to 1 % of the range. ``max_elements``
bounds the work for one large step group (per tensor only): the search then runs on an evenly
strided subsample of that many elements, while ``s_max`` still comes from every element.
"""

from __future__ import annotations

import math

import torch

from lowbit.quant.grid import Granularity


@torch.no_grad()
def mse_optimal_step(v: torch.Tensor, granularity: Granularity, qmin: int, qmax: int,
                     candidates: int = 100, max_elements: int | None = None) -> torch.Tensor:
    """Per-group MSE-optimal step (compact shape, like ``Granularity.reduce``) of the view ``v``."""
    v = v.float()
    hi = granularity.reduce(v, "amax").clamp_min(0) / max(qmax, 1)
    lo = granularity.reduce(v, "amin").clamp_max(0) / qmin if qmin < 0 else torch.zeros_like(hi)
    s_max = torch.maximum(hi, lo).clamp_min(1e-8)
    if max_elements is not None and granularity.kind == "tensor" and v.numel() > max_elements:
        v = v.reshape(-1)[:: math.ceil(v.numel() / max_elements)]
    best_err = torch.full_like(s_max, float("inf"))
    best = s_max.clone()
    dims = granularity.reduce_dims(v)
    for k in range(1, candidates + 1):
        s = s_max * (k / candidates)
        se = granularity.expand(s, v)
        err = (torch.clamp(torch.round(v / se), qmin, qmax) * se - v).pow(2)
        err = err.mean(dim=dims) if dims else err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best
