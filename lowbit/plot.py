"""matplotlib for the plots lowbit writes to files (demo, frontier, benchmarks), when it is installed."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None without matplotlib (the ``plot`` extra)."""
    try:  # matplotlib is optional: callers skip their plot without it
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend, as matplotlib requires

    return plt
