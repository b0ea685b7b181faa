"""Policy distillation (Rusu et al. 2016) into a low-precision student (McKinstry et al. 2018).

    p_T = softmax(Q_T(s) / tau),   p_S = softmax(z_S(s))
    loss = mean over the batch of  sum_a p_T(a) (log p_T(a) - log p_S(a))      (KL(p_T || p_S))

``tau = 0.01`` by default, the temperature Rusu et al. found best (it sharpens the teacher's
Q-values into a near one-hot policy that still ranks close actions). The data are states of
play: at each environment step the acting policy (the teacher by default) picks its greedy
action, or a random one with probability ``epsilon`` (0.05, as Rusu et al.), and the state is
stored with the teacher's Q-values in a bounded replay memory (``replay_size``, oldest out
first); one gradient step per ``update_every`` environment steps on a uniformly drawn batch,
from ``learn_start`` steps on. ``student_acting`` is the probability that an episode is played
by the student instead of the teacher (DAgger-style, Ross et al. 2011: the student then sees
the states its own mistakes lead to, labelled by the teacher); drawing per episode, not per
step, is our choice. The optimizer is Adam (lr 1e-3, our choice; Rusu et al. used RMSProp at
1e-4 to 1e-3). Every setting sits in :class:`DistillConfig`; run folders, checkpoints and
resume work as for DQN (:mod:`lowbit.rl.loop`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import GameError, LowbitError
from lowbit.rl.loop import RunConfig, TrainingRun
from lowbit.rl.policy import as_input, checked_q
from lowbit.rl.replay import Replay


@dataclass
class DistillConfig(RunConfig):
    frames: int = 50_000  # the budget of the table in docs/RESULTS.md
    tau: float = 0.01
    epsilon: float = 0.05
    replay_size: int = 100_000
    learn_start: int = 1_000  # steps of play stored before the first gradient step
    update_every: int = 1
    lr: float = 1e-3
    student_acting: float = 0.0  # probability that an episode is played by the student (DAgger-style)

    def __post_init__(self):
        self.check_positive("replay_size", "learn_start", "update_every")
        self.check_rate("tau")
        self.check_rate("lr")
        for name in ("epsilon", "student_acting"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LowbitError(f"DistillConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")


def distillation_kl(student_logits: torch.Tensor, teacher_q: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(softmax(teacher_q / tau) || softmax(student_logits))``, averaged over the batch."""
    if student_logits.shape != teacher_q.shape:
        raise GameError(f"the student has {student_logits.shape[-1]} outputs and the teacher "
                        f"{teacher_q.shape[-1]}: they must play the same game")
    log_p_teacher = F.log_softmax(teacher_q / tau, dim=1)
    log_p_student = F.log_softmax(student_logits, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()


class DistillRun(TrainingRun):
    """Distil ``teacher`` (a float Q-network, eval mode) into ``student`` (any network with one output
    per action, typically ``lowbit.quantize``d) on ``config.game``: ``DistillRun(...).train()``."""

    def __init__(self, config: DistillConfig, run_dir: str | os.PathLike, *, teacher: nn.Module,
                 student: nn.Module, resume: bool = False, log=print):
        super().__init__(config, run_dir, log=log)
        self.teacher = teacher.eval()
        self.net = student
        probe = torch.zeros(1, *self.env.obs_shape)
        for who, net in (("teacher", teacher), ("student", student)):
            try:
                with torch.no_grad():
                    outputs = net(probe).shape[-1]
            except RuntimeError as exc:
                raise GameError(f"the {who} cannot read {config.game!r} frames of shape {self.env.obs_shape}: "
                                f"it was built for another game or architecture ({exc})") from exc
            if outputs != self.env.num_actions:
                raise GameError(f"the {who} has {outputs} outputs but {config.game!r} has {self.env.num_actions} "
                                "actions: it was built for another game")
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.memory = Replay(config.replay_size, obs=(self.env.obs_shape, torch.uint8),
                             teacher_q=((self.env.num_actions,), torch.float32))
        self.student_acts = False
        self._teacher_q: torch.Tensor | None = None
        if resume:
            self.resume()

    def config_dict(self) -> dict:
        """The settings plus a digest of the teacher's weights: resuming with another teacher is refused."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return dict(super().config_dict(), teacher_sha256=digest.hexdigest()[:16])

    def on_episode_start(self) -> None:
        if self.cfg.student_acting > 0:
            self.student_acts = bool(self.rng.random() < self.cfg.student_acting)

    def act(self, obs: np.ndarray) -> int:
        x = as_input(obs[None], self.env.obs_scale)
        with torch.no_grad():
            self._teacher_q = checked_q(self.teacher, x)[0]
            greedy = checked_q(self.net, x)[0].argmax() if self.student_acts else self._teacher_q.argmax()
        if self.rng.random() < self.cfg.epsilon:
            return int(self.rng.integers(self.env.num_actions))
        return int(greedy)

    def record(self, obs, action, reward, next_obs, terminal) -> None:
        self.memory.add(obs=obs, teacher_q=self._teacher_q)

    def learn(self) -> None:
        cfg = self.cfg
        if self.frame >= cfg.learn_start and self.frame % cfg.update_every == 0:
            batch = self.memory.sample(cfg.batch_size, self.generator)
            logits = self.net(as_input(batch["obs"], self.env.obs_scale))
            self.optimize(distillation_kl(logits, batch["teacher_q"], cfg.tau))

    def progress(self) -> str:
        return f", student acting {self.cfg.student_acting:.2f}" if self.cfg.student_acting else ""
