"""Knowledge distillation from the full-precision model (Hinton et al. 2015).

    loss = (1 - w) * CE(student, y) + w * T^2 * KL( softmax(teacher / T) || softmax(student / T) )

KL is averaged over the batch (``batchmean``); the ``T^2`` factor keeps the soft-target
gradients at the scale of the hard-label ones. LSQ's recipe (ALGORITHMS.md 4.5, recalled):
``T = 1`` and equal weights, i.e. ``w = 0.5``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lowbit.errors import LowbitError


class TeacherMismatchError(LowbitError, ValueError):
    """The teacher's outputs cannot be compared with the student's."""


def check_teacher_output(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if teacher.shape != student.shape:
        raise TeacherMismatchError(
            f"the teacher's outputs have shape {tuple(teacher.shape)} but the student's have shape "
            f"{tuple(student.shape)}; distillation needs the same number of classes: pass the full-precision "
            "model the quantized model was made from (or teacher=None)")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, weight: float,
                      temperature: float) -> torch.Tensor:
    """``(1 - weight) CE + weight T^2 KL(p_teacher || p_student)`` (mean over the batch)."""
    check_teacher_output(student, teacher)
    ce = F.cross_entropy(student, target)
    if weight == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * t * t * kl
