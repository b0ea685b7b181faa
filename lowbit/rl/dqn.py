"""Double DQN (van Hasselt et al. 2016) with MinAtar's reference settings (Young & Tian 2019).

    y = r + gamma * (1 - terminal) * Q_target(s', argmax_a Q_online(s', a))
    loss = Huber(Q_online(s, a) - y)                       (smooth L1, as MinAtar's dqn.py)

One gradient step per environment step on a batch of 32 transitions drawn uniformly from a
replay memory of the last 100,000, after 5,000 random-policy steps; the target network is copied
from the online one every 1,000 steps; RMSProp (lr 2.5e-4, smoothing 0.95, centred, eps 0.01);
epsilon-greedy with epsilon decayed linearly from 1 to 0.1 over the 100,000 steps after those.
Every setting sits in :class:`DQNConfig`. ``double=False`` gives MinAtar's plain DQN target
(``max_a Q_target(s', a)``). An episode cut short by the step cap bootstraps (it is not terminal).

The same run trains a teacher (a float network) and the paper's baseline, a low-precision
network trained directly by DQN: pass a ``lowbit.quantize``d network as ``net``. Run folders,
checkpoints and resume: :mod:`lowbit.rl.loop`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.rl.loop import RunConfig, TrainingRun
from lowbit.rl.policy import as_input, greedy_actions, linear_epsilon
from lowbit.rl.replay import Replay
from lowbit.zoo.qnets import create_qnet


@dataclass
class DQNConfig(RunConfig):
    arch: str = "minatar"  # lowbit.zoo.qnets, when no network is passed in
    replay_size: int = 100_000
    replay_start: int = 5_000  # random-policy steps before learning starts
    update_every: int = 1  # environment steps per gradient step
    target_update: int = 1_000  # environment steps between target-network copies
    lr: float = 2.5e-4
    rms_alpha: float = 0.95
    rms_eps: float = 0.01
    rms_centered: bool = True
    gamma: float = 0.99
    epsilon_start: float = 1.0
    epsilon_end: float = 0.1
    epsilon_frames: int = 100_000
    double: bool = True
    clip_rewards: bool = False  # clip training rewards to [-1, 1] (Atari); evaluation always scores raw rewards

    def __post_init__(self):
        self.check_positive("replay_size", "update_every", "target_update", "epsilon_frames")
        self.check_rate("lr")
        if not 0.0 < self.gamma <= 1.0:
            raise LowbitError(f"DQNConfig.gamma must be in (0, 1], got {self.gamma}")


def td_loss(online: nn.Module, target: nn.Module, batch: dict[str, torch.Tensor], *, gamma: float, double: bool,
            obs_scale: float = 1.0) -> torch.Tensor:
    """Mean Huber loss between ``Q_online(s, a)`` and the (double) DQN target of a replay batch
    with fields ``obs``, ``action``, ``reward``, ``next_obs``, ``terminal``."""
    q = online(as_input(batch["obs"], obs_scale)).gather(1, batch["action"][:, None]).squeeze(1)
    with torch.no_grad():
        next_x = as_input(batch["next_obs"], obs_scale)
        next_q = target(next_x)
        if double:
            next_value = next_q.gather(1, online(next_x).argmax(dim=1, keepdim=True)).squeeze(1)
        else:
            next_value = next_q.max(dim=1).values
        y = batch["reward"] + gamma * (~batch["terminal"]) * next_value
    return F.smooth_l1_loss(q, y)


class DQNRun(TrainingRun):
    """One DQN training run: ``DQNRun(config, run_dir).train()`` returns the trained online network.

    ``net``: the network to train (default: an untrained ``config.arch``), e.g. a quantized one.
    ``resume``: continue ``run_dir``'s last checkpoint.
    """

    def __init__(self, config: DQNConfig, run_dir: str | os.PathLike, *, net: nn.Module | None = None,
                 resume: bool = False, log=print):
        super().__init__(config, run_dir, log=log)
        torch.manual_seed(config.seed)
        self.net = net if net is not None else create_qnet(config.arch, self.env.obs_shape, self.env.num_actions)
        self.target = copy.deepcopy(self.net).eval()
        self.optimizer = torch.optim.RMSprop(self.net.parameters(), lr=config.lr, alpha=config.rms_alpha,
                                             eps=config.rms_eps, centered=config.rms_centered)
        shape = self.env.obs_shape
        self.memory = Replay(config.replay_size, obs=(shape, torch.uint8), action=((), torch.int64),
                             reward=((), torch.float32), next_obs=(shape, torch.uint8), terminal=((), torch.bool))
        if resume:
            self.resume()

    def epsilon(self) -> float:
        """The exploration rate now: 1 -> 0.1 over ``epsilon_frames`` steps from the end of the random
        ``replay_start`` steps (as MinAtar's dqn.py)."""
        cfg = self.cfg
        return linear_epsilon(max(0, self.frame - cfg.replay_start), cfg.epsilon_start, cfg.epsilon_end,
                              cfg.epsilon_frames)

    def act(self, obs: np.ndarray) -> int:
        if self.frame < self.cfg.replay_start or self.rng.random() < self.epsilon():
            return int(self.rng.integers(self.env.num_actions))
        return int(greedy_actions(self.net, obs[None], self.env.obs_scale)[0])

    def record(self, obs, action, reward, next_obs, terminal) -> None:
        if self.cfg.clip_rewards:
            reward = max(-1.0, min(1.0, reward))
        self.memory.add(obs=obs, action=action, reward=reward, next_obs=next_obs, terminal=terminal)

    def learn(self) -> None:
        cfg = self.cfg
        if self.frame > cfg.replay_start and self.frame % cfg.update_every == 0:
            batch = self.memory.sample(cfg.batch_size, self.generator)
            self.optimize(td_loss(self.net, self.target, batch, gamma=cfg.gamma, double=cfg.double,
                                  obs_scale=self.env.obs_scale))
        if self.frame % cfg.target_update == 0:
            self.target.load_state_dict(self.net.state_dict())

    def progress(self) -> str:
        return f", epsilon {self.epsilon():.3f}"

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target.load_state_dict({k[len("target."):]: v for k, v in tensors.items() if k.startswith("target.")})
