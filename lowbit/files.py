"""Writing the files users keep (checkpoints, sidecars, manifests) atomically.

A file is written under a temporary name in its own folder and moved over the target with
``os.replace``, which is atomic on POSIX and Windows: an interrupted write leaves the previous
file (or none), never a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path


def temporary_path(path: str | os.PathLike) -> Path:
    """The name a file is written under before :func:`os.replace` publishes it (same folder)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``; returns ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
