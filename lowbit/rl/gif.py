"""Recording an episode and writing it as an animated GIF (pillow, from the ``data``/``dev`` extras)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import MissingExtraError
from lowbit.files import temporary_path
from lowbit.rl.envs import make_env
from lowbit.rl.evaluate import TEST_SEED, Policy
from lowbit.rl.policy import as_input, checked_q


@torch.no_grad()
def record_episode(policy: nn.Module | Policy, game: str, *, seed: int = TEST_SEED, max_steps: int = 2_000,
                   env_options: dict | None = None) -> tuple[float, list[np.ndarray]]:
    """Play one greedy episode (at most ``max_steps`` steps); return its return and the RGB screens."""
    env = make_env(game, seed, **(env_options or {}))
    obs, total, screens = env.reset(), 0.0, []
    if isinstance(policy, nn.Module):
        policy.eval()
    for _ in range(max_steps):
        screens.append(env.frame_rgb())
        action = int(checked_q(policy, as_input(obs[None], env.obs_scale)).argmax(dim=1)[0])
        obs, reward, done = env.step(action)
        total += reward
        if done:
            break
    screens.append(env.frame_rgb())
    return total, screens


def write_gif(screens: list[np.ndarray], path: str | os.PathLike, *, frames_per_second: float = 15.0,
              min_side: int = 160) -> Path:
    """Write RGB screens (``uint8 [H, W, 3]``) as a looping GIF, each pixel repeated so the shorter
    side is at least ``min_side`` (MinAtar's 10x10 becomes 160x160). Written atomically."""
    try:  # deferred: pillow is optional (the data and dev extras)
        from PIL import Image
    except ImportError as exc:
        raise MissingExtraError(f"writing a GIF needs pillow ({exc}): pip install pillow") from exc
    if not screens:
        raise ValueError("no screens to write")
    repeat = max(1, -(-min_side // min(screens[0].shape[:2])))
    images = [Image.fromarray(np.kron(s, np.ones((repeat, repeat, 1), dtype=np.uint8))) for s in screens]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / frames_per_second))
    os.replace(tmp, path)
    return path
