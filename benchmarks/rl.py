"""Low-precision policy distillation against direct low-precision DQN on the MinAtar games.

    OMP_NUM_THREADS=1 python benchmarks/rl.py [--games breakout,...] [--frames 50000] [--precisions 8,4,2,ternary]
    python benchmarks/rl.py --table-only        # rebuild the RESULTS.md section from the stored rows
    OMP_NUM_THREADS=1 python benchmarks/rl.py --engine-speed   # time every exported student's engine together

For each game with a shipped teacher (``lowbit/zoo/checkpoints/dqn-<game>.safetensors``, trained by
``benchmarks/rl_teachers.py``) and each student precision, one student is trained by policy
distillation from the teacher (:func:`lowbit.rl.students.distill_student`, the command
``lowbit rl distill``) and one directly by double DQN (:func:`lowbit.rl.students.dqn_student`,
``lowbit rl teach --bits --epsilon-frames``, exploring over a fifth of a short budget), both for
the same number of environment steps (``--frames``), and each
is scored on 100 seeded test episodes (mean +- std of the return, % of the teacher's test return,
agreement of greedy actions with the teacher on the student's own states). The distilled W2A2 and
ternary/binary students are exported (``lowbit.export``) and played by the integer engine:
decisions per second of one core's CPU time at batch 1 (against the console's 60 frames/s), the
export's size on disk, and the fraction of the student's states on which the engine picks the
fake-quant student's action. Every student is also scored on 30 validation games (seeded apart
from the test games); ``--init-from-teacher`` starts distilled students from the teacher's float
weights instead of random ones, and where both starts were run the targets count the one of higher
validation return. Rows are appended to ``docs/results/rl.json`` as each finishes;
a row already there (same game, method, recipe, architecture, steps and seed) is skipped, and
each run resumes from its folder under ``runs/rl`` when killed, so the script can be restarted.

Engine speed per training row is timed whenever that row finishes, so rows timed while other jobs
shared the core differ by up to 2x for the same network. ``--engine-speed`` times every game's W2A2
and ternary/binary network in one run instead: rounds of 500 frames, the networks interleaved within
each round, and each network's best round kept (the least-disturbed measurement, as ``timeit``
advises); the target counts these rows (``docs/results/rl_engine.json``). The network timed is the
saved student of the row the targets count when its run folder is here, else the same architecture
and recipe quantized from the teacher's weights: the engine runs the same integer operations
whatever the weights' values. An Atari row times a W2A2 Nature-DQN network on ALE Pong's frames the same
way (no Atari teacher is shipped: see :func:`atari_network`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from results_page import load_rows, store_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.rl.distill import DistillConfig  # noqa: E402
from lowbit.rl.dqn import DQNConfig  # noqa: E402
from lowbit.rl.envs import MINATAR_GAMES, make_env  # noqa: E402
from lowbit.rl.evaluate import TEST_SEED, VALIDATION_SEED, evaluate_policy, frames_per_second  # noqa: E402
from lowbit.rl.students import (CALIB_FRAMES, PRECISIONS, STUDENT_DIR, build_student, distill_student,  # noqa: E402
                                dqn_student, load_student, play_frames, student_recipe)
from lowbit.rl.teach import load_teacher, read_teacher_meta  # noqa: E402
from lowbit.zoo.teachers import teacher_path  # noqa: E402

ROWS = ROOT / "docs" / "results" / "rl.json"
ENGINE_ROWS = ROOT / "docs" / "results" / "rl_engine.json"
ENGINE_ROUNDS = 5
ALE_ENGINE_GAME = "ale/pong"
TEACHER_ROWS = ROOT / "docs" / "results" / "rl_teachers.json"
ENGINE_PRECISIONS = ("2", "ternary")
CONSOLE_FPS = 60
SEED = 0


VALIDATION_EPISODES = 30


def key(row: dict) -> tuple:
    return (row["game"], row["method"], row["recipe"], row["arch"], row["config"]["frames"], row["config"]["seed"],
            bool(row.get("init_from_teacher")))


def run_folder(runs, game: str, method: str, precision: str, arch: str, frames: int, from_teacher: bool) -> Path:
    return Path(runs) / game / (f"{method}-{precision}-{arch}-{frames}" + ("-from-teacher" if from_teacher else ""))


def validation_return(student, game: str) -> float:
    """Mean return over VALIDATION_EPISODES games seeded apart from the test games: what a choice
    between students (their start, for one) is made on."""
    return evaluate_policy(student, game, episodes=VALIDATION_EPISODES, seed=VALIDATION_SEED).mean


def chosen_rows(rows: list[dict]) -> list[dict]:
    """Per game, method and precision, the distilled student of the higher validation return (started from
    random weights or from the teacher's); every DQN row."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["game"], r["method"], r["precision"], r["arch"], r["config"]["frames"])
        if k not in best or (r.get("validation_return") or float("-inf")) > (best[k].get("validation_return")
                                                                             or float("-inf")):
            best[k] = r
    return list(best.values())


def engine_figures(student, game: str) -> dict:
    """Export the student, then time the integer engine and check its actions against the student's."""
    frames = play_frames(game, 1000, policy=student, epsilon=0.05, seed=TEST_SEED).float()
    with tempfile.TemporaryDirectory() as tmp:
        folder = lowbit.export(student, Path(tmp) / "export")
        size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        engine = lowbit.deploy.IntegerEngine.from_path(folder)
        with torch.no_grad():
            same = (engine.predict(frames) == student(frames).argmax(dim=1)).float().mean().item()
        fps = frames_per_second(engine, frames[:500], repeats=2)
    fake_fps = frames_per_second(student, frames[:500], repeats=2)
    return {"engine_fps": fps, "fake_quant_fps": fake_fps, "export_bytes": size, "engine_same_action": same}


def engine_network(game: str, precision: str, rows: list[dict], runs) -> tuple[torch.nn.Module, str]:
    """The network whose engine ``--engine-speed`` times, and where it came from (see the module docstring)."""
    teacher, tmeta = load_teacher(teacher_path(game), game)
    for r in chosen_rows(rows):
        if (r["game"], r["method"], r["precision"]) == (game, "distill", precision):
            folder = run_folder(runs, game, "distill", precision, r["arch"], r["config"]["frames"],
                                bool(r.get("init_from_teacher"))) / STUDENT_DIR
            if folder.is_dir():
                return load_student(folder)[0], "trained student"
    calib = play_frames(game, CALIB_FRAMES, policy=teacher)
    student = build_student(tmeta["arch"], tmeta["obs_shape"], tmeta["num_actions"], student_recipe(precision),
                            calib, obs_scale=tmeta["obs_scale"], init_weights=teacher)
    return student.eval(), "teacher's weights, quantized"


def atari_network(precision: str) -> torch.nn.Module:
    """A Nature-DQN network on ALE Pong's 4x84x84 frames, seeded random weights quantized with the student
    recipe and calibrated on random play: no Atari teacher is shipped (it needs more compute than this CPU
    has), and the engine's speed does not depend on the weights' values."""
    env = make_env(ALE_ENGINE_GAME, SEED)
    calib = play_frames(ALE_ENGINE_GAME, 64, seed=SEED)
    return build_student("nature", env.obs_shape, env.num_actions, student_recipe(precision), calib,
                         obs_scale=env.obs_scale, seed=SEED).eval()


def engine_speed(args) -> None:
    """Time the integer engine of every game's W2A2 and ternary/binary network together (module docstring),
    and of a W2A2 Nature-DQN network on Atari frames (:func:`atari_network`)."""
    rows, engines = load_rows(ROWS), {}
    with tempfile.TemporaryDirectory() as tmp:
        for game in [g for g in args.games.split(",") if teacher_path(g).is_file()]:
            for precision in ENGINE_PRECISIONS:
                net, source = engine_network(game, precision, rows, args.runs)
                folder = lowbit.export(net, Path(tmp) / f"{game}-{precision}")
                frames = play_frames(game, 500, policy=net, seed=TEST_SEED).float()
                engines[(game, precision)] = (lowbit.deploy.IntegerEngine.from_path(folder), frames, source)
        net = atari_network("2")
        folder = lowbit.export(net, Path(tmp) / "atari-2", arch="nature")
        frames = play_frames(ALE_ENGINE_GAME, 30, seed=TEST_SEED).float() * make_env(ALE_ENGINE_GAME).obs_scale
        engines[(ALE_ENGINE_GAME, "2")] = (lowbit.deploy.IntegerEngine.from_path(folder), frames,
                                           "Nature DQN, random weights, quantized")
        best = {k: 0.0 for k in engines}
        for _ in range(ENGINE_ROUNDS):
            for k, (engine, frames, _) in engines.items():
                best[k] = max(best[k], frames_per_second(engine, frames))
    for (game, precision), fps in best.items():
        store_row(ENGINE_ROWS, {"game": game, "precision": precision, "engine_fps": fps, "rounds": ENGINE_ROUNDS,
                                "frames": len(engines[(game, precision)][1]), "network": engines[(game, precision)][2]},
                  key=lambda r: (r["game"], r["precision"]))
        print(f"{game} {precision}: {fps:,.0f} decisions/s ({engines[(game, precision)][2]})", flush=True)


def dqn_epsilon_frames(frames: int) -> int:
    """Steps over which the direct-DQN student's epsilon decays: MinAtar's 100,000, or a fifth of a
    shorter budget, so that exploration ends within the run (our choice; MinAtar's teachers explore
    for 2 % of their 5M steps)."""
    return min(100_000, max(1, frames // 5))


def run_row(game: str, method: str, precision: str, args) -> dict:
    recipe = student_recipe(precision)
    arch = args.arch or read_teacher_meta(teacher_path(game))["arch"]
    from_teacher = method == "distill" and args.init_from_teacher
    run_dir = run_folder(args.runs, game, method, precision, arch, args.frames, from_teacher)
    resume = (run_dir / "last.safetensors").is_file()
    log = lambda msg: print(f"[{game} {method} {precision}] {msg}", flush=True)  # noqa: E731
    if method == "distill":
        cfg = DistillConfig(game=game, frames=args.frames, seed=args.seed)
        student, row = distill_student(cfg, teacher_path(game), recipe, run_dir, arch=arch, resume=resume,
                                       init_from_teacher=from_teacher, test_episodes=args.test_episodes, log=log)
    else:
        cfg = DQNConfig(game=game, frames=args.frames, seed=args.seed, arch=arch,
                        epsilon_frames=dqn_epsilon_frames(args.frames))
        student, row = dqn_student(cfg, recipe, run_dir, teacher_path=teacher_path(game), resume=resume,
                                   test_episodes=args.test_episodes, log=log)
    row["precision"] = precision
    row["validation_return"] = validation_return(student, game)
    if method == "distill" and precision in ENGINE_PRECISIONS:
        row.update(engine_figures(student, game))
    row.pop("curve", None)
    return row


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table() -> str:
    rows, teachers = load_rows(ROWS), {t["game"]: t for t in load_rows(TEACHER_ROWS)}
    if not rows and not teachers:
        return "No rows yet: run `python benchmarks/rl.py`."
    names = {"8": "W8A8", "4": "W4A4", "2": "W2A2", "ternary": "ternary/binary"}
    out = ["Teachers: float double DQN (MinAtar reference network, 132k parameters on Breakout), trained by "
           "`benchmarks/rl_teachers.py`; return over 100 seeded test episodes (greedy, MinAtar's sticky actions).", "",
           "| game | teacher return | steps | minutes | validation curve (10 episodes each) |", "|---|---|---|---|---|"]
    for game in MINATAR_GAMES:
        if game in teachers:
            t = teachers[game]
            curve = " · ".join(f"{p['frame'] // 1000}k: {p['mean']:.1f}" for p in t.get("curve", []))
            out.append(f"| {game} | {t['mean_return']:.2f} +- {t['std_return']:.2f} | {t['frames']:,} | "
                       f"{t['minutes']:.0f} | {curve or '-'} |")
    out += ["", "Students (every layer at the stated precision, LSQ steps; `rl-*` recipes), trained for the same "
            "number of environment steps by policy distillation (KL on softmax(Q_T / 0.01), teacher play with "
            "epsilon 0.05) or directly by double DQN (MinAtar reference settings, except that epsilon reaches 0.1 "
            "after a fifth of a budget under 500,000 steps); test episodes per student: "
            f"{', '.join(str(n) for n in sorted({r['test_episodes'] for r in rows})) or '-'}. Agreement: share of the "
            "student's own states on which its greedy action is the teacher's. Minutes are wall-clock on a shared "
            "2-core machine. Each row is rerun (resumed if its run folder exists) by `python benchmarks/rl.py "
            "--games GAME --precisions P --methods METHOD --frames STEPS` (P: 8, 4, 2 or ternary).", "",
            "Start: the distilled student's float weights before quantization, seeded random or the teacher's "
            "(`--init-from-teacher`); where both were run, the targets count the one of higher validation return "
            f"(mean over {VALIDATION_EPISODES} validation games, seeded apart from the test games; '-' where the "
            "saved student was not kept to score).", "",
            "| game | precision | method | start | return | % of teacher | agreement | validation return | steps | "
            "minutes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(["8", "4", "2", "ternary"])}
    for r in sorted(rows, key=lambda r: (MINATAR_GAMES.index(r["game"]) if r["game"] in MINATAR_GAMES else 99,
                                         order.get(r["precision"], 9), r["method"] != "distill", r["arch"],
                                         bool(r.get("init_from_teacher")))):
        arch = "" if r["arch"] == "minatar" else f" ({r['arch']})"
        out.append(f"| {r['game']} | {names.get(r['precision'], r['precision'])}{arch} | {r['method']} | "
                   f"{'teacher' if r.get('init_from_teacher') else 'random'} | "
                   f"{r['mean_return']:.2f} +- {r['std_return']:.2f} | {fmt(r['percent_of_teacher'], '.1f')} | "
                   f"{fmt(r['agreement'], '.3f')} | {fmt(r.get('validation_return'))} | {r['frames']:,} | "
                   f"{r['minutes']:.0f} |")
    engine = [r for r in rows if "engine_fps" in r]
    if engine:
        out += ["", "Exported distilled students played by the integer engine (`lowbit.deploy.IntegerEngine`), one "
                "frame at a time, decisions per second of one core's CPU time (1 torch thread), against the "
                f"console's {CONSOLE_FPS} frames/s:", "",
                "| game | precision | engine decisions/s | x 60 fps | fake-quant decisions/s | export bytes | "
                "engine = fake-quant action |", "|---|---|---|---|---|---|---|"]
        for r in engine:
            out.append(f"| {r['game']} | {names.get(r['precision'], r['precision'])} | {r['engine_fps']:,.0f} | "
                       f"{r['engine_fps'] / CONSOLE_FPS:.0f} | {r['fake_quant_fps']:,.0f} | {r['export_bytes']:,} | "
                       f"{100 * r['engine_same_action']:.1f} % |")
    timed = load_rows(ENGINE_ROWS)
    if timed:
        out += ["", f"The same engines timed together (`--engine-speed`: one run, every network interleaved in "
                f"{ENGINE_ROUNDS} rounds of 500 frames (30 Atari frames), each network's best round; 1 torch thread, CPU "
                "time):", "",
                "| game | precision | engine decisions/s | x 60 fps | network timed |", "|---|---|---|---|---|"]
        for r in timed:
            out.append(f"| {r['game']} | {names.get(r['precision'], r['precision'])} | {r['engine_fps']:,.0f} | "
                       f"{r['engine_fps'] / CONSOLE_FPS:.0f} | {r['network']} |")
    out += ["", targets(chosen_rows(rows), timed)]
    return "\n".join(out)


def targets(rows: list[dict], timed: list[dict]) -> str:
    def games_over(precision: str, percent: float) -> list[str]:
        return sorted({r["game"] for r in rows if r["method"] == "distill" and r["precision"] == precision
                       and r["percent_of_teacher"] is not None and r["percent_of_teacher"] >= percent})
    measured = sorted({r["game"] for r in rows})
    w2, tb = games_over("2", 90.0), games_over("ternary", 75.0)
    fast = [r for r in (timed or rows) if "engine_fps" in r and r["precision"] == "2" and r["game"] in MINATAR_GAMES]
    atari = [r["engine_fps"] for r in timed if r["game"] == ALE_ENGINE_GAME]
    slowest = min((r["engine_fps"] for r in fast), default=None)
    return (f"Targets, on the {len(measured)} game(s) measured so far ({', '.join(measured) or 'none'}): "
            f"W2A2 by distillation >= 90 % of the teacher on {len(w2)} game(s) ({', '.join(w2) or 'none'}; target 4 "
            f"of 5); ternary/binary >= 75 % on {len(tb)} ({', '.join(tb) or 'none'}; target 3 of 5); integer engine "
            f"on the W2A2 students: slowest {fmt(slowest, ',.0f')} decisions/s"
            f"{' timed together' if timed else ''} (target >= 1,000)"
            + (f"; on Atari frames (Nature DQN, W2A2) {atari[0]:,.0f} decisions/s (target >= 60)." if atari else "."))


def validate_stored(args) -> None:
    """Score the saved student of every stored row without a validation return on the validation games."""
    for row in load_rows(ROWS):
        if row.get("validation_return") is not None:
            continue
        folder = run_folder(args.runs, row["game"], row["method"], row["precision"], row["arch"],
                            row["config"]["frames"], bool(row.get("init_from_teacher"))) / STUDENT_DIR
        if not folder.is_dir():
            print(f"{row['game']} {row['method']} {row['precision']}: no saved student at {folder}; left as is")
            continue
        student, _ = load_student(folder)
        store_row(ROWS, {**row, "validation_return": validation_return(student, row["game"])}, key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", default=",".join(MINATAR_GAMES), help="comma-separated MinAtar games")
    ap.add_argument("--precisions", default="8,4,2,ternary", help=f"student precisions among {sorted(PRECISIONS)}")
    ap.add_argument("--methods", default="distill,dqn", help="distill and/or dqn")
    ap.add_argument("--frames", type=int, default=50_000, help="environment steps per student (both methods)")
    ap.add_argument("--arch", help="student Q-network (default: the teacher's)")
    ap.add_argument("--test-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "rl"), help="folder of the resumable runs")
    ap.add_argument("--init-from-teacher", action="store_true",
                    help="distilled students start from the teacher's float weights (default: seeded random)")
    ap.add_argument("--validate-stored", action="store_true",
                    help="add the validation return to stored rows that lack it, from their saved students")
    ap.add_argument("--engine-speed", action="store_true",
                    help="time every game's exported W2A2 and ternary/binary engine together (module docstring)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the RESULTS.md section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.validate_stored:
        validate_stored(args)
    elif args.engine_speed:
        engine_speed(args)
    elif not args.table_only:
        done = {key(r) for r in load_rows(ROWS)}
        for game in args.games.split(","):
            if not teacher_path(game).is_file():
                print(f"{game}: no shipped teacher yet (benchmarks/rl_teachers.py); skipped", flush=True)
                continue
            arch = args.arch or read_teacher_meta(teacher_path(game))["arch"]
            for precision in args.precisions.split(","):
                for method in args.methods.split(","):
                    from_teacher = method == "distill" and args.init_from_teacher
                    if (game, method, student_recipe(precision), arch, args.frames, args.seed, from_teacher) in done:
                        continue
                    store_row(ROWS, run_row(game, method, precision, args), key)
                    write_section("rl", "Reinforcement learning: low-precision policy distillation (MinAtar)",
                                  table(), args.seed)
    write_section("rl", "Reinforcement learning: low-precision policy distillation (MinAtar)", table(), args.seed)


if __name__ == "__main__":
    main()
