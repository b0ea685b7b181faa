"""``lowbit rl teach | distill | eval | play``: low-precision policy distillation on the command line.

    lowbit rl teach   --game breakout --frames 1000000                 # float double-DQN teacher
    lowbit rl teach   --game breakout --bits 2 --frames 100000         # a 2-bit network trained directly by DQN
    lowbit rl distill --game breakout --bits 2                         # distil the shipped teacher into W2A2
    lowbit rl eval    --game breakout --student lowbit-rl/distill-breakout-2/student --engine
    lowbit rl play    --game breakout --student lowbit-rl/distill-breakout-2/student --gif breakout.gif

A thin layer over :mod:`lowbit.rl`; the games need the optional extra ``lowbit[rl]``.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import IntegerEngine
from lowbit.errors import LowbitError
from lowbit.rl.distill import DistillConfig
from lowbit.rl.dqn import DQNConfig
from lowbit.rl.envs import check_game, make_env
from lowbit.rl.evaluate import TEST_SEED, evaluate_policy, frames_per_second
from lowbit.rl.gif import record_episode, write_gif
from lowbit.rl.students import (PRECISIONS, distill_student, dqn_student, load_student, play_frames,
                                student_recipe)
from lowbit.rl.teach import TEACHER_FILE, load_teacher, teach
from lowbit.zoo.teachers import install_teacher, shipped_teacher, teacher_path


def _command(args) -> str:
    return "lowbit " + shlex.join(args.argv)


def _recipe(args):
    if args.recipe and args.bits:
        raise LowbitError("pass --bits or --recipe, not both")
    return args.recipe or (student_recipe(args.bits) if args.bits else None)


def _teacher(args) -> Path:
    return Path(args.teacher) if args.teacher else shipped_teacher(args.game)


def _optional_teacher(game: str, given: str | None) -> Path | None:
    if given:
        return Path(given)
    return teacher_path(game) if teacher_path(game).is_file() else None


def _print_row(row: dict) -> None:
    pct = "" if row.get("percent_of_teacher") is None else f", {row['percent_of_teacher']:.1f}% of the teacher"
    agree = "" if row.get("agreement") is None else f", agreement {row['agreement']:.3f}"
    print(f"{row['game']} {row['method']} {row['recipe']}: return {row['mean_return']:.2f} +- {row['std_return']:.2f} "
          f"over {row['test_episodes']} episodes{pct}{agree}; {row['frames']:,} steps, {row['minutes']:.1f} min")


def _export(student, out: Path, arch: str) -> None:
    folder = lowbit.export(student, out / "export", arch=arch)
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    print(f"exported to {folder} ({size:,} bytes); play it with `lowbit rl play --export {folder}`")


def cmd_teach(args) -> None:
    check_game(args.game)
    recipe = _recipe(args)
    kind = f"dqn-{args.game.replace('/', '-')}" + (f"-{args.bits or Path(str(recipe)).stem}" if recipe else "")
    out = Path(args.out or Path("lowbit-rl") / kind)
    cfg = DQNConfig(game=args.game, frames=args.frames, seed=args.seed, arch=args.arch,
                    epsilon_frames=args.epsilon_frames, clip_rewards=args.game.startswith("ale/"))
    if recipe is None:
        if args.teacher:
            raise LowbitError("--teacher scores a low-precision DQN student against a teacher; a float teacher "
                              "run takes no --teacher")
        _, meta = teach(cfg, out, resume=args.resume, test_episodes=args.test_episodes, command=_command(args))
        print(f"teacher written to {out / TEACHER_FILE} (return {meta['mean_return']:.2f} +- {meta['std_return']:.2f})")
        if args.into_zoo:
            print(f"installed as {install_teacher(out / TEACHER_FILE, args.game)}")
        return
    if args.into_zoo:
        raise LowbitError("--into-zoo ships float teachers; a low-precision DQN student is not one")
    student, row = dqn_student(cfg, recipe, out, teacher_path=_optional_teacher(args.game, args.teacher),
                               resume=args.resume, test_episodes=args.test_episodes)
    _print_row(row)
    if args.export:
        _export(student, out, cfg.arch)


def cmd_distill(args) -> None:
    check_game(args.game)
    recipe = _recipe(args) or student_recipe("2")
    tag = args.bits or Path(str(recipe)).stem
    out = Path(args.out or Path("lowbit-rl") / f"distill-{args.game.replace('/', '-')}-{tag}")
    cfg = DistillConfig(game=args.game, frames=args.frames, seed=args.seed, tau=args.tau, epsilon=args.epsilon,
                        student_acting=args.student_acting, lr=args.lr, replay_size=args.replay_size)
    student, row = distill_student(cfg, _teacher(args), recipe, out, arch=args.arch,
                                   init_from_teacher=args.init_from_teacher, resume=args.resume,
                                   test_episodes=args.test_episodes)
    _print_row(row)
    if args.export:
        _export(student, out, row["arch"])


def _policy(args):
    """The network (or integer engine) that ``eval``/``play`` runs, and a name for it."""
    given = [flag for flag in ("teacher", "student", "export") if getattr(args, flag)]
    if len(given) > 1:
        raise LowbitError(f"pass one of --teacher, --student, --export (got {', '.join('--' + g for g in given)})")
    if args.export:
        return IntegerEngine.from_path(args.export), f"integer engine {args.export}"
    if args.student:
        student, meta = load_student(args.student)
        if meta["game"] != args.game:
            raise LowbitError(f"{args.student} plays {meta['game']!r}, not {args.game!r}")
        if args.engine:
            return IntegerEngine.from_model(student), f"integer engine of {args.student}"
        return student, f"student {args.student}"
    if args.engine:
        raise LowbitError("--engine runs a low-precision student; pass --student (or --export)")
    path = _teacher(args)
    return load_teacher(path, args.game)[0], f"teacher {path}"


def cmd_eval(args) -> None:
    check_game(args.game)
    policy, name = _policy(args)
    student = args.student or args.export  # a teacher is not scored against a teacher
    against = _optional_teacher(args.game, args.against) if student else None
    teacher = load_teacher(against, args.game)[0] if against is not None else None
    start = time.perf_counter()
    result = evaluate_policy(policy, args.game, episodes=args.episodes, seed=args.seed, teacher=teacher)
    seconds = time.perf_counter() - start
    agree = "" if result.agreement is None else f", agreement with {against}: {result.agreement:.3f}"
    print(f"{name} on {args.game}: return {result.mean:.2f} +- {result.std:.2f} over {args.episodes} episodes "
          f"({result.frames:,} steps, {seconds:.1f} s){agree}")
    scale = make_env(args.game, args.seed).obs_scale
    frames = play_frames(args.game, 500, policy=policy, seed=args.seed).float() * scale
    fps = frames_per_second(policy, frames)
    print(f"one frame at a time: {fps:,.0f} decisions per second of CPU time ({torch.get_num_threads()} thread(s); "
          f"{fps / 60:.1f}x the 60 frames/s of the console)")


def cmd_play(args) -> None:
    check_game(args.game)
    policy, name = _policy(args)
    total, screens = record_episode(policy, args.game, seed=args.seed, max_steps=args.max_steps)
    print(f"{name} on {args.game}: return {total:.0f} in {len(screens) - 1} steps")
    if args.gif:
        print(f"wrote {write_gif(screens, args.gif, frames_per_second=args.gif_fps)}")


def register(subparsers) -> None:
    """Add ``lowbit rl`` and its four commands to the top-level parser's subparsers."""
    rl = subparsers.add_parser("rl", help="reinforcement learning: DQN teachers, low-precision policy distillation "
                               "(games: pip install lowbit[rl])")
    sub = rl.add_subparsers(dest="rl_command", required=True, metavar="RL_COMMAND")
    bits_help = (f"student precision: {', '.join(sorted(PRECISIONS))} (ternary weights, binary activations); "
                 "the shipped rl-* recipes")

    def common(sp, frames: int, what: str):
        sp.add_argument("--game", required=True, help="breakout, asterix, freeway, seaquest, space_invaders "
                        "(MinAtar) or ale/<rom> (Atari, e.g. ale/pong)")
        sp.add_argument("--frames", type=int, default=frames, help=f"environment steps of {what} (default {frames:,})")
        sp.add_argument("--seed", type=int, default=0, help="seed of the game, the network and the sampling")
        sp.add_argument("--out", help="run folder (checkpoints, evals.json, the result)")
        sp.add_argument("--resume", action="store_true", help="continue the run in --out (same settings)")
        sp.add_argument("--test-episodes", type=int, default=100, help="seeded test episodes scored at the end")
        sp.add_argument("--bits", choices=sorted(PRECISIONS), help=bits_help)
        sp.add_argument("--recipe", help="a recipe (YAML path or shipped name) instead of --bits")
        sp.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the low-precision student as a deployment folder OUT/export (default on)")

    sp = sub.add_parser("teach", help="train a float double-DQN teacher (or, with --bits, a low-precision DQN)")
    common(sp, 1_000_000, "training")
    sp.add_argument("--arch", default="minatar", help="Q-network: minatar (default), minatar-small, nature (Atari)")
    sp.add_argument("--teacher", help="with --bits: a teacher to measure action agreement against "
                    "(default: the shipped one, if any)")
    sp.add_argument("--epsilon-frames", type=int, default=100_000,
                    help="steps over which epsilon decays from 1 to 0.1 (default 100,000, MinAtar's)")
    sp.add_argument("--into-zoo", action="store_true", help="install the trained teacher as the shipped one")
    sp.set_defaults(func=cmd_teach)

    sp = sub.add_parser("distill", help="distil a teacher into a low-precision student")
    common(sp, DistillConfig.frames, "teacher play distilled")
    sp.add_argument("--teacher", help="teacher checkpoint (default: the shipped teacher of --game)")
    sp.add_argument("--arch", help="student Q-network: minatar or minatar-small (default: the teacher's)")
    sp.add_argument("--tau", type=float, default=0.01, help="teacher softmax temperature (default 0.01)")
    sp.add_argument("--epsilon", type=float, default=0.05, help="random actions while collecting states (0.05)")
    sp.add_argument("--student-acting", type=float, default=0.0,
                    help="probability that an episode is played by the student (DAgger-style; default 0)")
    sp.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    sp.add_argument("--replay-size", type=int, default=100_000, help="states kept for training (default 100,000)")
    sp.add_argument("--init-from-teacher", action="store_true", help="start from the teacher's weights "
                    "(same architecture) instead of a random initialisation")
    sp.set_defaults(func=cmd_distill)

    for name, helptext, func in (("eval", "score a teacher, student or export over seeded episodes", cmd_eval),
                                 ("play", "play one episode; --gif writes it as an animated GIF", cmd_play)):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--game", required=True, help="the game the policy plays")
        sp.add_argument("--teacher", help="a teacher checkpoint (default when nothing else is given: the shipped one)")
        sp.add_argument("--student", help="a student folder written by distill or teach --bits (OUT/student)")
        sp.add_argument("--export", help="an exported student (OUT/export), run by the integer engine")
        sp.add_argument("--engine", action="store_true", help="run --student through the integer engine")
        sp.add_argument("--seed", type=int, default=TEST_SEED, help=f"first episode's game seed (default {TEST_SEED})")
        if name == "eval":
            sp.add_argument("--episodes", type=int, default=100, help="episodes (default 100)")
            sp.add_argument("--against", help="teacher to measure action agreement with (default: the shipped one)")
        else:
            sp.add_argument("--gif", help="write the episode to this .gif file")
            sp.add_argument("--gif-fps", type=float, default=15.0, help="GIF speed (default 15 frames/s)")
            sp.add_argument("--max-steps", type=int, default=2_000, help="stop the episode after this many steps")
        sp.set_defaults(func=func)
