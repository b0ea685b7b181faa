"""Next-token distillation: the fine-tuning objective of a causal language model.

For a window of ``T`` tokens, the ``T - 1`` positions that have a next token each give

    loss = w T_d^2 KL( softmax(z_teacher / T_d) || softmax(z_student / T_d) ) + (1 - w) CE(z_student, next token)

averaged over the positions of the batch (``w = distill_weight``, ``T_d = temperature``; the formula
of :func:`lowbit.qat.distill.distillation_loss`, applied per token). SiLQ (ALGORITHMS.md 7) reports
QAT with knowledge distillation from the full-precision model and existing data; the loss mix, the
temperature and the data are not public, so they are options, and the shipped recipes' values are
lowbit's choices (made on the calib split). Without a teacher the loss is the cross-entropy alone.

"correct" (the ``acc`` of the fine-tuning logs) is next-token top-1 agreement with the teacher, or
with the text itself without one. Batches are ``[B, T]`` token windows (or dicts holding
``input_ids``); the unit of budgets and throughput is the token.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.llm.evaluate import logits_of, measure
from lowbit.qat.distill import check_teacher_output, distillation_loss
from lowbit.qat.objective import Objective


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (it generates, and its config has a vocabulary)."""
    return hasattr(model, "generate") and hasattr(getattr(model, "config", None), "vocab_size")


class CausalLM(Objective):
    unit = "tokens"
    acc_name = "agreement"

    def split(self, batch):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("a language model fine-tunes on [batch, tokens] integer windows (e.g. "
                            f"lowbit.data.text.TokenWindows), got {type(ids).__name__}"
                            + (f" of shape {tuple(ids.shape)} and dtype {ids.dtype}" if hasattr(ids, "shape") else ""))
        return ids, None

    def units(self, inputs):
        return int(inputs.numel())

    def loss(self, net, teacher, inputs, targets, cfg, check_teacher):
        logits = logits_of(net, inputs)[:, :-1]
        student = logits.reshape(-1, logits.shape[-1])
        labels = inputs[:, 1:].reshape(-1)
        if teacher is None:
            loss = nn.functional.cross_entropy(student, labels)
            return loss, float((student.detach().argmax(-1) == labels).sum()), int(labels.numel())
        with torch.no_grad():
            t_logits = logits_of(teacher, inputs)[:, :-1]
            check_teacher_output(logits, t_logits)
            target = t_logits.reshape(-1, t_logits.shape[-1])
        loss = distillation_loss(student, target, labels, weight=cfg.distill_weight, temperature=cfg.temperature)
        return loss, float((student.detach().argmax(-1) == target.argmax(-1)).sum()), int(labels.numel())

    def evaluate(self, model, data, teacher):
        return {f"val_{k}": v for k, v in measure(model, data, teacher=teacher).items()}

    def describe(self, metrics):
        text = f", val perplexity {metrics['val_perplexity']:.3f}" if "val_perplexity" in metrics else ""
        if "val_kl" in metrics:
            text += f", KL {metrics['val_kl']:.4f}, agreement {metrics['val_agreement']:.2f}%"
        return text
