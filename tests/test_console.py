"""run-all's printed summary (refinery.console)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from refinery import console


def _summary(sources: int) -> str:
    by_source = {f"src-{i:04d}": {"accepted": i, "rejected": 1} for i in range(sources)}
    score = {"counts": {"rows_in": 9, "rows_out": 9, "quarantined": 0}, "timings": {"seconds": 1.0},
             "reused_from": None, "by_reason": {},
             "by_source": by_source, "by_category": {"accepted": sum(range(sources)), "rejected": sources}}
    out = io.StringIO()
    console.run_all_summary(SimpleNamespace(receipts={"score": score}, run_id="r", drift=None, seconds=1.0),
                            Console(file=out, width=200))
    return out.getvalue()


def test_the_sources_table_shows_every_source_when_they_are_few():
    text = _summary(console.SOURCES_SHOWN)
    assert all(f"src-{i:04d}" in text for i in range(console.SOURCES_SHOWN)) and "other sources" not in text


def test_the_sources_table_shows_the_largest_and_one_row_for_the_rest():
    """A source per file (an eval log per run) made run-all print thousands of rows."""
    n, shown = 700, console.SOURCES_SHOWN - 1
    text = _summary(n)
    largest = [f"src-{i:04d}" for i in range(n - shown, n)]
    assert all(s in text for s in largest) and f"src-{n - shown - 1:04d}" not in text
    rest = range(n - shown)
    assert f"{n - shown:,} other sources" in text and f"{sum(rest):,}" in text  # their accepted rows, summed
    assert f"`refinery receipts --json` lists all {n:,}" in text
    assert len(text.splitlines()) < shown + 20
