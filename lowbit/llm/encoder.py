"""Sentence-embedding evaluation of an encoder (BERT) against its float self.

A sentence's embedding is the attention-masked mean of the encoder's last hidden states, L2-normalised
(sentence-transformers' pooling for all-MiniLM-L6-v2). For held-out sentences ``i`` with float embeddings
``e_i`` and quantized ones ``q_i``:

    cosine_i           = <e_i, q_i>                                   (mean and worst are reported)
    same neighbour (%) = mean_i [ argmax_{j != i} <q_i, q_j> = argmax_{j != i} <e_i, e_j> ]

the second asks whether the quantized model still finds the same most similar sentence among the held-out
set, which is what a retrieval user sees.

:class:`SentenceEncoder` is the fine-tuning objective of an encoder (``lowbit.finetune`` picks it for a
Hugging Face model without a language-model head): distillation from the float encoder,

    loss = mean_sentences (1 - cos(q_i, e_i)) + mean_tokens (1 - cos(h_student, h_teacher))

the first term is what is measured, the second (over the unmasked tokens' last hidden states) gives every
token a signal. The mix is lowbit's choice (there is no paper recipe for it here). Batches are tokenizer
dicts; they travel through the loop packed as one ``[B, 3, T]`` tensor (ids, mask, token types), so that
micro-batching splits them like any input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.qat.objective import Objective

FIELDS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches) -> torch.Tensor:
    """``[N, hidden]`` unit-norm mean-pooled embeddings of keyword batches (``input_ids``, ``attention_mask``, ...)."""
    out = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(nn.functional.normalize(pooled, dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine)."""
    sims = embeddings @ embeddings.T
    sims.fill_diagonal_(-float("inf"))
    return sims.argmax(1)


def embedding_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """``{"cosine_mean", "cosine_min", "same_neighbour"}`` of quantized against float embeddings (module docstring)."""
    if reference.shape != embeddings.shape or reference.shape[0] < 2:
        raise ValueError(f"need two [N >= 2, hidden] embedding tensors of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(embeddings.shape)}")
    cosine = (reference * embeddings).sum(1)
    same = (nearest_neighbours(reference) == nearest_neighbours(embeddings)).float().mean()
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "same_neighbour": float(same)}


def is_encoder(model: nn.Module) -> bool:
    """A Hugging Face transformer that encodes (a vocabulary, not a decoder, no ``generate``)."""
    config = getattr(model, "config", None)
    return (hasattr(config, "vocab_size") and not getattr(config, "is_decoder", False)
            and not hasattr(model, "generate") and hasattr(model, "get_input_embeddings"))


def pack(batch: dict) -> torch.Tensor:
    """A tokenizer batch as one ``[B, 3, T]`` int64 tensor (missing token types are zeros)."""
    ids = batch["input_ids"]
    return torch.stack([batch.get(k, torch.zeros_like(ids) if k == "token_type_ids" else torch.ones_like(ids))
                        .to(torch.int64) for k in FIELDS], dim=1)


def unpack(packed: torch.Tensor) -> dict:
    return {k: packed[:, i] for i, k in enumerate(FIELDS)}


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class SentenceEncoder(Objective):
    unit = "sentences"
    acc_name = "cosine"

    def split(self, batch):
        if isinstance(batch, dict) and "input_ids" in batch:
            return pack(batch), None
        if isinstance(batch, torch.Tensor) and batch.dim() == 3 and batch.shape[1] == len(FIELDS):
            return batch, None
        raise TypeError(f"an encoder fine-tunes on tokenizer batches (dicts with input_ids), got {type(batch).__name__}")

    def loss(self, net, teacher, inputs, targets, cfg, check_teacher):
        if teacher is None:
            raise ValueError("an encoder fine-tunes by distillation: pass teacher= (the float encoder)")
        kw = unpack(inputs)
        hidden = net(**kw).last_hidden_state
        with torch.no_grad():
            t_hidden = teacher(**kw).last_hidden_state
        mask = kw["attention_mask"].bool()
        sentence = F.cosine_similarity(_pooled(hidden, mask), _pooled(t_hidden, mask), dim=-1)
        tokens = F.cosine_similarity(hidden[mask], t_hidden[mask], dim=-1)
        loss = (1 - sentence).mean() + (1 - tokens).mean()
        return loss, float(sentence.detach().sum()), int(sentence.numel())

    def evaluate(self, model, data, teacher):
        if teacher is None:
            return {}
        batches = [unpack(self.split(b)[0]) for b in data]
        return {f"val_{k}": v for k, v in embedding_agreement(sentence_embeddings(teacher, batches),
                                                              sentence_embeddings(model, batches)).items()}

    def describe(self, metrics):
        if "val_cosine_mean" not in metrics:
            return ""
        return (f", val cosine {metrics['val_cosine_mean']:.4f} (worst {metrics['val_cosine_min']:.4f}), "
                f"same neighbour {100 * metrics['val_same_neighbour']:.1f}%")
