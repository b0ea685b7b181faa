"""Double DQN (van Hasselt et al. 2016) with MinAtar's reference settings (Young & Tian 2019).

    y = r + gamma * (1 - terminal) * Q_target(s', argmax_a Q_online(s', a))
    loss = Huber(Q_online(s, a) - y)                       (smooth L1, as MinAtar's dqn.py)

One gradient step per environment step on a batch of 32 transitions drawn uniformly from a
replay memory of the last 100,000, after 5,000 random-policy steps; the target network is copied
from the online one every 1,000 steps; RMSProp (lr 2.5e-4, smoothing 0.95, centred, eps 0.01);
epsilon-greedy with epsilon decayed linearly from 1 to 0.1 over the 100,000 steps after those. Every
setting sits in :class:`DQNConfig`. ``double=False`` gives MinAtar's plain DQN target
(``max_a Q_target(s', a)``). An episode cut short by the step cap bootstraps (it is not terminal).

The same loop trains a teacher (a float network) and the paper's baseline, a low-precision
network trained directly by DQN: pass a ``lowbit.quantize``d network as ``net``.

A run folder holds ``last.safetensors`` (the resumable state: both networks, the optimizer, the
replay memory, every random-number state; written atomically at the first episode end after each
``save_every`` steps, so a resumed MinAtar run continues exactly as if never stopped) and
``evals.json`` (the validation curve, a row per evaluation).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import CheckpointError, LowbitError
from lowbit.qat.state import (NonFiniteError, check_compatible, fingerprint, load_training_state, model_tensors,
                              optimizer_from_flat, save_training_state)
from lowbit.rl.envs import Env, make_env
from lowbit.rl.evaluate import VALIDATION_SEED, evaluate_policy
from lowbit.rl.policy import as_input, greedy_actions, linear_epsilon
from lowbit.rl.replay import Replay
from lowbit.zoo.qnets import create_qnet


@dataclass
class DQNConfig:
    game: str = "breakout"
    frames: int = 1_000_000  # environment steps (4 emulator frames each on Atari)
    seed: int = 0
    arch: str = "minatar"  # lowbit.zoo.qnets, when no network is passed in
    batch_size: int = 32
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
    eval_every: int = 100_000  # steps between validation evaluations (at the next episode end)
    eval_episodes: int = 10
    save_every: int = 50_000  # steps between resumable checkpoints (at the next episode end)
    env_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("frames", "batch_size", "replay_size", "update_every", "target_update", "epsilon_frames",
                     "eval_every", "eval_episodes", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LowbitError(f"DQNConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 < self.gamma <= 1.0 or not math.isfinite(self.lr) or self.lr <= 0:
            raise LowbitError(f"DQNConfig needs 0 < gamma <= 1 and lr > 0, got gamma={self.gamma}, lr={self.lr}")


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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class DQNRun:
    """One DQN training run: build with a config and a folder, call :meth:`train`."""

    def __init__(self, config: DQNConfig, run_dir: str | os.PathLike, *, net: nn.Module | None = None,
                 resume: bool = False, log=print):
        self.cfg, self.dir, self.log = config, Path(run_dir), log
        self.env: Env = make_env(config.game, config.seed, **config.env_options)
        torch.manual_seed(config.seed)
        self.online = net if net is not None else create_qnet(config.arch, self.env.obs_shape, self.env.num_actions)
        self.online.train()
        self.target = copy.deepcopy(self.online).eval()
        self.optimizer = torch.optim.RMSprop(self.online.parameters(), lr=config.lr, alpha=config.rms_alpha,
                                             eps=config.rms_eps, centered=config.rms_centered)
        shape = self.env.obs_shape
        self.memory = Replay(config.replay_size, obs=(shape, torch.uint8), action=((), torch.int64),
                             reward=((), torch.float32), next_obs=(shape, torch.uint8), terminal=((), torch.bool))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.frame, self.episodes, self.updates, self.seconds = 0, 0, 0, 0.0
        self.episode_returns: list[float] = []
        self.evals: list[dict] = []
        self.next_eval, self.next_save = config.eval_every, config.save_every
        if resume:
            self._resume()

    # ----- checkpoint -----------------------------------------------------------------
    def _config_dict(self) -> dict:
        return asdict(self.cfg)

    def save(self) -> None:
        meta = {"step": self.frame, "config": self._config_dict(), "fingerprint": fingerprint(self.online),
                "episodes": self.episodes, "updates": self.updates, "seconds": self.seconds,
                "episode_returns": self.episode_returns, "evals": self.evals,
                "next_eval": self.next_eval, "next_save": self.next_save,
                "rng": self.rng.bit_generator.state, "env_rng": self._env_rng_meta()}
        extra = {f"target.{k}": v for k, v in self.target.state_dict().items()}
        extra.update(self.memory.state())
        extra["generator"] = self.generator.get_state()
        env_rng = self.env.rng_state()
        if env_rng is not None:
            extra["env_rng_keys"] = torch.from_numpy(env_rng["keys"])
        save_training_state(self.dir, self.online, self.optimizer, meta, extra)

    def _env_rng_meta(self) -> dict | None:
        state = self.env.rng_state()
        return None if state is None else {k: v for k, v in state.items() if k != "keys"}

    def _resume(self) -> None:
        loaded = load_training_state(self.dir)
        if loaded is None:
            raise CheckpointError(f"{self.dir}: nothing to resume (no last.safetensors); start without --resume")
        tensors, meta = loaded
        check_compatible(meta, self.online, self._config_dict(), frozenset({"frames"}), str(self.dir))
        self.online.load_state_dict(model_tensors(tensors))
        self.target.load_state_dict({k[len("target."):]: v for k, v in tensors.items() if k.startswith("target.")})
        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.memory.load_state(tensors)
        self.generator.set_state(tensors["generator"])
        self.rng.bit_generator.state = meta["rng"]
        if meta["env_rng"] is not None:
            self.env.set_rng_state(dict(meta["env_rng"], keys=tensors["env_rng_keys"].numpy()))
        else:  # a game that cannot restore its state: reseed it, deterministically, from the resume point
            self.env = make_env(self.cfg.game, self.cfg.seed + meta["step"], **self.cfg.env_options)
        self.frame, self.episodes, self.updates = meta["step"], meta["episodes"], meta["updates"]
        self.seconds, self.episode_returns, self.evals = meta["seconds"], meta["episode_returns"], meta["evals"]
        self.next_eval, self.next_save = meta["next_eval"], meta["next_save"]
        self.log(f"resumed {self.dir} at step {self.frame:,} ({self.episodes:,} episodes)")

    # ----- training -------------------------------------------------------------------
    def _act(self, obs: np.ndarray) -> int:
        cfg = self.cfg
        if self.frame < cfg.replay_start or self.rng.random() < self.epsilon():
            return int(self.rng.integers(self.env.num_actions))
        return int(greedy_actions(self.online, obs[None], self.env.obs_scale)[0])

    def epsilon(self) -> float:
        """The exploration rate now: 1 -> 0.1 over ``epsilon_frames`` steps from the end of the random
        ``replay_start`` steps (as MinAtar's dqn.py)."""
        cfg = self.cfg
        return linear_epsilon(max(0, self.frame - cfg.replay_start), cfg.epsilon_start, cfg.epsilon_end,
                              cfg.epsilon_frames)

    def _update(self) -> None:
        batch = self.memory.sample(self.cfg.batch_size, self.generator)
        loss = td_loss(self.online, self.target, batch, gamma=self.cfg.gamma, double=self.cfg.double,
                       obs_scale=self.env.obs_scale)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"the TD loss became {loss.item()} at step {self.frame:,}; the last checkpoint "
                                 f"in {self.dir} is kept: lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def _evaluate(self) -> None:
        result = evaluate_policy(self.online, self.cfg.game, episodes=self.cfg.eval_episodes, seed=VALIDATION_SEED,
                                 env_options=self.cfg.env_options)
        row = {"frame": self.frame, "mean": result.mean, "std": result.std, "episodes": len(result.returns),
               "minutes": self.seconds / 60}
        self.evals.append(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "evals.json", self.evals)
        self.log(f"step {self.frame:,}: validation return {result.mean:.2f} +- {result.std:.2f} "
                 f"({len(result.returns)} episodes)")

    def train(self) -> nn.Module:
        """Run until the first episode end at or after ``config.frames`` steps (so a run always stops
        where it can resume exactly); save; return the online network (in eval mode)."""
        cfg, env = self.cfg, self.env
        obs, episode_return = env.reset(), 0.0
        start, last_log = time.perf_counter(), self.frame
        if self.frame >= cfg.frames:
            return self.online.eval()
        while True:
            action = self._act(obs)
            next_obs, reward, done = env.step(action)
            terminal = done and not env.truncated
            train_reward = max(-1.0, min(1.0, reward)) if cfg.clip_rewards else reward
            self.memory.add(obs=obs, action=action, reward=train_reward, next_obs=next_obs, terminal=terminal)
            self.frame += 1
            episode_return += reward
            if self.frame > cfg.replay_start and self.frame % cfg.update_every == 0:
                self._update()
            if self.frame % cfg.target_update == 0:
                self.target.load_state_dict(self.online.state_dict())
            if not done:
                obs = next_obs
                continue
            self.episodes += 1
            self.episode_returns.append(episode_return)
            obs, episode_return = env.reset(), 0.0
            now = time.perf_counter()
            self.seconds, start = self.seconds + now - start, now
            if self.frame - last_log >= 10_000:
                recent = self.episode_returns[-20:]
                self.log(f"step {self.frame:,}/{cfg.frames:,}: {self.episodes:,} episodes, last 20 returns "
                         f"{np.mean(recent):.2f}, epsilon {self.epsilon():.3f}, "
                         f"{self.updates:,} updates, {self.frame / max(self.seconds, 1e-9):.0f} steps/s")
                last_log = self.frame
            if self.frame >= self.next_eval:
                self._evaluate()
                self.next_eval += cfg.eval_every
            if self.frame >= cfg.frames:
                self.save()
                return self.online.eval()
            if self.frame >= self.next_save:
                self.save()
                self.next_save += cfg.save_every
