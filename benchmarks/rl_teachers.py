"""Train the five MinAtar DQN teachers one after another and ship them in the zoo.

Each game trains in ``runs/teachers/<game>`` (resumed when a run is already there, so the script
can be killed and restarted, or rerun with more ``--frames`` to extend every teacher), then its
checkpoint is copied to ``lowbit/zoo/checkpoints/dqn-<game>.safetensors`` (+ sidecar) and a row
is appended to ``docs/results/rl_teachers.json``.

    OMP_NUM_THREADS=1 python benchmarks/rl_teachers.py --frames 500000
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lowbit.rl.dqn import DQNConfig  # noqa: E402
from lowbit.rl.envs import MINATAR_GAMES  # noqa: E402
from lowbit.rl.teach import TEACHER_FILE, teach  # noqa: E402
from lowbit.zoo.teachers import install_teacher  # noqa: E402
from results_page import store_row  # noqa: E402

ROWS = ROOT / "docs" / "results" / "rl_teachers.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", default=",".join(MINATAR_GAMES), help="comma-separated MinAtar games, in order")
    ap.add_argument("--frames", type=int, default=1_000_000, help="environment steps per teacher")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "teachers"), help="folder of the resumable runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for game in args.games.split(","):
        run_dir = Path(args.runs) / game
        shown = os.path.relpath(run_dir, ROOT) if run_dir.resolve().is_relative_to(ROOT) else str(run_dir)
        command = f"lowbit rl teach --game {game} --frames {args.frames} --seed {args.seed} --out {shlex.quote(shown)}"
        config = DQNConfig(game=game, frames=args.frames, seed=args.seed)
        _, meta = teach(config, run_dir, resume=(run_dir / "last.safetensors").is_file(), command=command,
                        log=lambda msg: print(msg, flush=True))
        install_teacher(run_dir / TEACHER_FILE, game)
        store_row(ROWS, {k: meta[k] for k in ("game", "frames", "minutes", "mean_return", "std_return", "test_episodes",
                                               "command", "curve")}, key=lambda r: r["game"])


if __name__ == "__main__":
    main()
