"""The Atari 2600 through gymnasium + ale-py, with the standard DQN preprocessing.

``ALE/<Rom>-v5`` with the emulator's own frame skip off, then gymnasium's ``AtariPreprocessing``
(up to 30 no-op starts, frame skip 4 with the max of the last two frames, 84x84 grey) and a stack
of the last 4 frames: observations ``uint8 [4, 84, 84]``. Sticky actions with probability 0.25 as
in v5 (Machado et al. 2018). Rewards are returned as the game gives them; the DQN clips them to
[-1, 1] for training only (``DQNConfig.clip_rewards``). Episodes end at game over, or after
``max_episode_steps`` agent steps (27,000 = 108,000 frames, the usual 30-minute cap).
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import GameError
from lowbit.rl.envs.base import Env, import_extra

FRAME_SKIP, SCREEN, STACK = 4, 84, 4


def rom_id(rom: str) -> str:
    """``space_invaders`` -> ``ALE/SpaceInvaders-v5``."""
    return "ALE/" + "".join(part.capitalize() for part in rom.split("_")) + "-v5"


class AtariEnv(Env):
    obs_scale = 1.0 / 255.0

    def __init__(self, rom: str, seed: int = 0, *, sticky_action_prob: float = 0.25, noop_max: int = 30,
                 max_episode_steps: int = 27_000):
        gym = import_extra("gymnasium", "gymnasium")
        ale_py = import_extra("ale_py", "ale-py")
        import_extra("cv2", "opencv-python")  # AtariPreprocessing resizes with OpenCV
        gym.register_envs(ale_py)
        self.game = "ale/" + rom
        try:
            env = gym.make(rom_id(rom), frameskip=1, repeat_action_probability=sticky_action_prob,
                           max_episode_steps=max_episode_steps * FRAME_SKIP)
        except gym.error.Error as exc:
            raise GameError(f"ale-py has no ROM for {rom!r} ({exc}); see ale_py's list of games") from exc
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=FRAME_SKIP, screen_size=SCREEN)
        self._env = gym.wrappers.FrameStackObservation(env, STACK)
        self._seed = seed
        self._seeded = False
        self.obs_shape = (STACK, SCREEN, SCREEN)
        self.num_actions = int(self._env.action_space.n)

    def reset(self) -> np.ndarray:
        obs, _ = self._env.reset(seed=None if self._seeded else self._seed)
        self._seeded, self.truncated = True, False
        return np.asarray(obs, dtype=np.uint8)

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, truncated, _ = self._env.step(int(action))
        self.truncated = bool(truncated) and not terminated
        return np.asarray(obs, dtype=np.uint8), float(reward), bool(terminated or truncated)

    def frame_rgb(self) -> np.ndarray:
        return self._env.unwrapped.ale.getScreenRGB()
