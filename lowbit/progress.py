"""A progress bar for long loops: tqdm when installed and writing to a terminal, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(iterable: Iterable, desc: str, *, enabled: bool | None = None) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar (on stderr) when ``enabled`` (default: stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:  # tqdm is optional: plain iteration without it
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
