"""The step that minimises the quantization error of observed data, by grid search.

    s* = argmin_s  mean( (clamp(round(v / s), qmin, qmax) * s - v)^2 ),
    s  in { k / K * s_max : k = 1..K },   s_max = max(max(v) / qmax, min(v) / qmin)

(one step per group of the granularity; zero point 0). ``s_max`` is the min-max step, so the
search covers every clip from 1/K of the observed range to all of it. This is the
initialisation LSQ+ (Bhalgat et al., CVPR-W 2020) recommends over LSQ's ``2 mean|v| / sqrt(Q_P)``
heuristic; ``K = 100`` candidates resolve the optimum to 1 % of the range. ``max_elements``
bounds the work for one large step group (per tensor only): the search then runs on an evenly
strided subsample of that many elements, while ``s_max`` still comes from every element.

:func:`mse_optimal_affine` does the same for an asymmetric grid ``[qmin, qmax]`` with a zero point:
the clip range ``[lo, hi]`` (widened to hold 0) shrinks about its middle ``c``,

    [c - (c - lo) k/K, c + (hi - c) k/K],  s = (hi - lo) (k/K) / (qmax - qmin),  z = round(qmin - lo_k / s)

and the ``k`` of least squared error wins.
"""

from __future__ import annotations

import math

import torch

from lowbit.quant.grid import Granularity


@torch.no_grad()
def minmax_step(v: torch.Tensor, granularity: Granularity, qmin: int, qmax: int) -> torch.Tensor:
    """Per-group step that holds every observed value: ``s_max = max(max(v) / qmax, min(v) / qmin)``."""
    v = v.float()
    hi = granularity.reduce(v, "amax").clamp_min(0) / max(qmax, 1)
    lo = granularity.reduce(v, "amin").clamp_max(0) / qmin if qmin < 0 else torch.zeros_like(hi)
    return torch.maximum(hi, lo).clamp_min(1e-8)


@torch.no_grad()
def mse_optimal_step(v: torch.Tensor, granularity: Granularity, qmin: int, qmax: int,
                     candidates: int = 100, max_elements: int | None = None) -> torch.Tensor:
    """Per-group MSE-optimal step (compact shape, like ``Granularity.reduce``) of the view ``v``."""
    v = v.float()
    s_max = minmax_step(v, granularity, qmin, qmax)
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


@torch.no_grad()
def mse_optimal_affine(v: torch.Tensor, granularity: Granularity, qmin: int, qmax: int,
                       candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group MSE-optimal ``(step, zero point)`` of an asymmetric grid (module docstring)."""
    v = v.float()
    lo = granularity.reduce(v, "amin").clamp_max(0)
    hi = granularity.reduce(v, "amax").clamp_min(0)
    mid = (lo + hi) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8), torch.zeros_like(lo)
    dims = granularity.reduce_dims(v)
    for k in range(1, candidates + 1):
        lo_k = mid - (mid - lo) * (k / candidates)
        s = ((hi - lo) * (k / candidates) / (qmax - qmin)).clamp_min(1e-8)
        z = torch.clamp(torch.round(qmin - lo_k / s), qmin, qmax)
        se, ze = granularity.expand(s, v), granularity.expand(z, v)
        err = ((torch.clamp(torch.round(v / se + ze), qmin, qmax) - ze) * se - v).pow(2)
        err = err.mean(dim=dims) if dims else err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
