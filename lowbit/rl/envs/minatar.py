"""MinAtar (Young & Tian 2019): five Atari-like games on a 10x10 grid of C boolean channels.

The game runs with MinAtar's defaults, as its reference DQN was trained: sticky actions with
probability 0.1 and difficulty ramping on. Frames become ``uint8 [C, 10, 10]`` of 0/1.
"""

from __future__ import annotations

import numpy as np

from lowbit.rl.envs.base import Env, import_extra

DEFAULT_MAX_EPISODE_STEPS = 10_000  # our cap (MinAtar has none; only Freeway ends on a timer)


def _palette(n: int) -> np.ndarray:
    """``n + 1`` RGB colours: black background, then evenly spaced bright hues, one per channel."""
    hues = np.arange(n) / max(n, 1)
    rgb = 0.5 + 0.45 * np.cos(2 * np.pi * (hues[:, None] + np.array([0.0, 1 / 3, 2 / 3])))
    return np.concatenate([np.zeros((1, 3)), rgb]).__mul__(255).astype(np.uint8)


class MinAtarEnv(Env):
    def __init__(self, game: str, seed: int = 0, *, sticky_action_prob: float = 0.1, ramping: bool = True,
                 max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS):
        minatar = import_extra("minatar", "minatar")
        self.game = game
        self._env = minatar.Environment(game, sticky_action_prob=sticky_action_prob, difficulty_ramping=ramping)
        self._env.seed(seed)
        h, w, c = self._env.state_shape()
        self.obs_shape = (c, h, w)
        self.num_actions = self._env.num_actions()
        self.max_episode_steps = max_episode_steps
        self._colours = _palette(c)
        self._steps = 0

    def _obs(self) -> np.ndarray:
        return np.ascontiguousarray(self._env.state().transpose(2, 0, 1), dtype=np.uint8)

    def reset(self) -> np.ndarray:
        self._env.reset()
        self._steps, self.truncated = 0, False
        return self._obs()

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        reward, terminal = self._env.act(int(action))
        self._steps += 1
        self.truncated = not terminal and self._steps >= self.max_episode_steps
        return self._obs(), float(reward), bool(terminal) or self.truncated

    def frame_rgb(self) -> np.ndarray:
        state = self._env.state()  # [H, W, C] booleans; a later channel paints over an earlier one
        index = np.max(state * np.arange(1, state.shape[2] + 1), axis=2)
        return self._colours[index]

    def rng_state(self) -> dict:
        _, keys, pos, has_gauss, gauss = self._env.random.get_state()
        return {"keys": np.asarray(keys, dtype=np.int64), "pos": int(pos), "has_gauss": int(has_gauss),
                "gauss": float(gauss), "last_action": int(self._env.last_action)}

    def set_rng_state(self, state: dict) -> None:
        keys = np.asarray(state["keys"], dtype=np.uint32)
        self._env.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))
        self._env.last_action = state["last_action"]
