"""Accuracy and loss of a classifier over a loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
