"""benchmarks/results_page: suites running side by side keep each other's rows and sections."""

import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import results_page  # noqa: E402


def _writer(tag: str, store: Path, n: int) -> None:
    for i in range(n):
        results_page.store_keyed_row(store, f"{tag}/{i}", {"i": i})
        results_page.write_section(f"{tag}{i % 3}", tag, f"row {i}", 0)


def test_parallel_writers_lose_no_row_and_no_section(tmp_path, monkeypatch):
    monkeypatch.setattr(results_page, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results_page, "LOCK", tmp_path / "lock")
    store = tmp_path / "rows.json"
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched paths
    procs = [ctx.Process(target=_writer, args=(tag, store, 15)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert set(results_page.load_keyed_rows(store)) == {f"{t}/{i}" for t in "ab" for i in range(15)}
    text = results_page.RESULTS.read_text()
    assert all(f"<!-- BEGIN {t}{k} -->" in text for t in "ab" for k in range(3))
