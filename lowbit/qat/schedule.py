"""Learning-rate schedules of the fine-tuning loop, as pure functions of the step.

The rate of step ``t`` (0-based, the ``t``-th optimizer update) depends on ``t`` alone, so a
resumed run needs nothing but the step to continue the schedule exactly. With ``W`` warm-up
steps the rate rises linearly, ``lr * (t + 1) / W``; after it, with ``t' = t - W`` and
``T = total - W``:

- ``constant``:     ``lr``
- ``cosine``:       ``final + (lr - final) * (1 + cos(pi t' / T)) / 2`` (the FP trainer's
  :func:`lowbit.train.cosine_warmup` with a floor at ``final``)
- ``exponential``:  ``lr * (final / lr) ** (t' / T)`` (FAQ: 0.0015 decaying to 1e-6)
- ``step``:         ``lr * gamma ** (number of milestones <= t)``, milestones in steps
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.qat.config import SCHEDULES, FinetuneConfig
from lowbit.train import cosine_warmup


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    final_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, steps_per_epoch: int, total_steps: int) -> LRSchedule:
        warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * steps_per_epoch))
        return cls(cfg.schedule, cfg.lr, total_steps, min(warmup, total_steps), cfg.final_lr,
                   tuple(int(round(m * steps_per_epoch)) for m in cfg.milestones), cfg.gamma)

    def __call__(self, step: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if step < w:
            return self.lr * (step + 1) / w
        if self.kind == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "constant" or total <= w:
            return self.lr
        if self.kind == "cosine":
            return self.final_lr + (self.lr - self.final_lr) * cosine_warmup(step, total, w)
        return self.lr * (self.final_lr / self.lr) ** ((step - w) / (total - w))  # exponential

    def state_dict(self, step: int) -> dict:
        """JSON-safe description (for the checkpoint): the schedule and where it stands."""
        return {"kind": self.kind, "lr": self.lr, "final_lr": self.final_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "milestones": list(self.milestones), "gamma": self.gamma,
                "step": step, "current_lr": self(min(step, self.total_steps - 1))}
