"""The files users keep (checkpoints, sidecars, manifests): written atomically, and digested.

A file is written under a temporary name in its own folder and moved over the target with
``os.replace``, which is atomic on POSIX and Windows: an interrupted write leaves the previous
file (or none), never a truncated one.

:func:`canonical_sha256` digests JSON-like data independently of key order and layout, so a
digest of a manifest or a metadata file can be stored in another file (a safetensors header)
and checked against the file as read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def canonical_sha256(data) -> str:
    """SHA-256 (hex) of ``data`` as sorted, compact, ASCII JSON. Raises ``ValueError`` for NaN or infinity
    and ``TypeError`` for anything JSON cannot hold."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
