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
    """Next-token logits ``[B, T, V]`` of a causal LM, float32. A Hugging Face model (also inside a
    DDP/FSDP wrapper) runs without building a cache."""
    inner = getattr(model, "module", model)
    out = model(input_ids=ids, use_cache=False) if hasattr(getattr(inner, "config", None), "use_cache") else model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def as_windows(data) -> torch.Tensor:
    """Evaluation windows ``[N, T]`` from a tensor of windows or an iterable of window batches."""
    windows = data if isinstance(data, torch.Tensor) else torch.cat([torch.as_tensor(b) for b in data])
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be [count, tokens >= 2], got shape {tuple(windows.shape)}")
    return windows


LOGITS_BUDGET = 2 ** 27  # float32 logits per evaluation batch (512 MB; the KL holds several such tensors at once)


def windows_per_batch(model: nn.Module, tokens: int, batch_size: int) -> int:
    """``batch_size``, fewer when ``batch_size`` windows of ``tokens`` would exceed :data:`LOGITS_BUDGET` logits
    for the model's vocabulary (Gemma 3's 262,144 tokens: 2 windows of 256 at a time, not 8). Batching does not
    change the numbers: every measure is a sum over positions."""
    vocab = getattr(getattr(getattr(model, "module", model), "config", None), "vocab_size", None)
    return batch_size if not vocab else max(1, min(batch_size, LOGITS_BUDGET // (tokens * vocab)))


@torch.no_grad()
def measure(model: nn.Module, windows, *, teacher: nn.Module | None = None, batch_size: int = 8) -> dict[str, float]:
    """``{"perplexity"}`` of ``model`` over ``windows`` (``[N, T]``, or batches of them), plus ``"kl"``
    and ``"agreement"`` (percent) against ``teacher`` when given (module docstring). At most ``batch_size``
    windows run at once (:func:`windows_per_batch`)."""
    windows = as_windows(windows)
    batch_size = windows_per_batch(model, windows.shape[1], batch_size)
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    nll = kl = agree = 0.0
    count = 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size].to(device)
            logits = logits_of(model, ids)[:, :-1]
            flat = logits.reshape(-1, logits.shape[-1])
            nll += float(F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum"))
            if teacher is not None:
                t_flat = logits_of(teacher, ids)[:, :-1].reshape(-1, logits.shape[-1])
                kl += float(F.kl_div(F.log_softmax(flat, -1), F.log_softmax(t_flat, -1), log_target=True,
                                     reduction="sum"))
                agree += float((flat.argmax(-1) == t_flat.argmax(-1)).sum())
            count += flat.shape[0]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    out = {"perplexity": math.exp(nll / count)}
    if teacher is not None:
        out.update(kl=kl / count, agreement=100.0 * agree / count)
    return out


def perplexity(model: nn.Module, windows, *, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``windows``."""
    return measure(model, windows, batch_size=batch_size)["perplexity"]
