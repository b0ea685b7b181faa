"""Games behind one small interface: :class:`~lowbit.rl.envs.base.Env`.

    env = make_env("breakout", seed=0)         # MinAtar (10x10xC boolean frames)
    env = make_env("ale/pong", seed=0)         # the Atari 2600 through gymnasium + ale-py
    obs = env.reset()                          # uint8 [C, H, W]
    obs, reward, done = env.step(action)

MinAtar games: ``breakout``, ``asterix``, ``freeway``, ``seaquest``, ``space_invaders``. ALE games
are ``ale/<rom>`` with any ROM ale-py ships (``ale/pong``, ``ale/breakout``, ``ale/space_invaders``).
Both packages are GPL and live in the optional extra ``lowbit[rl]``; they are imported when a
game is made, so ``import lowbit.rl`` works without them.
"""

from __future__ import annotations

from lowbit.errors import GameError
from lowbit.rl.envs.ale import AtariEnv
from lowbit.rl.envs.base import Env, import_extra
from lowbit.rl.envs.minatar import MinAtarEnv

MINATAR_GAMES = ("breakout", "asterix", "freeway", "seaquest", "space_invaders")
ALE_PREFIX = "ale/"


def is_ale(game: str) -> bool:
    return game.startswith(ALE_PREFIX)


def check_game(game: str) -> str:
    """``game`` itself when it names a MinAtar game or an ``ale/<rom>``; else :class:`GameError`."""
    if game in MINATAR_GAMES or (is_ale(game) and len(game) > len(ALE_PREFIX)):
        return game
    raise GameError(f"unknown game {game!r}: choose a MinAtar game {list(MINATAR_GAMES)} "
                    f"or an Atari ROM as 'ale/<name>' (e.g. 'ale/pong')")


def make_env(game: str, seed: int = 0, **options) -> Env:
    """A seeded environment for ``game``; ``options`` go to the game family's class
    (:class:`~lowbit.rl.envs.minatar.MinAtarEnv` or :class:`~lowbit.rl.envs.ale.AtariEnv`).

    Raises :class:`GameError` for an unknown game and :class:`~lowbit.errors.MissingExtraError`
    (saying ``pip install lowbit[rl]``) when the game's package is not installed.
    """
    check_game(game)
    if is_ale(game):
        return AtariEnv(game[len(ALE_PREFIX):], seed, **options)
    return MinAtarEnv(game, seed, **options)


__all__ = ["ALE_PREFIX", "Env", "MINATAR_GAMES", "check_game", "import_extra", "is_ale", "make_env"]
