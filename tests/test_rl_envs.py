"""The game interface: names, the optional extra, seeding, restoring the random state, Atari frames."""

import subprocess
import sys

import numpy as np
import pytest

from lowbit.errors import GameError, MissingExtraError
from lowbit.rl.envs import check_game, make_env
from tests.rl_support import needs_ale, needs_minatar


def test_unknown_game_names_the_choices():
    with pytest.raises(GameError, match="unknown game 'pong'.*breakout.*ale/pong"):
        make_env("pong")
    with pytest.raises(GameError):
        check_game("ale/")


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minatar", None)  # makes `import minatar` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install lowbit\[rl\]"):
        make_env("breakout")


def test_lowbit_rl_imports_without_the_games():
    code = ("import sys\nfor m in ('minatar', 'gymnasium', 'ale_py', 'cv2'): sys.modules[m] = None\n"
            "import lowbit, lowbit.rl, lowbit.cli\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def play(env, actions):
    frames = [env.reset()]
    for a in actions:
        obs, _, done = env.step(a)
        frames.append(env.reset() if done else obs)
    return np.stack(frames)


@needs_minatar
def test_minatar_frames_and_seeding():
    env = make_env("space_invaders", seed=3)
    assert env.obs_shape == (6, 10, 10) and env.num_actions == 6 and env.obs_scale == 1.0
    actions = np.random.default_rng(0).integers(6, size=300)
    a, b = play(env, actions), play(make_env("space_invaders", seed=3), actions)
    assert a.dtype == np.uint8 and a.shape == (301, 6, 10, 10) and set(np.unique(a)) <= {0, 1}
    assert np.array_equal(a, b)
    assert not np.array_equal(a, play(make_env("space_invaders", seed=4), actions))
    assert env.frame_rgb().shape == (10, 10, 3)


@needs_minatar
def test_minatar_random_state_restores_exactly():
    env = make_env("asterix", seed=1)
    play(env, [1, 2, 3] * 20)
    saved = env.rng_state()
    actions = np.random.default_rng(5).integers(6, size=200)
    first = play(env, actions)
    env.set_rng_state(saved)
    assert np.array_equal(first, play(env, actions))


@needs_minatar
def test_minatar_episode_cap_truncates():
    env = make_env("freeway", seed=0, max_episode_steps=5)
    env.reset()
    dones = [env.step(0)[2] for _ in range(5)]
    assert dones == [False] * 4 + [True] and env.truncated


@needs_ale
def test_atari_preprocessing():
    env = make_env("ale/pong", seed=0)
    obs = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and env.obs_scale == pytest.approx(1 / 255)
    assert env.num_actions == 6
    for _ in range(10):
        obs, reward, done = env.step(0)
    assert obs.shape == (4, 84, 84) and not done and obs.max() > 0
    with pytest.raises(GameError, match="no ROM"):
        make_env("ale/not_a_game")
