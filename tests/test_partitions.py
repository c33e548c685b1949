"""Byte-range partitions (refinery.partitions): a large JSONL source is worked on in line-aligned
ranges, and nothing in the outputs — evidence, scored runs, exports, quarantine, receipts —
depends on where it was cut, or on how many workers did it."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from conftest import copy_sample

from refinery import materialize, partitions
from refinery.config import load_config
from refinery.runs import run_all

TREES = ("data/evidence", "data/scored-runs", "exports")


def _digests(ws) -> dict[str, str]:
    return {p.relative_to(ws.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for tree in TREES for p in sorted((ws.root / tree).rglob("*")) if p.is_file()}


def _run(ws, materialize_settings: dict):
    outcome = run_all(ws, load_config(ws.root, None, {"materialize": materialize_settings}), force=True)
    assert outcome.exit_code == 0
    return _digests(ws), {s: r["receipt_hash"] for s, r in outcome.receipts.items()}


def _plant(kb) -> None:
    """Defects that cross ranges: a byte-order mark on the first line, duplicates of early
    records near the end, blank and broken lines, a line with no newline at the end."""
    path = kb / "agent_transcripts.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    lines[40:40] = [b"\n", b"{not json\n", lines[3], lines[7]]  # repeats of earlier records, mid-file
    lines += [lines[1], lines[5], lines[9].rstrip(b"\n")]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("settings", [
    {"partition_bytes": 4096},
    {"partition_bytes": 20000, "workers": 2, "parallel_min_bytes": 0},
], ids=["4k", "20k-two-workers"])
def test_the_outputs_do_not_depend_on_where_the_sources_are_cut(ws, settings, monkeypatch):
    copy_sample(ws.kb)
    _plant(ws.kb)
    whole = _run(ws, {"partition_bytes": 0})
    cuts: list[dict] = []
    real = materialize._spans
    monkeypatch.setattr(materialize, "_spans", lambda *a: cuts.append(real(*a)) or cuts[-1])
    assert _run(ws, settings) == whole
    names = {ws.kb / "agent_transcripts.jsonl", ws.kb / "gateway_receipts.jsonl"}
    assert len(cuts) == 1 and len(cuts[0]) >= 5  # files were cut, into many ranges each
    assert all(len(spans) > 1 for spans in cuts[0].values())
    sources = materialize.list_sources(ws, [])[0]
    # eval.csv has answers over several lines in quotes: cuts that fell inside one were moved
    assert names | {ws.kb / "runs.csv", ws.kb / "eval.csv"} <= {sources[i].path for i in cuts[0]}
    q = [orjson.loads(x) for x in (ws.root / "exports/quarantine/materialize.jsonl").read_bytes().splitlines()]
    mine = [r["reason"] for r in q if r["source"] == "agent_transcripts"]
    assert mine.count("duplicate_row") >= 4 and "blank_line" in mine and "invalid_json" in mine


def test_ranges_start_at_lines_and_cover_the_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"b": "' + b"x" * 100 + b'"}\n' + b'{"c": 3}\n' * 20 + b'{"d": 4}')
    size = path.stat().st_size
    data = path.read_bytes()
    for target in (1, 5, 9, 10, 50, 200, size - 1):
        ranges = partitions.cut(path, size, target)
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(data[start - 1:start] == b"\n" for start, _ in ranges[1:])
        # each range's lines, numbered file-wide, are the file's lines
        spans = partitions.spans(ranges, [partitions.scan(path, a, b, 1 << 20, tmp_path / f"s{k}")
                                          for k, (a, b) in enumerate(ranges)],
                                 [tmp_path / f"s{k}" for k in range(len(ranges))], 1)
        assert spans is not None
        seen = [(line.offset, line.obj) for s in spans
                for line in partitions.read_span(path, s.start, s.end, s.first_line)]
        assert [o for o, _ in seen] == list(range(data.count(b"\n") + 1))
        assert [line.obj for line in materialize.read_rows(
            _source(path), 1 << 20)] == [obj for _, obj in seen]
        # the repeats of {"c": 3} are duplicates, whichever range they fall in
        assert sorted(d for s in spans for d in s.dups) == list(range(3, 22))


def _source(path):
    from refinery.sources import SourceFile

    return SourceFile(path, path.name, f"data/_kb/{path.name}", "lines", path.stat().st_size)


def test_a_range_that_cannot_be_read_makes_the_whole_file_unreadable(ws, cfg, monkeypatch):
    """As when it is read in one piece: nothing of the file is kept but one quarantine record."""
    copy_sample(ws.kb)
    real = partitions.read_span

    def failing(path, start, end, first_line, limits=None):
        if first_line > 1 and path.name == "agent_transcripts.jsonl":  # the second pass, not the first
            raise OSError(5, "Input/output error")
        return real(path, start, end, first_line, limits)

    monkeypatch.setattr(partitions, "read_span", failing)
    cut = load_config(ws.root, None, {"materialize": {"partition_bytes": 4096, "workers": 1}})
    result = materialize.run(ws, cut)
    mine = next(f for f in result.files if f.source == "agent_transcripts")
    assert mine.unreadable and mine.rows_in == 0 and mine.partitions == {}
    assert not any(p.name == "agent_transcripts.jsonl" for p in ws.evidence.rglob("*.jsonl"))
    q = [orjson.loads(x) for x in (ws.root / "exports/quarantine/materialize.jsonl").read_bytes().splitlines()]
    assert [r["reason"] for r in q if r["source"] == "agent_transcripts"] == ["unreadable_file"]


def test_a_range_the_first_pass_cannot_read_leaves_the_file_whole(ws, monkeypatch):
    copy_sample(ws.kb)
    whole = _run(ws, {"partition_bytes": 0})
    real = partitions.read_span

    def failing(path, start, end, first_line, limits=None):
        if first_line == 1 and path.name == "agent_transcripts.jsonl":  # the first pass only
            raise OSError(5, "Input/output error")
        return real(path, start, end, first_line, limits)

    monkeypatch.setattr(partitions, "read_span", failing)
    cuts: list[dict] = []
    monkeypatch.setattr(materialize, "_spans", lambda *a, _real=materialize._spans: cuts.append(_real(*a)) or cuts[-1])
    assert _run(ws, {"partition_bytes": 4096, "workers": 1}) == whole
    sources = materialize.list_sources(ws, [])[0]
    assert "agent_transcripts" not in {sources[i].source for i in cuts[0]} and cuts[0]  # others were cut


def test_record_ends_reads_as_the_csv_module_in_pieces():
    import io

    from refinery.sources import record_ends

    long = "a," + "x" * 300_000 + "\n"  # read in pieces, never whole
    assert record_ends(io.StringIO("h1,h2\n" + long + 'b,"two\nlines"\n')) == (4, True)
    assert record_ends(io.StringIO('b,"opened\n')) == (1, False)  # ends inside a quoted field
    assert record_ends(io.StringIO('b,c"d\n')) == (1, True)  # a quote inside a plain field is a character
    assert record_ends(io.StringIO("a,b\r\nc,d\r")) == (2, True)
