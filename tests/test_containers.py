"""Containers: JSONL/NDJSON, CSV, JSON documents and arrays, .eval archives, gzip of them —
every record read with an offset and (inside documents) a locator, bad input refused with a
reason, nothing skipped."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import evidence_rows, quarantine_rows, write_kb
from refinery import materialize
from refinery.canonical import sig_hash
from refinery.config import load_config
from refinery.containers import Limits, RecordPath, read_records, sniff, stream_name, walk_locator
from refinery.reasons import Reason
from refinery.sources import SourceRecords, list_sources
from refinery.trace import trace

ROW = {"ts": 1762000000, "prompt": "p", "completion": "c"}


def records(path, paths=(), **kw):
    container, compressed = sniff(path)
    return list(read_records(path, container, compressed, tuple(RecordPath.parse(p) for p in paths), **kw))


def test_stream_names_drop_container_extensions():
    assert stream_name("runs.csv") == "runs"
    assert stream_name("batch/output.jsonl.gz") == "batch.output"
    assert stream_name("2025-05-12_browser.json") == "2025-05-12_browser"
    assert stream_name("logs") == "logs"


@pytest.mark.parametrize("name,data,container,compressed", [
    ("a.jsonl", b'{"a":1}\n', "lines", False),
    ("a.ndjson", b'{"a":1}\n', "lines", False),
    ("a.json", b'{"a": [1, 2]}', "json", False),
    ("a.json", b'[{"a": 1}]', "json", False),
    ("a.json", b'{"a":1}\n{"a":2}\n', "lines", False),  # JSONL under a .json name
    ("a.json.gz", gzip.compress(mtime=0, data=b'{"a": 1}'), "json", True),
    ("a.jsonl.gz", gzip.compress(mtime=0, data=b'{"a":1}\n'), "lines", True),
    ("a.csv.gz", gzip.compress(mtime=0, data=b"x,y\n1,2\n"), "csv", True),
    ("export", b'  [{"a": 1}]', "json", False),  # no extension: told by its first byte
    ("notes.md", b"# notes\n", None, False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sniff_tells_the_container_by_name_and_bytes(tmp_path, name, data, container, compressed):
    p = tmp_path / name
    p.write_bytes(data)
    assert sniff(p) == (container, compressed)


def test_gzip_jsonl_reads_like_jsonl_and_a_cut_stream_keeps_what_came_before(tmp_path):
    body = b"".join(orjson.dumps({**ROW, "i": i}) + b"\n" for i in range(50))
    p = tmp_path / "s.jsonl.gz"
    p.write_bytes(gzip.compress(mtime=0, data=body))
    got = records(p)
    assert [r.offset for r in got] == list(range(50)) and all(r.obj for r in got)
    p.write_bytes(gzip.compress(mtime=0, data=body)[:-30])  # the end of the stream is lost
    got = records(p)
    assert got[-1].reason == Reason.DAMAGED_CONTAINER and "breaks off" in got[-1].detail
    assert all(r.obj is not None for r in got[:-1]) and len(got) >= 2


def test_a_document_with_a_record_path_pins_each_record(tmp_path):
    doc = {"evalId": "e1", "results": {"results": [{"id": "r0"}, {"id": "r1"}, 7]}}
    p = tmp_path / "export.json"
    p.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    got = records(p, ["results.results[]"])
    assert [(r.offset, r.record) for r in got] == [(0, "$.results.results[0]"), (1, "$.results.results[1]"),
                                                   (2, "$.results.results[2]")]
    assert got[2].reason == Reason.NOT_AN_OBJECT
    assert got[0].parents[0]["evalId"] == "e1"  # the document is there for the importer
    assert walk_locator(doc, got[1].record) == {"id": "r1"}


def test_nested_record_paths_and_documents_one_per_line(tmp_path):
    span = lambda i: {"spanId": f"s{i}", "name": "chat"}  # noqa: E731
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [span(0), span(1)]}, {"spans": [span(2)]}]}]}
    p = tmp_path / "otel.jsonl"
    p.write_bytes(orjson.dumps(doc) + b"\n" + orjson.dumps(doc) + b"\n")
    got = records(p, ["resourceSpans[].scopeSpans[].spans[]"])
    assert [r.offset for r in got] == list(range(6))
    assert got[2].record == "line 0 $.resourceSpans[0].scopeSpans[1].spans[0]"
    assert got[3].record == "line 1 $.resourceSpans[0].scopeSpans[0].spans[0]"


def test_a_top_level_array_and_a_single_object_document(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'\xef\xbb\xbf[{"a": 1}, {"a": 2}]')  # with a BOM, as Windows tools write it
    assert [(r.record, r.obj) for r in records(p)] == [("$[0]", {"a": 1}), ("$[1]", {"a": 2})]
    p.write_bytes(b'{"a": 1}')
    assert [(r.record, r.obj) for r in records(p)] == [("$", {"a": 1})]


def test_a_truncated_document_is_one_refusal_with_the_parser_message(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'{"results": [{"a": 1}, {"a": ')
    (r,) = records(p)
    assert r.reason == Reason.INVALID_JSON and "cut short" in r.detail and r.record == "$"


def test_a_document_over_the_limit_is_refused_not_loaded(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'[' + b'{"a": 1},' * 100 + b'{"a": 1}]')
    (r,) = records(p, limits=Limits(max_document_bytes=100))
    assert r.reason == Reason.DOCUMENT_TOO_LARGE and "max_document_bytes" in r.detail


def test_configured_record_paths_that_match_nothing_are_an_error(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'{"rows": []}')
    (r,) = list(read_records(p, "json", False, (RecordPath.parse("data[]"),), strict=True))
    assert r.reason == Reason.RECORD_PATH_MISSING and "'data[]'" in r.detail


def _eval_zip(samples: dict[str, dict], header: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if header is not None:
            zf.writestr("header.json", orjson.dumps(header))
        for name, s in samples.items():
            zf.writestr(name, orjson.dumps(s))
        zf.writestr("summaries.json", b"[]")
    return buf.getvalue()


def test_an_archive_gives_its_member_records_with_the_header(tmp_path):
    p = tmp_path / "log.eval"
    p.write_bytes(_eval_zip({"samples/1_epoch_1.json": {"id": 1}, "samples/2_epoch_1.json": {"id": 2}},
                            {"eval": {"model": "m"}}))
    got = list(read_records(p, "zip", False, (RecordPath("samples/*.json", ()),)))
    assert [(r.offset, r.record, r.obj) for r in got] == [(0, "samples/1_epoch_1.json", {"id": 1}),
                                                         (1, "samples/2_epoch_1.json", {"id": 2})]
    assert got[0].parents == ({"eval": {"model": "m"}},)


def test_a_zip_that_is_not_a_zip(tmp_path):
    p = tmp_path / "log.eval"
    p.write_bytes(b"PK\x03\x04 not really")
    (r,) = list(read_records(p, "zip", False))
    assert r.reason == Reason.DAMAGED_CONTAINER


def test_source_records_resolve_every_locator(tmp_path):
    (tmp_path / "data" / "_kb").mkdir(parents=True)
    doc = {"samples": [{"id": "a"}, {"id": "b"}]}
    (tmp_path / "data/_kb/d.json.gz").write_bytes(gzip.compress(orjson.dumps(doc), mtime=0))
    (tmp_path / "data/_kb/l.jsonl").write_bytes(orjson.dumps(doc) + b"\n")
    (tmp_path / "data/_kb/z.eval").write_bytes(_eval_zip({"samples/1.json": {"id": "z"}}))
    sr = SourceRecords(tmp_path)
    assert sr.at("data/_kb/d.json.gz", 1, "$.samples[1]").obj == {"id": "b"}
    assert sr.at("data/_kb/l.jsonl", 0, "line 0 $.samples[0]").obj == {"id": "a"}
    assert sr.at("data/_kb/z.eval", 0, "samples/1.json").obj == {"id": "z"}
    assert sr.at("data/_kb/d.json.gz", 0, "$.samples[9]") is None
    assert sr.at("data/_kb/l.jsonl", 0, None).obj == doc



def test_source_records_open_an_archive_once_for_all_its_members(tmp_path, monkeypatch):
    """Re-checking provenance asks for an archive's members one after another: opening the
    archive for each read its whole central directory again (n² entries for n samples)."""
    import zipfile

    (tmp_path / "data" / "_kb").mkdir(parents=True)
    samples = {f"samples/{i}.json": {"id": i} for i in range(20)}
    (tmp_path / "data/_kb/a.eval").write_bytes(_eval_zip(samples))
    (tmp_path / "data/_kb/b.eval").write_bytes(_eval_zip({"samples/0.json": {"id": "b"}}))
    opened = []
    real = zipfile.ZipFile
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    sr = SourceRecords(tmp_path)
    assert [sr.at("data/_kb/a.eval", i, f"samples/{i}.json").obj for i in range(20)] == list(samples.values())
    assert len(opened) == 1
    assert sr.at("data/_kb/b.eval", 0, "samples/0.json").obj == {"id": "b"}  # another archive: the first closed
    assert sr.at("data/_kb/a.eval", 3, "samples/3.json").obj == {"id": 3}
    assert len(opened) == 3

DOC_TRANSFORM = '''
from refinery.transform import TransformSpec, dated, new_evidence, text, text_or_empty
SPEC = TransformSpec(name="docs", patterns=("docs*",), format="json", kind="doc", record_paths=("items[]",))

def transform(row, ctx):
    when, src = dated(ctx, ("record:ts", row.get("ts")), ("document:created", (ctx.document or {}).get("created")))
    return new_evidence("doc", recorded_at=when, recorded_at_from=src, prompt=text(row, "prompt", required=True),
                        response=text_or_empty(row, "completion"))
'''


def test_document_records_become_evidence_that_trace_walks_back(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "docs.py").write_text(DOC_TRANSFORM)
    doc = {"created": "2026-11-03T10:00:00Z",
           "items": [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2", "ts": 1762000000},
                     {"completion": "no prompt"}]}
    write_kb(ws, {"docs_export.json.gz": gzip.compress(orjson.dumps(doc), mtime=0)})
    result = materialize.run(ws, cfg, validate=True)
    assert (result.rows_in, result.evidence, result.quarantined) == (3, 2, 1)
    ev = sorted(evidence_rows(ws), key=lambda r: r["provenance"]["line_offset"])
    assert [(e["provenance"]["record"], e["recorded_at_from"]) for e in ev] == [
        ("$.items[0]", "document:created"), ("$.items[1]", "record:ts")]
    assert ev[0]["provenance"]["sig_hash"] == sig_hash(doc["items"][0])
    (q,) = quarantine_rows(ws)
    assert (q["reason"], q["provenance"]["record"], q["provenance"]["line_offset"]) == (
        "missing_field", "$.items[2]", 2)
    t = trace(ws, ev[1]["id"])
    assert t.ok and t.chains[0].hops[-1].record == "$.items[1]"


def test_unclaimed_documents_and_archives_are_counted_by_name(ws, cfg):
    write_kb(ws, {"mystery.json": b'[{"a": 1}, {"a": 2}]', "other.zip": _eval_zip({"x.json": {"a": 1}})})
    result = materialize.run(ws, cfg)
    per_file = {f.source_file: (f.rows_in, f.quarantined, dict(f.by_reason)) for f in result.files}
    assert per_file == {"data/_kb/mystery.json": (2, 2, {"unknown_source": 2}),
                        "data/_kb/other.zip": (1, 1, {"unknown_source": 1})}


def test_two_files_of_one_stream_name_stay_apart(ws):
    write_kb(ws, {"runs.csv": "a\n1\n", "runs.jsonl": '{"a": 1}\n'})
    names = [s.source for s in list_sources(ws, [])[0]]
    assert names == ["runs.csv", "runs.jsonl"]


def test_max_document_bytes_is_a_setting(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nmax_document_bytes = 10\n")
    write_kb(ws, {"big.json": b'[{"a": 1}, {"a": 2}]'})
    result = materialize.run(ws, load_config(ws.root))
    assert result.by_reason == {"document_too_large": 1}


def test_zstandard_archive_members_as_inspect_writes_them():
    """inspect_ai 0.3.285 compresses .eval members with Zstandard (zip method 93), which Python's
    zipfile reads only from 3.14: the archive reads the same as its DEFLATE twin."""
    from conftest import FIXTURES

    got = {}
    for kind in ("zstd", "deflate"):
        path = FIXTURES / "real" / "inspect_ai" / f"log_read_sample.{kind}.eval"
        got[kind] = [(r.record, r.obj["id"], r.parents[0]["eval"]["task"])
                     for r in read_records(path, "zip", False, (RecordPath("samples/*.json", ()),))]
    assert got["zstd"] == got["deflate"] and len(got["zstd"]) == 1


def test_a_line_after_a_document_line_says_which_line_it_is(tmp_path):
    """Once a JSONL line has held several records, offsets count records: a plain or broken line
    after it carries its real line in `record`, so trace and the audit can find it."""
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(orjson.dumps({"items": [{"a": 1}, {"a": 2}]}) + b"\n" + b'{"a": 3}\n' + b'{"cut\n')
    got = records(p, ["items[]"])
    assert [(r.offset, r.record) for r in got] == [(0, "line 0 $.items[0]"), (1, "line 0 $.items[1]"),
                                                   (2, "line 1"), (3, "line 2")]
    assert got[3].reason == Reason.INVALID_JSON
    (tmp_path / "data" / "_kb").mkdir(parents=True)
    (tmp_path / "data" / "_kb" / "mixed.jsonl").write_bytes(p.read_bytes())
    sr = SourceRecords(tmp_path)
    assert sr.at("data/_kb/mixed.jsonl", 2, "line 1").obj == {"a": 3}
    assert sr.at("data/_kb/mixed.jsonl", 3, "line 2").raw == b'{"cut'


def test_a_list_of_ids_or_an_empty_list_is_not_where_records_are(tmp_path):
    p = tmp_path / "traces.jsonl"
    p.write_bytes(orjson.dumps({"id": "t1", "observations": ["o1", "o2"]}) + b"\n"
                  + orjson.dumps({"id": "t2", "observations": []}) + b"\n"
                  + orjson.dumps({"id": "t3", "observations": [{"id": "o3"}]}) + b"\n")
    got = records(p, ["observations[]"])
    assert [(r.record, r.obj["id"]) for r in got] == [(None, "t1"), (None, "t2"), ("line 2 $.observations[0]", "o3")]


def _zstd_eval(tmp_path, change) -> Path:
    """The real Zstandard .eval with one change applied to its bytes."""
    from conftest import FIXTURES

    data = bytearray((FIXTURES / "real" / "inspect_ai" / "log_read_sample.zstd.eval").read_bytes())
    change(data)
    p = tmp_path / "log.eval"
    p.write_bytes(bytes(data))
    return p


def test_a_damaged_or_encrypted_member_is_damage_not_a_traceback(tmp_path):
    import struct

    def corrupt(data: bytearray) -> None:
        start = data.index(b"samples/1_epoch_1.json") + len(b"samples/1_epoch_1.json")
        for k in range(start + 40, start + 80):
            data[k] ^= 0xFF

    def encrypt(data: bytearray) -> None:  # the "encrypted" flag bit of every local and central header
        for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            i = 0
            while (i := data.find(sig, i)) != -1:
                flags = struct.unpack_from("<H", data, i + flag_at)[0]
                struct.pack_into("<H", data, i + flag_at, flags | 1)
                i += 4

    for change in (corrupt, encrypt):
        got = list(read_records(_zstd_eval(tmp_path, change), "zip", False, (RecordPath("samples/*.json", ()),)))
        assert got and all(r.reason in (Reason.DAMAGED_CONTAINER, Reason.INVALID_JSON) for r in got), change


def test_a_zstandard_bomb_is_refused_not_inflated(tmp_path):
    """A member whose frame decompresses to far more than the archive declares is damage."""
    import zipfile

    import zstandard

    from refinery.containers import ZIP_ZSTANDARD, read_member

    p = tmp_path / "bomb.eval"
    payload = zstandard.ZstdCompressor().compress(b'{"a": "' + b"x" * (8 << 20) + b'"}')
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("samples/1.json", b"{}")
    raw = bytearray(p.read_bytes())
    # swap in the bomb: method 93, the real compressed size, a declared size of 2 bytes
    name = b"samples/1.json"
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    body_at = local + 30 + len(name)
    new = raw[:body_at] + payload + raw[body_at + 2:]
    shift = len(payload) - 2
    import struct

    struct.pack_into("<H", new, local + 8, ZIP_ZSTANDARD)
    struct.pack_into("<I", new, local + 18, len(payload))
    c = central + shift
    struct.pack_into("<H", new, c + 10, ZIP_ZSTANDARD)
    struct.pack_into("<I", new, c + 20, len(payload))
    end = new.index(b"PK\x05\x06")
    struct.pack_into("<I", new, end + 16, c)
    import zlib

    struct.pack_into("<I", new, local + 14, zlib.crc32(b"{}"))
    p.write_bytes(bytes(new))
    with zipfile.ZipFile(p) as zf:
        doc, bad = read_member(zf, "samples/1.json", 1 << 30)
    assert doc is None and bad.reason == Reason.DAMAGED_CONTAINER and "more than the 2 bytes" in bad.detail


def test_jsonl_under_a_json_name_with_a_long_first_line(tmp_path):
    p = tmp_path / "chats.json"
    p.write_bytes(orjson.dumps({"text": "x" * 100_000}) + b"\n" + orjson.dumps({"text": "y"}) + b"\n")
    assert sniff(p) == ("lines", False)


def test_a_file_name_that_is_not_utf8_is_refused_by_name_not_a_traceback(ws, cfg):
    import os

    bad = os.fsencode(str(ws.kb)) + b"/runs_\xff.csv"
    with open(bad, "wb") as f:
        f.write(b"run_id\n1\n")
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "q", "completion": "a"}\n'})
    result = materialize.run(ws, cfg)
    assert result.evidence == 1 and result.exit_code == 2
    assert result.file_errors == ["data/_kb/runs_\\xff.csv: cannot read: its name is not valid UTF-8 "
                                  "(runs_\\xff.csv): rename it"]


def test_an_over_long_csv_record_is_refused_without_being_read_whole(tmp_path):
    """A 2 GB CSV line once took 4.2 GB of memory: csv.reader asked for whole lines. Lines are
    now read at most the cap at a time (checked on the stream), the record is refused as
    line_too_long, and the records after it — one line or many inside quotes — still come."""
    from refinery.sources import read_csv_stream

    cap = 1000
    long_line = ",".join(["x"] * 250_000)  # 500 kB of one-character fields: no field is over the cap
    quoted = '"' + "\n".join(["y" * 90] * 20) + '",z'  # one record over 20 lines, 1.8 kB
    text = f"a,b\n1,2\n{long_line}\n3,4\n{quoted}\n5,6\n"

    class Watched(io.StringIO):
        most = 0

        def readline(self, size=-1):
            got = super().readline(size)
            Watched.most = max(Watched.most, len(got))
            return got

    got = list(read_csv_stream(Watched(text, newline=""), cap))
    assert [(ln.offset, ln.reason, ln.obj) for ln in got] == [
        (1, None, {"a": "1", "b": "2"}),
        (2, Reason.LINE_TOO_LONG, None),
        (3, None, {"a": "3", "b": "4"}),
        (4, Reason.LINE_TOO_LONG, None),  # all of its 20 lines, up to the closing quote
        (24, None, {"a": "5", "b": "6"}),
    ]
    assert Watched.most <= 1 << 16  # the cap, then 64 kB chunks to drop the rest
    assert "1000-byte limit" in got[1].detail


def test_a_long_csv_line_in_a_source_is_quarantined_and_counted(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nmax_line_bytes = 1000\n")
    write_kb(ws, {"wide.csv": "prompt,completion\n" + "p," + "c" * 3000 + "\n" + "q,r\n"})
    materialize.run(ws, load_config(ws.root))
    refused = [q for q in quarantine_rows(ws) if q["reason"] == Reason.LINE_TOO_LONG.value]
    assert [q["provenance"]["line_offset"] for q in refused] == [1]


def test_links_to_files_and_folders_outside_are_read_under_their_kb_path(ws, cfg, tmp_path):
    """An operator links in a file or the folder their tool logs to: both are read (a linked
    folder was once skipped without a word), rows are pinned to the path under data/_kb that
    the operator chose, and `refinery trace` walks back through the link."""
    outside = tmp_path / "elsewhere"
    (outside / "logs").mkdir(parents=True)
    row = '{"ts": 1762000000, "prompt": "q", "completion": "a"}\n'
    (outside / "one.jsonl").write_text(row)
    (outside / "logs" / "gateway_receipts.jsonl").write_text(row.replace('"q"', '"q2"'))
    ws.kb.mkdir(parents=True, exist_ok=True)
    (ws.kb / "gateway_receipts.jsonl").symlink_to(outside / "one.jsonl")
    (ws.kb / "tool").symlink_to(outside / "logs", target_is_directory=True)
    result = materialize.run(ws, cfg)
    assert result.evidence == 2 and result.exit_code == 0
    rows = evidence_rows(ws)
    assert sorted(r["provenance"]["source_file"] for r in rows) == [
        "data/_kb/gateway_receipts.jsonl", "data/_kb/tool/gateway_receipts.jsonl"]
    assert all(trace(ws, r["id"]).ok for r in rows)


def test_a_folder_link_that_loops_is_refused_by_name(ws, cfg):
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "q", "completion": "a"}\n'})
    (ws.kb / "again").symlink_to(ws.kb, target_is_directory=True)
    result = materialize.run(ws, cfg)
    assert result.evidence == 1 and result.exit_code == 2
    assert result.file_errors == [f"data/_kb/again: cannot read: a folder link that loops back to "
                                  f"{ws.kb.resolve()}: remove the link"]


def test_a_fifo_or_a_dangling_link_is_refused_by_name_not_waited_on(ws, cfg):
    """Opening a FIFO blocks until a writer comes: `sources` and run-all once hung on one."""
    import os

    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "q", "completion": "a"}\n'})
    os.mkfifo(ws.kb / "pipe.jsonl")
    (ws.kb / "gone.jsonl").symlink_to(ws.root / "nowhere.jsonl")
    result = materialize.run(ws, cfg)
    assert result.evidence == 1 and result.exit_code == 2
    assert result.file_errors == [
        "data/_kb/gone.jsonl: cannot read: a link to nothing (its target is missing)",
        "data/_kb/pipe.jsonl: cannot read: not a regular file (a FIFO, socket or device): remove it, or add it "
        "to materialize.ignore"]


def test_a_csv_that_starts_with_a_bom_reads_its_first_column(ws, cfg):
    write_kb(ws, {"wide.csv": b"\xef\xbb\xbfprompt,completion\nq,a\n"})
    assert [ln.obj for ln in records(ws.kb / "wide.csv")] == [{"prompt": "q", "completion": "a"}]


def test_an_over_long_record_with_a_quote_inside_a_plain_field_drops_only_itself():
    """A quote inside an unquoted field is a plain character to the csv module; counting quotes
    once took it for an open quoted field and dropped every record after it without a word."""
    from refinery.sources import read_csv_stream

    text = 'a,b\n1,he said "hi ' + "x" * 3000 + '\n2,two\n3,three\n4,"a ""quoted"" one"\n'
    got = [(ln.offset, ln.reason, ln.obj) for ln in read_csv_stream(io.StringIO(text, newline=""), 1000)]
    assert got == [(1, Reason.LINE_TOO_LONG, None), (2, None, {"a": "2", "b": "two"}),
                   (3, None, {"a": "3", "b": "three"}), (4, None, {"a": "4", "b": 'a "quoted" one'})]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["a", ",", '"', '""', "\n", "\r\n", "\r", " "]), max_size=30))
def test_where_a_record_ends_agrees_with_the_csv_module(pieces):
    """The drain of an over-long record stops where csv.reader would end it (short of the end
    of the file, where csv.reader ends any record)."""
    import csv

    from refinery.sources import _QuoteState

    lines = io.StringIO("".join(pieces) + "\n", newline="").readlines()
    reader, ends = csv.reader(iter(lines)), []
    try:
        for _ in reader:
            ends.append(reader.line_num)
    except csv.Error:
        return
    mine, state = [], _QuoteState()
    for n, line in enumerate(lines, 1):
        if state.feed(line):
            mine.append(n)
            state = _QuoteState()
    assert mine == ends or (mine == ends[:-1] and ends[-1] == len(lines))
