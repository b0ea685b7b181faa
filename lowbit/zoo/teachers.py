"""The shipped DQN teachers of :mod:`lowbit.rl`, one per MinAtar game.

``lowbit/zoo/checkpoints/dqn-<game>.safetensors`` holds the float Q-network trained by
``lowbit rl teach`` (its JSON sidecar records game, architecture, steps, test return and the
command). :func:`teacher_path` names the file; ``lowbit.rl.load_teacher`` loads and checks it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.checkpoint import sidecar_path
from lowbit.errors import CheckpointError
from lowbit.files import copy_atomic

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def teacher_path(game: str) -> Path:
    """Where the shipped teacher of ``game`` lives (``ale/pong`` -> ``dqn-ale-pong.safetensors``)."""
    return CHECKPOINT_DIR / f"dqn-{game.replace('/', '-')}.safetensors"


def shipped_teacher(game: str) -> Path:
    """:func:`teacher_path`, or :class:`CheckpointError` saying how to train it when it is not shipped."""
    path = teacher_path(game)
    if not path.is_file():
        raise CheckpointError(f"no shipped teacher for {game!r} ({path.name}); train one with "
                              f"`lowbit rl teach --game {game}` and pass it with --teacher")
    return path


def install_teacher(path: str | os.PathLike, game: str) -> Path:
    """Copy a teacher checkpoint (and its sidecar) to the zoo's file for ``game``, atomically."""
    dest = teacher_path(game)
    for src, dst in ((Path(path), dest), (sidecar_path(path), sidecar_path(dest))):
        copy_atomic(src, dst)
    return dest
