"""Accuracy and loss of a classifier over a loader, and per-layer quantization error (SQNR)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lowbit.nn.modules import QuantMixin


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``(x, y)`` batches.

    The model is put in eval mode for the pass and restored to its previous mode after.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total,
            "loss": loss_sum / total, "n": total}


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal power / noise power)``; ``inf`` for a noiseless copy."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@torch.no_grad()
def sqnr_report(float_model: nn.Module, qmodel: nn.Module, loader: Iterable, *,
                max_batches: int = 4) -> list[dict]:
    """Per quantized layer: SQNR (dB) of its fake-quantized weight and of its output against the float model.

    Output SQNR compares the layer's output inside ``qmodel`` (so with the error of every layer
    before it) with the same layer's output inside ``float_model`` on the same inputs, summing
    signal and noise power over ``max_batches`` batches. Where :func:`lowbit.quantize` folded a
    batch norm into a layer (``qmodel.lowbit_report.folded``), the reference is that batch norm's
    output in ``float_model``, since the folded layer computes conv and norm together. Rows follow
    the model's layer order.
    """
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantMixin)}
    float_layers = dict(float_model.named_modules())
    missing = [n for n in layers if n not in float_layers]
    if missing:
        raise ValueError(f"the float model has no layer(s) {missing[:3]}; pass the model qmodel was made from")
    report = getattr(qmodel, "lowbit_report", None)
    reference = {n: n for n in layers} | dict(report.folded if report is not None else [])
    power = {n: [0.0, 0.0] for n in layers}
    captured: dict[str, torch.Tensor] = {}
    hooks = [float_layers[reference[n]].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, o.detach().clone())) for n in layers]
    hooks += [m.register_forward_hook(lambda m, i, o, n=n: _accumulate(power[n], captured[n], o)) for n, m in layers.items()]
    modes = float_model.training, qmodel.training
    float_model.eval()
    qmodel.eval()
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            float_model(x)
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        float_model.train(modes[0])
        qmodel.train(modes[1])
    rows = []
    for n, m in layers.items():
        w = m.weight.detach()
        wq = m.quantized_weight().detach()
        rows.append({"layer": n, "weight_sqnr_db": sqnr_db(w.pow(2).sum().item(), (w - wq).pow(2).sum().item()),
                     "output_sqnr_db": sqnr_db(*power[n])})
    return rows


def _accumulate(acc: list[float], reference: torch.Tensor, output: torch.Tensor) -> None:
    acc[0] += reference.pow(2).sum().item()
    acc[1] += (output - reference).pow(2).sum().item()
