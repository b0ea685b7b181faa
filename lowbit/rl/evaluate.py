"""Scoring a Q-network policy: mean and standard deviation of the episode return over seeded
episodes, and, given a teacher, how often the two pick the same action.

Episodes run in lockstep (one environment per episode, a batched forward per step), so 100
MinAtar episodes cost about as many network calls as the longest one. Episode ``i`` plays on
the game seeded ``seed + i``; :data:`TEST_SEED` seeds the reported scores, :data:`VALIDATION_SEED`
the evaluations that choose settings (training curves, hyper-parameters), and training runs
use small seeds, so the three never share a game.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lowbit.rl.envs import make_env
from lowbit.rl.policy import as_input, checked_q

TEST_SEED = 2_000_000
VALIDATION_SEED = 1_000_000


@dataclass
class EvalResult:
    returns: list[float]
    frames: int  # environment steps played over all episodes
    agreement: float | None = None  # fraction of the policy's steps on which the teacher's greedy action is the same

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0) of the episode returns."""
        return float(np.std(self.returns))

    def to_dict(self) -> dict:
        return dict(asdict(self), mean=self.mean, std=self.std, episodes=len(self.returns))


Policy = Callable[[torch.Tensor], torch.Tensor]  # float frames [N, C, H, W] -> Q-values or logits [N, actions]


@torch.no_grad()
def evaluate_policy(net: nn.Module | Policy, game: str, *, episodes: int = 100, seed: int = TEST_SEED, epsilon: float = 0.0,
                    teacher: nn.Module | None = None, env_options: dict | None = None) -> EvalResult:
    """Play ``episodes`` episodes of ``game`` with ``net``'s greedy action (a random one with
    probability ``epsilon``); return every episode's undiscounted, unclipped return. ``net`` is a
    module (run in eval mode) or any callable from float frames to action values, such as
    ``lowbit.deploy.IntegerEngine``.

    With ``teacher``, also count the steps where the teacher's greedy action equals the action
    ``net``'s greedy choice (before epsilon) on the states ``net`` visits.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    envs = [make_env(game, seed + i, **(env_options or {})) for i in range(episodes)]
    scale = envs[0].obs_scale
    frames = [env.reset() for env in envs]
    returns = [0.0] * episodes
    active = list(range(episodes))
    rng = np.random.default_rng(seed)
    steps = agree = 0
    was_training = isinstance(net, nn.Module) and net.training
    if was_training:
        net.eval()
    try:
        while active:
            x = as_input(np.stack([frames[i] for i in active]), scale)
            actions = checked_q(net, x).argmax(dim=1)
            if teacher is not None:
                agree += int((checked_q(teacher, x).argmax(dim=1) == actions).sum())
            if epsilon > 0:
                explore = rng.random(len(active)) < epsilon
                actions = torch.where(torch.from_numpy(explore), torch.from_numpy(
                    rng.integers(envs[0].num_actions, size=len(active))), actions)
            steps += len(active)
            still = []
            for i, action in zip(active, actions.tolist()):
                frames[i], reward, done = envs[i].step(action)
                returns[i] += reward
                if not done:
                    still.append(i)
            active = still
    finally:
        if was_training:
            net.train()
    return EvalResult(returns, steps, agree / steps if teacher is not None else None)


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


@torch.no_grad()
def frames_per_second(policy: nn.Module | Policy, frames: torch.Tensor, *, repeats: int = 1,
                      clock: str = "cpu") -> float:
    """Decisions per second of ``policy`` choosing an action for one frame at a time (batch 1, as a
    player in real time does), over ``frames`` (float ``[N, C, H, W]``) ``repeats`` times.

    ``clock="cpu"`` (default) divides by this thread's CPU time, i.e. frames per second of one
    core's own time, which a machine shared with other jobs does not distort (run with one torch
    thread); ``"wall"`` by elapsed time.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    tick = CLOCKS[clock]
    start = tick()
    for _ in range(repeats):
        for i in range(len(frames)):
            policy(frames[i:i + 1]).argmax(dim=1)
    return repeats * len(frames) / (tick() - start)
