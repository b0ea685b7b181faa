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
import re
import shutil
from pathlib import Path

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def canonical_sha256(data) -> str:
    """SHA-256 (hex) of ``data`` as sorted, compact, ASCII JSON. Raises ``ValueError`` for NaN or infinity
    and ``TypeError`` for anything JSON cannot hold."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def temporary_path(path: str | os.PathLike) -> Path:
    """The name a file is written under before :func:`os.replace` publishes it: the same folder, hidden,
    and this process's own (``.NAME.PID.tmp``), so that processes writing one file (sharded ALPS runs,
    ranks) never write into each other's temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``; returns ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy the file ``source`` to ``path`` through a temporary file and ``os.replace``; returns ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON (one trailing newline) through :func:`write_text_atomic`; returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def loads_json(data: bytes | str):
    """``json.loads`` that refuses NaN and Infinity (not JSON) as well as malformed text: ``ValueError``
    (``UnicodeDecodeError`` for bytes that are not UTF-8, ``RecursionError`` for absurd nesting)."""
    def reject(name: str):
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data, parse_constant=reject)


def is_file_record(entry) -> bool:
    """Whether ``entry`` is ``{"sha256": 64 lowercase hex digits, "bytes": size}`` (what :func:`file_record` gives)."""
    return isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and \
        SHA256_HEX.fullmatch(entry["sha256"]) is not None and isinstance(entry.get("bytes"), int) and \
        not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0


def file_record(data: bytes) -> dict:
    """``{"sha256": ..., "bytes": ...}`` of a file's content, as another file lists it."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_listed(path: Path, record: dict, *, listed_in: str, field: str, error: type[Exception], fix: str) -> bytes:
    """The bytes of ``path``, which ``listed_in`` lists under ``field`` with :func:`file_record` ``record``: its
    size is checked before it is read, then its SHA-256. Each mismatch raises ``error`` naming the file, the
    listing field and ``fix``."""
    if not path.is_file():
        raise error(f"{path}: missing ({listed_in} lists it, field {field}); {fix}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise error(f"{path}: {size} bytes, {listed_in} (field {field}.bytes) says {record['bytes']}: the file was "
                    f"truncated, extended or replaced; {fix}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise error(f"{path}: SHA-256 {digest[:16]}... does not match {listed_in} (field {field}.sha256) "
                    f"{record['sha256'][:16]}...: the file was modified or replaced; {fix}")
    return data


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header, from its bytes (``{}`` when it has none).
    Raises ``ValueError`` for a header that is cut short or not a JSON object."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError(f"the header claims {n} bytes, the file has {max(len(data) - 8, 0)} after its length field")
    header = loads_json(data[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(meta or {}, dict):
        raise ValueError("the header is not a JSON object with a metadata object")
    return meta or {}
