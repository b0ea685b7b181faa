"""Language-model evaluation on fixed token windows: perplexity, KL to the float model, agreement.

For windows ``x`` of ``T`` tokens (:func:`lowbit.data.text.eval_windows`), position ``t < T - 1``
predicts token ``t + 1``:

    perplexity = exp( mean_{windows, t} -log p_student(x_{t+1} | x_{<=t}) )
    KL         = mean_{windows, t} sum_v p_teacher(v) (log p_teacher(v) - log p_student(v))
    agreement  = mean_{windows, t} [argmax p_student = argmax p_teacher]   (next-token top-1, in %)

KL and agreement run over the same ``T - 1`` predicting positions as the perplexity. Every number
in lowbit's language-model tables is one of these, on windows stated beside it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, T, V]`` of a causal LM (a Hugging Face model or a plain module), float32."""
    out = model(ids, use_cache=False) if _takes_use_cache(model) else model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _takes_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")


def _batches(windows: torch.Tensor, batch_size: int):
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i:i + batch_size]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``windows`` ``[N, T]``."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for ids in _batches(windows, batch_size):
            ids = ids.to(device)
            logits = logits_of(model, ids)[:, :-1]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
