from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinery.jsonl import atomic_write, publish_dir, read_jsonl, recover_dir, staging_dir, write_jsonl_atomic
from refinery.reasons import Reason


def lines_of(tmp_path: Path, data: bytes, **kw):
    p = tmp_path / "s.jsonl"
    p.write_bytes(data)
    return list(read_jsonl(p, **kw))


def test_every_line_with_offset_and_reason(tmp_path):
    data = (b'{"a": 1}\n'
            b'{"a": \n'            # truncated
            b'\n'                  # blank
            b'[1, 2]\n'            # not an object
            b'{"a": "\xff"}\n'     # invalid UTF-8
            b'{"a": 2}\r\n'        # CRLF is fine
            b'{"a": 3}')           # no final newline
    got = lines_of(tmp_path, data)
    assert [ln.offset for ln in got] == [0, 1, 2, 3, 4, 5, 6]
    assert [ln.reason for ln in got] == [None, Reason.INVALID_JSON, Reason.BLANK_LINE, Reason.NOT_AN_OBJECT,
                                         Reason.INVALID_UTF8, None, None]
    assert [ln.obj for ln in got if ln.obj] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert all(ln.detail for ln in got if ln.reason)


def test_line_too_long_is_refused_and_reading_goes_on(tmp_path):
    big = b'{"a": "' + b"x" * 5000 + b'"}'
    got = lines_of(tmp_path, b'{"a": 1}\n' + big + b'\n{"a": 2}\n', max_line_bytes=1000)
    assert [ln.reason for ln in got] == [None, Reason.LINE_TOO_LONG, None]
    assert got[1].offset == 1 and "5009 bytes" in got[1].detail
    assert len(got[1].raw) <= 256
    assert got[2].obj == {"a": 2} and got[2].offset == 2


def test_a_line_exactly_at_the_limit_is_read(tmp_path):
    line = b'{"a": "' + b"x" * 90 + b'"}'
    got = lines_of(tmp_path, line + b"\n" + line, max_line_bytes=len(line))
    assert [ln.reason for ln in got] == [None, None]


@settings(max_examples=150)
@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=12))
def test_reader_never_stops_and_counts_every_line(tmp_path_factory, lines):
    p = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    data = b"\n".join(lines)
    p.write_bytes(data)
    got = list(read_jsonl(p))
    parts = data.split(b"\n")
    expected = len(parts) - (parts[-1] == b"")  # a final newline ends the last line; it adds none
    assert len(got) == expected
    assert [ln.offset for ln in got] == list(range(expected))
    assert all((ln.obj is None) != (ln.reason is None) for ln in got)


def test_atomic_write_replaces_only_on_success(tmp_path):
    tmp_path = tmp_path / "aw"
    tmp_path.mkdir()
    target = tmp_path / "out.jsonl"
    write_jsonl_atomic(target, [{"a": 1}])
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_publish_dir_swaps_and_recover_restores_a_half_swap(tmp_path):
    tmp_path = tmp_path / "pd"
    tmp_path.mkdir()
    target = tmp_path / "evidence"
    target.mkdir()
    (target / "old.jsonl").write_text("old")
    new = staging_dir(target)
    (new / "new.jsonl").write_text("new")
    publish_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["new.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence"]
    # A process killed between moving the old tree aside and moving the new one in:
    aside = tmp_path / ".evidence.old-999"
    target.rename(aside)
    leftover = staging_dir(target)
    recover_dir(target)
    assert (target / "new.jsonl").read_text() == "new"
    assert not aside.exists() and not leftover.exists()


def test_hashing_reader_hashes_every_byte_read_even_an_overlong_line(tmp_path):
    import hashlib

    from refinery.jsonl import HashingReader, iter_lines

    data = b'\xef\xbb\xbf{"a": 1}\r\n' + b'{"b": "' + b"x" * 5000 + b'"}\n' + b"not json\n" + b'{"c": 3}'
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        reader = HashingReader(f)
        lines = list(iter_lines(reader, max_line_bytes=1000))
    assert [line.offset for line in lines] == [0, 1, 2, 3] and lines[3].obj == {"c": 3}
    assert reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
