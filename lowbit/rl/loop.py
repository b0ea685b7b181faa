"""The episode loop that DQN training and policy distillation share.

A :class:`TrainingRun` plays one seeded game: at each environment step it asks the subclass for an
action (:meth:`~TrainingRun.act`), hands it the transition (:meth:`~TrainingRun.record`) and lets
it learn (:meth:`~TrainingRun.learn`). At episode ends it logs progress, scores the network on
validation episodes every ``eval_every`` steps (rows in ``run_dir/evals.json``) and writes a
resumable checkpoint every ``save_every`` steps (``run_dir/last.safetensors``, atomically, through
:func:`lowbit.qat.state.save_training_state`). A run stops at the first episode end at or after
``frames`` steps and always saves there, so resuming (possibly with a larger ``frames``) continues
exactly as an uninterrupted run would: the checkpoint holds the networks, the optimizer, the
replay memory and every random-number state, the game's included (MinAtar; an Atari game cannot
be restored and is reseeded from the resume point). A resume with other settings than the run's
(``frames`` aside) raises :class:`~lowbit.errors.CheckpointError` naming them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import CheckpointError, LowbitError
from lowbit.files import write_json_atomic
from lowbit.qat.state import (NonFiniteError, check_compatible, fingerprint, load_training_state, model_tensors,
                              optimizer_from_flat, save_training_state)
from lowbit.rl.envs import Env, make_env
from lowbit.rl.evaluate import VALIDATION_SEED, evaluate_policy
from lowbit.rl.replay import Replay

LOG_EVERY = 10_000  # steps between progress lines


@dataclass
class RunConfig:
    """Settings every run has. ``frames`` counts environment steps (4 emulator frames each on Atari)."""

    game: str = "breakout"
    frames: int = 1_000_000
    seed: int = 0
    batch_size: int = 32
    eval_every: int = 100_000  # steps between validation evaluations (at the next episode end)
    eval_episodes: int = 10
    save_every: int = 50_000  # steps between resumable checkpoints (at the next episode end)
    env_options: dict = field(default_factory=dict)

    def check_positive(self, *names: str) -> None:
        for name in ("frames", "batch_size", "eval_every", "eval_episodes", "save_every", *names):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LowbitError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def check_rate(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise LowbitError(f"{type(self).__name__}.{name} must be a positive number, got {value!r}")


class TrainingRun:
    """Base of :class:`~lowbit.rl.dqn.DQNRun` and :class:`~lowbit.rl.distill.DistillRun`.

    Subclasses set ``self.net`` (the network being trained and scored), ``self.optimizer`` and
    ``self.memory`` before calling :meth:`start`, and implement :meth:`act`, :meth:`record` and
    :meth:`learn`; :meth:`extra_tensors` / :meth:`load_extra` carry their own state.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    memory: Replay

    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, *, log=print):
        self.cfg, self.dir, self.log = config, Path(run_dir), log
        self.env: Env = make_env(config.game, config.seed, **config.env_options)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.frame, self.episodes, self.updates, self.seconds = 0, 0, 0, 0.0
        self.episode_returns: list[float] = []
        self.evals: list[dict] = []
        self.next_eval, self.next_save = config.eval_every, config.save_every

    # ----- what a subclass provides -------------------------------------------------------
    def act(self, obs: np.ndarray) -> int:
        raise NotImplementedError

    def record(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminal: bool) -> None:
        raise NotImplementedError

    def learn(self) -> None:
        raise NotImplementedError

    def on_episode_start(self) -> None:
        """Called before each episode's first step (e.g. to choose who acts)."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def progress(self) -> str:
        """Extra words for the progress line."""
        return ""

    # ----- shared machinery ------------------------------------------------------------------
    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def optimize(self, loss: torch.Tensor) -> None:
        """One gradient step on ``loss``; :class:`NonFiniteError` (the last checkpoint kept) if it is NaN/Inf."""
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"the loss became {loss.item()} at step {self.frame:,}; the last checkpoint in "
                                 f"{self.dir} is kept: lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def save(self) -> None:
        state = self.env.rng_state()
        meta = {"step": self.frame, "config": self.config_dict(), "fingerprint": fingerprint(self.net),
                "episodes": self.episodes, "updates": self.updates, "seconds": self.seconds,
                "episode_returns": self.episode_returns, "evals": self.evals,
                "next_eval": self.next_eval, "next_save": self.next_save, "rng": self.rng.bit_generator.state,
                "env_rng": None if state is None else {k: v for k, v in state.items() if k != "keys"}}
        extra = self.extra_tensors()
        extra.update(self.memory.state())
        extra["generator"] = self.generator.get_state()
        if state is not None:
            extra["env_rng_keys"] = torch.from_numpy(state["keys"])
        save_training_state(self.dir, self.net, self.optimizer, meta, extra)

    def resume(self) -> None:
        """Load ``run_dir/last.safetensors``; :class:`CheckpointError` if absent or from other settings."""
        loaded = load_training_state(self.dir)
        if loaded is None:
            raise CheckpointError(f"{self.dir}: nothing to resume (no last.safetensors); start without --resume")
        tensors, meta = loaded
        check_compatible(meta, self.net, self.config_dict(), frozenset({"frames"}), str(self.dir))
        self.net.load_state_dict(model_tensors(tensors))
        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.memory.load_state(tensors)
        self.load_extra(tensors)
        self.generator.set_state(tensors["generator"])
        self.rng.bit_generator.state = meta["rng"]
        if meta["env_rng"] is not None:
            self.env.set_rng_state(dict(meta["env_rng"], keys=tensors["env_rng_keys"].numpy()))
        else:
            self.env = make_env(self.cfg.game, self.cfg.seed + meta["step"], **self.cfg.env_options)
        self.frame, self.episodes, self.updates = meta["step"], meta["episodes"], meta["updates"]
        self.seconds, self.episode_returns, self.evals = meta["seconds"], meta["episode_returns"], meta["evals"]
        self.next_eval, self.next_save = meta["next_eval"], meta["next_save"]
        self.log(f"resumed {self.dir} at step {self.frame:,} ({self.episodes:,} episodes)")

    def evaluate(self) -> None:
        result = evaluate_policy(self.net, self.cfg.game, episodes=self.cfg.eval_episodes, seed=VALIDATION_SEED,
                                 env_options=self.cfg.env_options)
        self.evals.append({"frame": self.frame, "mean": result.mean, "std": result.std,
                           "episodes": len(result.returns), "minutes": self.seconds / 60})
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / "evals.json", self.evals)
        self.log(f"step {self.frame:,}: validation return {result.mean:.2f} +- {result.std:.2f} "
                 f"({len(result.returns)} episodes)")

    def train(self) -> nn.Module:
        """Run until the first episode end at or after ``config.frames`` steps, save, and return the
        trained network (in eval mode)."""
        cfg = self.cfg
        if self.frame >= cfg.frames:
            return self.net.eval()
        self.net.train()
        start, last_log = time.perf_counter(), self.frame
        while True:
            self._play_episode()  # whole episodes: a checkpoint never splits one
            now = time.perf_counter()
            self.seconds, start = self.seconds + now - start, now
            if self.frame - last_log >= LOG_EVERY:
                self.log(f"step {self.frame:,}/{cfg.frames:,}: {self.episodes:,} episodes, last 20 returns "
                         f"{np.mean(self.episode_returns[-20:]):.2f}, {self.updates:,} updates, "
                         f"{self.frame / max(self.seconds, 1e-9):.0f} steps/s{self.progress()}")
                last_log = self.frame
            if self.frame >= self.next_eval:
                self.evaluate()
                self.next_eval += cfg.eval_every
            if self.frame >= cfg.frames:
                self.save()
                return self.net.eval()
            if self.frame >= self.next_save:
                self.save()
                self.next_save += cfg.save_every

    def _play_episode(self) -> None:
        env = self.env
        obs, episode_return = env.reset(), 0.0
        self.on_episode_start()
        while True:
            action = self.act(obs)
            next_obs, reward, done = env.step(action)
            self.record(obs, action, reward, next_obs, done and not env.truncated)
            self.frame += 1
            episode_return += reward
            self.learn()
            if done:
                self.episodes += 1
                self.episode_returns.append(episode_return)
                return
            obs = next_obs
