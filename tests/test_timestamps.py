"""The one spelling refinery writes a time in: UTC, ISO 8601, six fractional digits, `Z`."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refinery.transform import UNDATED_AT, RowError, format_utc, parse_timestamp

WIDTH = len("2026-11-30T07:43:59.000000Z")
times = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC))


@pytest.mark.parametrize(("value", "want"), [
    ("2026-11-30T07:43:59Z", "2026-11-30T07:43:59.000000Z"),
    ("2026-11-30T07:43:59.5Z", "2026-11-30T07:43:59.500000Z"),
    ("2026-11-30T08:43:59+01:00", "2026-11-30T07:43:59.000000Z"),
    ("2026-11-30 07:43:59", "2026-11-30T07:43:59.000000Z"),  # naive is UTC
    ("2026-11-30", "2026-11-30T00:00:00.000000Z"),
    ("2026-11-30T07:43:59.123456Z", "2026-11-30T07:43:59.123456Z"),
    (1796024639, "2026-11-30T07:43:59.000000Z"),
    (1796024639250, "2026-11-30T07:43:59.250000Z"),  # milliseconds
    ("1796024639", "2026-11-30T07:43:59.000000Z"),
    (1796024639000000000, "2026-11-30T07:43:59.000000Z"),  # nanoseconds
])
def test_every_spelling_comes_out_in_the_one_fixed_width_form(value, want):
    assert parse_timestamp(value) == want
    assert len(UNDATED_AT) == WIDTH


@given(times, times)
def test_the_text_sorts_like_the_time(a, b):
    """Fixed width: `…:59Z` sorted after `…:59.5Z` while it was written without a fraction."""
    sa, sb = format_utc(a), format_utc(b)
    assert len(sa) == len(sb) == WIDTH
    assert (sa < sb) == (a < b)
    assert parse_timestamp(sa) == sa  # already canonical: kept as is


@pytest.mark.parametrize("value", ["2026-02-30T00:00:00.000000Z", "2026-02-30T00:00:00Z"])
def test_a_canonical_looking_time_that_does_not_exist_is_refused(value):
    with pytest.raises(RowError, match="not a valid time"):
        parse_timestamp(value)


def test_pyarrow_reads_the_written_spelling_back_as_a_string():
    """datasets.load_dataset("json") reads through pyarrow, which turns a column of whole-second
    ISO strings into datetimes; the written spelling must stay a string (tests/test_consumers.py
    round-trips whole exports)."""
    pj = pytest.importorskip("pyarrow.json")
    start = datetime(2026, 11, 30, 7, 43, 59, tzinfo=UTC)
    rows = [{"recorded_at": format_utc(start + timedelta(hours=i)), "at": UNDATED_AT} for i in range(3)]
    table = pj.read_json(io.BytesIO(b"".join(orjson.dumps(r) + b"\n" for r in rows)))
    assert str(table.schema.field("recorded_at").type) == "string"
    assert str(table.schema.field("at").type) == "string"
    assert table.to_pylist() == rows
    # what it guards against: the old spelling, read natively, came back as a timestamp
    old = pj.read_json(io.BytesIO(b'{"recorded_at": "2026-11-30T07:43:59Z"}\n'))
    assert str(old.schema.field("recorded_at").type).startswith("timestamp")

