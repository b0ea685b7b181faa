"""Low-precision students: built with ``lowbit.quantize``, trained by distillation or directly by
DQN, scored against their teacher, saved with ``lowbit.save``.

    qnet, row = distill_student(DistillConfig(game="breakout"), teacher_path, "rl-w2a2", "runs/w2")
    qnet, row = dqn_student(DQNConfig(game="breakout", frames=100_000), "rl-w2a2", "runs/w2-dqn")

Shipped student recipes (:data:`PRECISIONS`): W8A8, W4A4, W2A2 and ternary weights with binary
activations, every layer at that precision. The student's float weights start from a seeded
random initialisation (``init_from_teacher=True`` starts from the teacher's, when the shapes
match); its activation steps are calibrated on ``CALIB_FRAMES`` frames of teacher play
(distillation) or random play (DQN).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.checkpoint import load_into
from lowbit.errors import CheckpointError, RecipeError
from lowbit.files import write_json_atomic
from lowbit.prepare import quantize
from lowbit.recipe import load_recipe
from lowbit.rl.distill import DistillConfig, DistillRun
from lowbit.rl.dqn import DQNConfig, DQNRun
from lowbit.rl.envs import make_env
from lowbit.rl.evaluate import TEST_SEED, evaluate_policy
from lowbit.rl.policy import greedy_actions
from lowbit.rl.teach import load_teacher
from lowbit.serialize import load as load_quantized, save as save_quantized
from lowbit.zoo.qnets import create_qnet

PRECISIONS = {"8": "rl-w8a8", "4": "rl-w4a4", "2": "rl-w2a2", "ternary": "rl-ternary-binary"}
CALIB_FRAMES = 512
CALIB_SEED = 3_000_000  # calibration games never share a seed with training, validation or test games
STUDENT_DIR = "student"


def student_recipe(bits: str) -> str:
    """The shipped recipe of a precision name (``"8"``, ``"4"``, ``"2"``, ``"ternary"``)."""
    if str(bits) not in PRECISIONS:
        raise RecipeError(f"unknown student precision {bits!r}; choose one of {sorted(PRECISIONS)} "
                          "or pass a recipe")
    return PRECISIONS[str(bits)]


def play_frames(game: str, count: int, *, policy: nn.Module | None = None, epsilon: float = 0.05,
                seed: int = CALIB_SEED, env_options: dict | None = None) -> torch.Tensor:
    """``count`` frames (``uint8 [count, C, H, W]``) of ``game`` played by ``policy``'s greedy action
    with probability ``1 - epsilon``, or at random (``policy=None``)."""
    env = make_env(game, seed, **(env_options or {}))
    rng = np.random.default_rng(seed)
    frames, obs = [], env.reset()
    while len(frames) < count:
        frames.append(obs)
        if policy is None or rng.random() < epsilon:
            action = int(rng.integers(env.num_actions))
        else:
            action = int(greedy_actions(policy, obs[None], env.obs_scale)[0])
        obs, _, done = env.step(action)
        if done:
            obs = env.reset()
    return torch.from_numpy(np.stack(frames))


def build_student(arch: str, obs_shape, num_actions: int, recipe, calib_frames: torch.Tensor, *, seed: int = 0,
                  obs_scale: float = 1.0, init_weights: nn.Module | None = None) -> nn.Module:
    """A ``lowbit.quantize``d Q-network ``arch`` calibrated on ``calib_frames``; float weights seeded
    random, or copied from ``init_weights`` (CheckpointError when the shapes differ)."""
    torch.manual_seed(seed)
    net = create_qnet(arch, tuple(obs_shape), num_actions)
    if init_weights is not None:
        load_into(net, init_weights.state_dict())
    return quantize(net, recipe, calib_data=[calib_frames.float() * obs_scale])


def save_student(qnet: nn.Module, folder: str | os.PathLike, meta: dict) -> Path:
    """``lowbit.save`` the student to ``folder`` with ``meta`` (game, arch, frame shape, actions, scores)."""
    return save_quantized(qnet, folder, extra={"rl": meta})


def load_student(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """A student saved by :func:`save_student` (eval mode) and its metadata."""
    side = Path(folder) / "lowbit.json"
    try:
        meta = json.loads(side.read_text())["rl"]
        net = create_qnet(meta["arch"], tuple(meta["obs_shape"]), meta["num_actions"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: not a student saved by lowbit rl ({exc})") from exc
    return load_quantized(folder, net), meta


def _score(qnet: nn.Module, run, game: str, *, teacher: nn.Module | None, teacher_return: float | None,
           test_episodes: int, env_options: dict, method: str, recipe) -> dict:
    result = evaluate_policy(qnet, game, episodes=test_episodes, seed=TEST_SEED, teacher=teacher,
                             env_options=env_options)
    recipe_name = str(recipe) if isinstance(recipe, (str, os.PathLike)) else load_recipe(recipe).sections.get("name")
    return {"game": game, "method": method, "recipe": recipe_name, "mean_return": result.mean,
            "std_return": result.std, "test_episodes": test_episodes, "agreement": result.agreement,
            "teacher_return": teacher_return,
            "percent_of_teacher": None if not teacher_return else 100.0 * result.mean / teacher_return,
            "frames": run.frame, "updates": run.updates, "minutes": round(run.seconds / 60, 2),
            "curve": run.evals, "config": run.config_dict()}


def distill_student(config: DistillConfig, teacher_path: str | os.PathLike, recipe, run_dir: str | os.PathLike, *,
                    arch: str | None = None, init_from_teacher: bool = False, resume: bool = False,
                    test_episodes: int = 100, log=print) -> tuple[nn.Module, dict]:
    """Distil the teacher at ``teacher_path`` into a student made with ``recipe`` (a recipe name,
    dict or file); train in ``run_dir``, score on ``test_episodes`` test episodes, save the student
    to ``run_dir/student``. Returns ``(student, result row)``.

    ``arch``: the student's Q-network (default: the teacher's). Raises :class:`~lowbit.errors.GameError`
    for a teacher of another game.
    """
    teacher, tmeta = load_teacher(teacher_path, config.game)
    arch = arch or tmeta["arch"]
    calib = play_frames(config.game, CALIB_FRAMES, policy=teacher, epsilon=config.epsilon,
                        seed=CALIB_SEED + config.seed, env_options=config.env_options)
    student = build_student(arch, tmeta["obs_shape"], tmeta["num_actions"], recipe, calib, seed=config.seed,
                            obs_scale=tmeta["obs_scale"], init_weights=teacher if init_from_teacher else None)
    run = DistillRun(config, run_dir, teacher=teacher, student=student, resume=resume, log=log)
    student = run.train()
    row = _score(student, run, config.game, teacher=teacher, teacher_return=tmeta["mean_return"],
                 test_episodes=test_episodes, env_options=config.env_options, method="distill", recipe=recipe)
    row.update(arch=arch, teacher=str(teacher_path), init_from_teacher=init_from_teacher)
    _finish(student, run_dir, row, tmeta, arch)
    log(f"{config.game} distilled ({row['recipe']}, {arch}): {row['mean_return']:.2f} +- {row['std_return']:.2f}, "
        f"{row['percent_of_teacher'] or 0:.1f}% of the teacher, agreement {row['agreement']:.3f}")
    return student, row


def dqn_student(config: DQNConfig, recipe, run_dir: str | os.PathLike, *, teacher_path=None,
                resume: bool = False, test_episodes: int = 100, log=print) -> tuple[nn.Module, dict]:
    """Train a student made with ``recipe`` directly by DQN (the paper's comparison) in ``run_dir``;
    score it (against the teacher at ``teacher_path`` when given) and save it to ``run_dir/student``."""
    teacher, tmeta = load_teacher(teacher_path, config.game) if teacher_path is not None else (None, None)
    env = make_env(config.game, config.seed, **config.env_options)
    calib = play_frames(config.game, CALIB_FRAMES, seed=CALIB_SEED + config.seed, env_options=config.env_options)
    student = build_student(config.arch, env.obs_shape, env.num_actions, recipe, calib, seed=config.seed,
                            obs_scale=env.obs_scale)
    run = DQNRun(config, run_dir, net=student, resume=resume, log=log)
    student = run.train()
    row = _score(student, run, config.game, teacher=teacher, teacher_return=tmeta and tmeta["mean_return"],
                 test_episodes=test_episodes, env_options=config.env_options, method="dqn", recipe=recipe)
    row.update(arch=config.arch, teacher=None if teacher_path is None else str(teacher_path))
    meta = tmeta or {"obs_shape": list(env.obs_shape), "num_actions": env.num_actions, "obs_scale": env.obs_scale}
    _finish(student, run_dir, row, meta, config.arch)
    log(f"{config.game} direct DQN ({row['recipe']}): {row['mean_return']:.2f} +- {row['std_return']:.2f}")
    return student, row


def _finish(student: nn.Module, run_dir, row: dict, tmeta: dict, arch: str) -> None:
    meta = {"game": row["game"], "arch": arch, "obs_shape": list(tmeta["obs_shape"]),
            "num_actions": tmeta["num_actions"], "obs_scale": tmeta["obs_scale"],
            **{k: row[k] for k in ("method", "recipe", "mean_return", "std_return", "agreement", "frames")}}
    save_student(student, Path(run_dir) / STUDENT_DIR, meta)
    write_json_atomic(Path(run_dir) / "result.json", row)
