"""EAGL: Entropy Approximation Guided Layer selection (Bablani et al., arXiv:2301.13330; ALGORITHMS.md 6.2).

No data. For each candidate layer, quantize its weights at the high precision with the
quantizer's own step (the base recipe's weight quantizer, built and initialised from the
weights exactly as ``lowbit.quantize`` would; or, given a quantized model, its learned step)
and take the entropy of the integer codes:

    q   = round(clip(W / s, -Q_N, Q_P))                # integer codes at b_hi
    p_k = count(q == k) / numel(W)
    H   = -sum_k p_k log2 p_k                          # bits, 0 <= H <= b_hi

A layer whose codes spread over many levels (high H) uses its precision and is kept at the
high precision first (the direction is the reconstruction of ALGORITHMS.md 6.2).

Weighting (``weighting=``), the layer's gain of staying at the high precision:

- ``"none"`` (default): ``H`` (every layer counts the same; the paper's metric as reconstructed);
- ``"params"``: ``H * N`` (N weights: the information the layer's codes carry, in bits);
- ``"log_params"``: ``H * log2 N`` (between the two);
- ``"macs"``: ``H * MACs`` (layers that do more work count more);
- a callable ``f(name, entropy, layer_cost) -> float`` (``layer_cost``: a
  :class:`~lowbit.mixed.cost.LayerCost`).

With more than two candidate precisions, the gain at an intermediate precision ``p`` is the
high-precision gain scaled by ``(w_bits(p) - w_bits(low)) / (w_bits(high) - w_bits(low))`` (an
assumption: EAGL is defined for two precisions); the lowest precision has gain 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.nn.modules import QuantMixin
from lowbit.prepare import build_quantizer

WEIGHTINGS = ("none", "params", "log_params", "macs")


def entropy_bits(codes: torch.Tensor) -> float:
    """Entropy (bits) of the empirical distribution of integer ``codes``."""
    flat = codes.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    counts = torch.bincount(flat - flat.min())  # codes span at most 2^16 levels
    return probs_entropy(counts)


def probs_entropy(counts: torch.Tensor) -> float:
    """Entropy (bits) of counts or probabilities (zeros ignored)."""
    c = counts.to(torch.float64)
    c = c[c > 0]
    if c.numel() == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * torch.log2(p)).sum())


@torch.no_grad()
def layer_codes(layer: nn.Module, w_spec: dict, bits: int, name: str = "", quantizer=None) -> torch.Tensor:
    """Integer codes of ``layer.weight`` at ``bits`` with the recipe's weight quantizer (or ``quantizer``)."""
    weight = layer.weight.detach()
    if quantizer is None:
        quantizer = build_quantizer({**w_spec, "bits": bits}, "weight", name, layer)
        quantizer.init_from(weight)
    return quantizer.quantize_int(weight)


def eagl_entropies(model: nn.Module, space, *, qmodel: nn.Module | None = None) -> dict[str, float]:
    """Entropy (bits) of each candidate's weight codes at the highest candidate precision.

    ``model``: the float model of ``space``. ``qmodel``: optionally a quantized (e.g. LSQ
    fine-tuned) version; a candidate whose weight quantizer there runs at the high weight bits
    uses that quantizer's learned step instead of a fresh one.
    """
    modules = dict(model.named_modules())
    qmods = dict(qmodel.named_modules()) if qmodel is not None else {}
    hi = space.highest[0]
    out = {}
    for n in space.candidates:
        wq = None
        qm = qmods.get(n)
        if isinstance(qm, QuantMixin) and qm.weight_quantizer is not None and qm.weight_quantizer.bits == hi \
                and bool(qm.weight_quantizer.initialized):
            wq, layer = qm.weight_quantizer, qm
        else:
            layer = modules[n]
        out[n] = entropy_bits(layer_codes(layer, space.specs[n][0], hi, n, wq))
    return out


def weight_of(weighting: str | Callable, name: str, entropy: float, layer_cost) -> float:
    if callable(weighting):
        return float(weighting(name, entropy, layer_cost))
    if weighting == "none":
        return entropy
    if weighting == "params":
        return entropy * layer_cost.params
    if weighting == "log_params":
        return entropy * math.log2(max(2, layer_cost.params))
    if weighting == "macs":
        return entropy * layer_cost.macs
    raise RecipeError(f"EAGL weighting must be one of {list(WEIGHTINGS)} or a callable, got {weighting!r}")


def eagl_gains(model: nn.Module, space, *, weighting: str | Callable = "none", qmodel: nn.Module | None = None,
               entropies: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Per candidate, the EAGL gain of each of ``space.precisions`` (0 at the lowest)."""
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise RecipeError(f"EAGL weighting must be one of {list(WEIGHTINGS)} or a callable, got {weighting!r}")
    if entropies is None:
        entropies = eagl_entropies(model, space, qmodel=qmodel)
    hi, lo = space.highest[0], space.lowest[0]
    gains = {}
    for n in space.candidates:
        g = weight_of(weighting, n, entropies[n], space.costs.layers[n])
        gains[n] = [g * ((p[0] - lo) / (hi - lo) if hi != lo else float(k == 0))
                    for k, p in enumerate(space.precisions)]
        gains[n][-1] = 0.0
    return gains
