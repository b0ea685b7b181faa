"""What the fine-tuning loop optimises, per kind of model: how a batch is read, the loss, the
statistics it logs, the evaluation after each epoch.

The loop (:mod:`lowbit.qat.trainer`) is the same for every model; an :class:`Objective` is the one
part that differs. :class:`Classification` is the default: ``(input, target)`` batches,
cross-entropy or Hinton distillation (:mod:`lowbit.qat.distill`), top-1 accuracy. Pipelines
register theirs for the models they know with :func:`register_objective` (:mod:`lowbit.llm`
registers next-token distillation for causal language models), so ``lowbit.finetune`` picks the
right one without the loop importing them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.evaluate import evaluate
from lowbit.qat.config import FinetuneConfig
from lowbit.qat.distill import check_teacher_output, distillation_loss


class Objective:
    """Batch handling and loss of one kind of model (see the module docstring)."""

    unit = "samples"  # what ``count`` measures; progress reports it per second
    acc_name = "acc"  # what ``correct / count`` is called in log lines

    def split(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(inputs, targets)`` of a loader batch; both are split along dim 0 across ranks and
        micro-batches (``targets`` may be None)."""
        raise NotImplementedError

    def loss(self, net: nn.Module, teacher: nn.Module | None, inputs, targets, cfg: FinetuneConfig,
             check_teacher: bool) -> tuple[torch.Tensor, float, int]:
        """``(mean loss, correct, count)`` on one (micro-)batch: ``correct`` of ``count`` predictions
        are right (the meaning of "right" is the objective's)."""
        raise NotImplementedError

    def units(self, inputs: torch.Tensor) -> int:
        """``count`` units in a batch of ``inputs`` (for budgets and throughput)."""
        return int(inputs.shape[0])

    def evaluate(self, model: nn.Module, data, teacher: nn.Module | None) -> dict[str, float]:
        """Validation metrics, keys starting with ``val_``."""
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        """The validation part of an epoch's log line."""
        return "".join(f", {k.removeprefix('val_')} {v:.4g}" for k, v in metrics.items() if k.startswith("val_"))


class Classification(Objective):
    """``(x, y)`` batches; cross-entropy, or ``(1 - w) CE + w T^2 KL`` with a teacher
    (``cfg.distill_weight``, ``cfg.temperature``); "correct" is top-1 against the label."""

    def split(self, batch):
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError("finetune trains classifiers on (input, target) batches; got "
                        f"{type(batch).__name__}{' of length ' + str(len(batch)) if hasattr(batch, '__len__') else ''}")

    def loss(self, net, teacher, inputs, targets, cfg, check_teacher):
        out = net(inputs)
        if teacher is not None and cfg.distill_weight > 0:
            with torch.no_grad():
                t_out = teacher(inputs)
            check_teacher_output(out, t_out)
            loss = distillation_loss(out, t_out, targets, weight=cfg.distill_weight, temperature=cfg.temperature)
        else:
            if teacher is not None and check_teacher:
                with torch.no_grad():
                    check_teacher_output(out, teacher(inputs))
            loss = F.cross_entropy(out, targets)
        return loss, float((out.detach().argmax(dim=-1) == targets).sum()), int(targets.shape[0])

    def evaluate(self, model, data, teacher):
        m = evaluate(model, data)
        return {"val_top1": m["top1"], "val_top5": m["top5"], "val_loss": m["loss"]}

    def describe(self, metrics):
        return f", val top-1 {metrics['val_top1']:.2f}%" if "val_top1" in metrics else ""


_REGISTRY: list[tuple[Callable[[nn.Module], bool], Callable[[], Objective]]] = []


def register_objective(applies: Callable[[nn.Module], bool], make: Callable[[], Objective]) -> None:
    """Use ``make()`` for every model ``applies(model)`` is true for (later registrations win)."""
    _REGISTRY.append((applies, make))


def objective_for(model: nn.Module, objective: Objective | None = None) -> Objective:
    """``objective`` if given, else the registered one that applies to ``model``, else :class:`Classification`."""
    if objective is not None:
        return objective
    for applies, make in reversed(_REGISTRY):
        if applies(model):
            return make()
    return Classification()


def first_inputs(objective: Objective, data: Iterable) -> torch.Tensor:
    """The inputs of the first batch of ``data`` (to size a budget before training)."""
    return objective.split(next(iter(data)))[0]
