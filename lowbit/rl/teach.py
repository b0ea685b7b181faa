"""Training a float DQN teacher and writing it as a checkpoint the distillation reads.

``teach(config, run_dir)`` trains (resumably, :mod:`lowbit.rl.dqn`), scores the final network on
``test_episodes`` seeded test episodes, and writes ``run_dir/teacher.safetensors`` with a JSON
sidecar: game, architecture, frame shape, actions, steps trained, test return (mean, std), the
validation curve, the settings and the command. :func:`load_teacher` reads one back and checks that
it is a teacher of the game asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from lowbit.checkpoint import load_into, save_checkpoint, sidecar_path
from lowbit.errors import CheckpointError, GameError
from lowbit.rl.dqn import DQNConfig, DQNRun
from lowbit.rl.envs import check_game
from lowbit.rl.evaluate import TEST_SEED, evaluate_policy
from lowbit.zoo.qnets import create_qnet

TEACHER_FILE = "teacher.safetensors"


def teach(config: DQNConfig, run_dir: str | os.PathLike, *, resume: bool = False, test_episodes: int = 100,
          command: str = "", log=print) -> tuple[nn.Module, dict]:
    """Train a DQN teacher for ``config.game``; return ``(network, sidecar metadata)``."""
    run = DQNRun(config, run_dir, resume=resume, log=log)
    net = run.train()
    result = evaluate_policy(net, config.game, episodes=test_episodes, seed=TEST_SEED, env_options=config.env_options)
    meta = {"game": config.game, "arch": config.arch, "obs_shape": list(run.env.obs_shape),
            "num_actions": run.env.num_actions, "obs_scale": run.env.obs_scale, "frames": run.frame,
            "episodes_trained": run.episodes, "minutes": round(run.seconds / 60, 2),
            "mean_return": result.mean, "std_return": result.std, "test_episodes": test_episodes,
            "test_seed": TEST_SEED, "curve": run.evals, "config": run.config_dict(), "command": command}
    save_checkpoint(net, Path(run_dir) / TEACHER_FILE, meta)
    log(f"{config.game}: teacher return {result.mean:.2f} +- {result.std:.2f} over {test_episodes} test episodes "
        f"after {run.frame:,} steps ({run.seconds / 60:.1f} min)")
    return net, meta


def read_teacher_meta(path: str | os.PathLike) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: no sidecar {side.name}; a teacher checkpoint is written by `lowbit rl teach`")
    try:
        return json.loads(side.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{side}: not valid JSON ({exc})") from exc


def load_teacher(path: str | os.PathLike, game: str | None = None) -> tuple[nn.Module, dict]:
    """The teacher network at ``path`` (eval mode) and its metadata.

    Raises :class:`GameError` when ``game`` is given and the teacher plays another game, and
    :class:`CheckpointError` when the weights do not fit the architecture the sidecar names.
    """
    meta = read_teacher_meta(path)
    if game is not None and meta.get("game") != check_game(game):
        raise GameError(f"{path} is a teacher for {meta.get('game')!r}, not {game!r}; "
                        f"train one with `lowbit rl teach --game {game}`")
    try:
        net = create_qnet(meta["arch"], tuple(meta["obs_shape"]), meta["num_actions"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the sidecar does not name a known architecture ({exc})") from exc
    return load_into(net, path).eval(), meta
