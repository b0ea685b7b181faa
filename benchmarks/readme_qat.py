"""Run the README's QAT command as a user would, and compare its test top-1 with the QAT row it reproduces.

    python benchmarks/readme_qat.py [--threads 1,2]

The command is read from README.md (the line of the "Reproduce a row" paragraph that starts with
``OMP_NUM_THREADS=1 lowbit qat``), run in a subprocess with ``python -m lowbit`` and its ``--checkpoint-dir``
pointed at a temporary folder; ``--threads`` reruns it with OMP_NUM_THREADS set to each count (the README's own
count is the first). Its result is the ``test_top1`` the CLI saves in ``lowbit.json``. The row it reproduces is
the group of ``docs/results/qat.json`` rows with the same model and recipe under the peer protocol (the recipe's
epochs, no distillation), over every seed run: "within the spread" means within two sample standard deviations
of that group's mean.

Rows go to docs/results/readme_qat.json (a rerun replaces the row of the same command and thread count); the
section "readme-qat" of docs/RESULTS.md is rewritten from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import ROOT, load_keyed_rows, load_rows, store_row, write_section  # noqa: E402

from lowbit.recipe import load_recipe  # noqa: E402

ROWS = ROOT / "docs" / "results" / "readme_qat.json"
QAT_ROWS = ROOT / "docs" / "results" / "qat.json"
PREFIX = "OMP_NUM_THREADS=1 lowbit qat "


def readme_command() -> list[str]:
    """The README's reproduction command, as arguments after ``lowbit``."""
    for line in (ROOT / "README.md").read_text().splitlines():
        line = line.strip().strip("`")
        if line.startswith(PREFIX):
            return shlex.split(line[len("OMP_NUM_THREADS=1 lowbit "):])
    raise SystemExit(f"README.md has no line starting with {PREFIX!r}")


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def reference(model: str, recipe: str) -> list[dict]:
    """The peer-protocol rows (every seed) of ``model`` and ``recipe`` in qat.json."""
    epochs = load_recipe(recipe).sections["qat"]["epochs"]
    return [r for r in load_keyed_rows(QAT_ROWS).values()
            if r["model"] == model and r["recipe"] == recipe and not r["distill"] and r["epochs"] == epochs
            and not r.get("progressive")]


def run(args: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if "--checkpoint-dir" in args:
            args = list(args)
            args[args.index("--checkpoint-dir") + 1] = tmp
        else:
            args = [*args, "--checkpoint-dir", tmp]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lowbit", *args], check=True, cwd=tmp,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        saved = json.loads(next(Path(tmp).rglob("lowbit.json")).read_text())
    return {"test_top1": round(saved["test_top1"], 2), "minutes": round((time.perf_counter() - start) / 60, 1)}


def write(rows: list[dict]) -> None:
    lines = ["The README's command for reproducing a QAT row, run as written (a subprocess of `python -m lowbit`, "
             "its checkpoints in a temporary folder) and with other thread counts, against the peer-protocol rows of "
             "the same model and recipe in section 'qat' (every seed). Within the spread: within two sample "
             "standard deviations of those seeds' mean. The README's command fixes one thread: float sums in "
             "another thread count take another path through training (section 'thread-determinism').", "",
             "| command | threads | test top-1 (%) | QAT row: mean +- std (seeds) | difference | within the spread | "
             "minutes |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["command"], r["threads"])):
        lines.append(f"| `{r['command']}` | {r['threads']} | {r['test_top1']:.2f} | {r['row_mean']:.2f} +- "
                     f"{r['row_std']:.2f} ({r['row_seeds']}) | {r['test_top1'] - r['row_mean']:+.2f} | "
                     f"{'yes' if r['within'] else 'no'} | {r['minutes']:.1f} |")
    write_section("readme-qat", "The README's QAT command against its row", "\n".join(lines), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1", help="comma-separated thread counts to run the command with")
    cli = ap.parse_args()
    args = readme_command()
    model, recipe = option(args, "--model"), option(args, "--recipe")
    seeds = reference(model, recipe)
    if len(seeds) < 2:
        raise SystemExit(f"qat.json has {len(seeds)} peer-protocol rows of {model} {recipe}: run benchmarks/qat.py "
                         "with --seeds first")
    mean, std = statistics.mean(r["test_top1"] for r in seeds), statistics.stdev(r["test_top1"] for r in seeds)
    command = "lowbit " + " ".join(a for a in args)
    for threads in [int(t) for t in cli.threads.split(",")]:
        got = run(args, threads)
        row = {"key": f"{command}/threads{threads}", "command": command, "threads": threads, **got,
               "row_mean": mean, "row_std": std, "row_seeds": len(seeds),
               "within": abs(got["test_top1"] - mean) <= 2 * std}
        store_row(ROWS, row)
        print(f"{threads} thread(s): {got['test_top1']:.2f} against {mean:.2f} +- {std:.2f} ({len(seeds)} seeds)",
              flush=True)
        write(load_rows(ROWS))


if __name__ == "__main__":
    main()
