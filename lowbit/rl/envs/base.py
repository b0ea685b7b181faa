"""The interface every game offers the agents, and the guarded import of the optional packages."""

from __future__ import annotations

import importlib

import numpy as np

from lowbit.errors import MissingExtraError


def import_extra(module: str, package: str):
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{package} is not installed ({exc}); the games are an optional extra: "
                                "pip install lowbit[rl]") from exc


class Env:
    """One game, seeded. Observations are ``uint8`` arrays ``[C, H, W]``; multiply by
    :attr:`obs_scale` to get the network's float input (1 for MinAtar's 0/1 frames, 1/255 for
    Atari pixels).

    ``step`` returns ``(obs, reward, done)``; ``done`` is true at the end of the game and when the
    episode reaches ``max_episode_steps`` (a cap of ours against policies that never finish an
    episode, such as a perfect Breakout paddle); ``truncated`` tells the two apart for
    bootstrapping. ``reset`` starts a new episode.
    """

    game: str
    num_actions: int
    obs_shape: tuple[int, int, int]
    obs_scale: float = 1.0
    truncated: bool = False

    def reset(self) -> np.ndarray:
        raise NotImplementedError

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        raise NotImplementedError

    def frame_rgb(self) -> np.ndarray:
        """The current screen as ``uint8 [H, W, 3]`` (for GIFs)."""
        raise NotImplementedError

    def rng_state(self) -> dict | None:
        """Everything random about the game between episodes, to resume a run exactly; None when
        the game cannot be restored (then a resumed run reseeds it)."""
        return None

    def set_rng_state(self, state: dict) -> None:
        raise NotImplementedError
