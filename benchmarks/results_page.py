"""Write one suite's section of docs/RESULTS.md, stamped with command, seed, commit and machine.

Each suite owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; running a
suite rebuilds its section from scratch and leaves the others alone.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from lowbit.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
LOCK = ROOT / "runs" / ".results.lock"  # runs/ is ignored by git
HEADER = ("# lowbit results\n\nEvery figure on this page is written by a script in `benchmarks/`; "
          "each section names the command that regenerates it, the seed, the git commit and the machine.\n")


def load_rows(path: Path) -> list[dict]:
    """The rows a suite has stored in ``path`` so far (none when it does not exist yet)."""
    return json.loads(path.read_text()) if path.is_file() else []


@contextlib.contextmanager
def results_lock():
    """Hold the lock every writer of docs/results and docs/RESULTS.md takes for its read-modify-write, so that
    suites running side by side never drop each other's rows or sections."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_row(path: Path, row: dict, key=lambda r: r["key"]) -> None:
    """Store ``row`` in ``path`` in place of any stored row with the same ``key(row)`` (default: its "key"
    field), written atomically, so that a suite killed at any moment keeps every row it finished."""
    with results_lock():
        rows = [r for r in load_rows(path) if key(r) != key(row)] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, rows)


def load_keyed_rows(path: Path) -> dict[str, dict]:
    """The ``{key: row}`` a suite has stored in ``path`` so far (empty when it does not exist yet)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def store_keyed_row(path: Path, key: str, row: dict) -> None:
    """Store ``row`` under ``key`` in ``path``'s ``{key: row}``, stamped with the commit and the thread count,
    and print it. The file is re-read first (another suite may have written to it meanwhile) and written
    atomically."""
    with results_lock():
        rows = load_keyed_rows(path)
        rows[key] = {**row, "commit": COMMIT, "threads": torch.get_num_threads()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, rows, sort_keys=True)
    print(json.dumps(rows[key], sort_keys=True), flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The checked-out commit, ``+uncommitted changes`` if tracked files other than the results
    (``docs/RESULTS.md``, its plots and the row stores in ``docs/results/``, which the suites
    write) differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!docs/RESULTS.md", ":!docs/*.png", ":!docs/results/"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COMMIT = git_commit()  # taken when the suite starts: the code that produced its numbers


def stamp(seed: int) -> str:
    cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return (f"_Command: `{cmd}` · seed {seed} · commit {COMMIT} · {datetime.date.today().isoformat()} · "
            f"machine: {machine()}_")


def write_section(name: str, title: str, body: str, seed: int) -> None:
    """Replace (or append) the section ``name`` of docs/RESULTS.md."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    section = f"<!-- BEGIN {name} -->\n## {title}\n\n{stamp(seed)}\n\n{body.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    with results_lock():  # another suite may be rewriting another section of the same page
        text = RESULTS.read_text() if RESULTS.exists() else HEADER
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        write_text_atomic(RESULTS, text)
    print(f"updated section '{name}' of {RESULTS}")
