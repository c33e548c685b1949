"""Source streams: listing the files under data/_kb and reading their records.

Every file under data/_kb/ is a source — but hidden files, the audit's ledger and what
`materialize.ignore` names — whatever its name: its container (refinery.containers) is told
from its name and its first bytes, and a file refinery cannot read is refused by name, never
skipped. Readers yield `refinery.jsonl.Line`s — every record, good or bad, with its offset —
so the materializer accounts for each one.
"""

from __future__ import annotations

import csv
import os
import re
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from refinery.containers import Limits, RecordPath, read_records, sniff, split_locator, stream_name, walk_locator
from refinery.jsonl import Line, LineCursor
from refinery.reasons import Reason
from refinery.workspace import Workspace


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kb_rel: str
    """path relative to data/_kb, e.g. "runs.csv" — what transform patterns match"""
    ws_rel: str
    """path relative to the workspace, e.g. "data/_kb/runs.csv" — what provenance records"""
    container: str | None
    """lines, csv, json or zip (refinery.containers); None: not a container refinery reads"""
    size: int
    compressed: bool = False
    source: str = ""
    """the stream's name: its path under data/_kb without the container extensions, `/` as `.`
    (the whole file name when two files would share a name)"""
    refused: str | None = None
    """why it cannot be read at all, said by name: a name that is not valid UTF-8 (refinery
    could not record where its rows came from), a folder link that loops back"""

    @property
    def format(self) -> str | None:
        """What an importer's records look like: csv rows, or json objects (lines, documents, archives)."""
        return None if self.container is None else "csv" if self.container == "csv" else "json"


#: data/_kb/ also holds the audit's baseline ledger (refinery.audit).
ALWAYS_IGNORED = "audit_baselines.jsonl"


def _walk(kb: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, why it is refused or None) of every file under data/_kb, in sorted order. Links
    are followed — to files and to folders (an operator links in the folder their tool logs
    to) — and a file is named by its path under data/_kb, not by where the link points. A
    folder link that leads back to a folder already being walked (a loop) is refused by name
    instead of walked forever."""
    def walk(folder: Path, above: frozenset[str]) -> Iterator[tuple[Path, str | None]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield folder, f"cannot list the folder: {e.strerror or e}"
            return
        for entry in entries:
            if entry.name.startswith("."):  # hidden: editors' and tools' own files
                continue
            path = Path(entry.path)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
            except OSError:
                is_dir = is_file = False
            if is_file:
                yield path, None
                continue
            if not is_dir:  # opening a FIFO or a device would wait, or read, forever
                yield path, ("a link to nothing (its target is missing)" if not os.path.exists(path)
                             else "not a regular file (a FIFO, socket or device): remove it, or add it to "
                                  "materialize.ignore")
                continue
            real = os.path.realpath(path)
            if real in above:
                yield path, f"a folder link that loops back to {real}: remove the link"
                continue
            yield from walk(path, above | {real})

    yield from walk(kb, frozenset({os.path.realpath(kb)}))


def list_sources(ws: Workspace, ignore: list[str]) -> tuple[list[SourceFile], list[str]]:
    """(source files, in sorted order; ignored files) under data/_kb."""
    found, ignored = [], []
    if not ws.kb.is_dir():
        return found, ignored
    for path, refused in _walk(ws.kb):
        kb_rel = path.relative_to(ws.kb).as_posix()
        # the audit's ledger lives here but is never a stream, whatever materialize.ignore says
        if kb_rel == ALWAYS_IGNORED or any(fnmatchcase(kb_rel, g) for g in ignore):
            ignored.append(kb_rel)
            continue
        try:
            container, compressed = (None, False) if refused else sniff(path)
        except OSError:
            container, compressed = None, False  # unreadable: materialize says so by name
        found.append((path, kb_rel, container, compressed, refused))
    names = Counter(stream_name(f[1]) for f in found)
    kb = ws.rel(ws.kb)  # once: it resolves the path (thousands of files, and run-all lists them four times)
    sources = []
    for path, kb_rel, container, compressed, refused in found:
        shown = kb_rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if shown != kb_rel:
            refused = f"its name is not valid UTF-8 ({shown}): rename it"
        if refused:  # named as it can be shown, and refused (see materialize)
            sources.append(SourceFile(path, shown, f"{kb}/{shown}", None, 0, False,
                                      shown.replace("/", "."), refused=refused))
            continue
        name = stream_name(kb_rel)
        if names[name] > 1:  # runs.csv and runs.jsonl: keep them apart
            name = kb_rel.replace("/", ".")
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        # the path under data/_kb, as the operator put it (not where a link points)
        sources.append(SourceFile(path, kb_rel, f"{kb}/{kb_rel}", container, size, compressed, name))
    return sources, ignored


def csv_raw(fields: list[str]) -> bytes:
    """A CSV record as one line of bytes (invalid UTF-8 restored as it was in the file)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue().encode("utf-8", "surrogateescape")


class _RecordTooLong(Exception):
    """raised through csv.reader by _CappedLines: the record outgrew the cap"""


#: Inside an unquoted field, the only events that matter: a quoted field starting after a comma,
#: or the end of the line (which ends the record).
_UNQUOTED_EVENT = re.compile(r',"|[\r\n]')
_START, _FIELD, _QUOTED, _QUOTE = range(4)


class _QuoteState:
    """Where the csv module (its default dialect, not strict) is inside a record, fed the record's
    text piece by piece: a quote opens a quoted field only at the start of a field, `""` inside
    one is a quote, and a quote inside an unquoted field is just a character. Jumps from event to
    event with str.find / a regex, so draining a huge record stays fast."""

    def __init__(self) -> None:
        self.state = _START

    def feed(self, text: str) -> bool:
        """Whether the record ends within `text` (at a line end outside quotes)."""
        i, n, st = 0, len(text), self.state
        while i < n:
            if st == _START or st == _QUOTE:
                c = text[i]
                if c in "\r\n":
                    return True
                if c == '"':
                    st = _QUOTED  # a quoted field opens; or, after a quote inside one, "" is a quote
                    i += 1
                elif c == ",":
                    st = _START
                    i += 1
                else:
                    st = _FIELD  # (after a closing quote, the csv module reads on as a plain field)
            elif st == _FIELD:
                m = _UNQUOTED_EVENT.search(text, i)
                if m is None:
                    st = _START if text.endswith(",") else _FIELD
                    break
                if m.group() != ',"':
                    return True
                st, i = _QUOTED, m.end()
            else:
                j = text.find('"', i)
                if j < 0:
                    break
                st, i = _QUOTE, j + 1
        self.state = st
        return False


class _CappedLines:
    """The physical lines of a CSV text stream, each read with a bounded `readline`, for
    csv.reader: a record longer than `cap` characters (one long line, or many lines inside
    quotes) is never held whole — the rest of it is read in chunks and dropped, up to where
    the csv module would end it (_QuoteState), and _RecordTooLong goes up through the reader,
    which starts the next record afresh."""

    def __init__(self, f: io.TextIOBase, cap: int):
        self.f, self.cap = f, cap
        self.line_num = 0  # physical lines read so far
        self.used = 0  # characters of the record being read
        self.record: list[str] = []  # its lines so far (at most the cap)

    def next_record(self) -> None:
        self.used = 0
        self.record.clear()

    def __iter__(self) -> _CappedLines:
        return self

    def __next__(self) -> str:
        line = self.f.readline(self.cap + 3)  # the cap, "\r\n", and one more to tell it was passed
        if not line:
            raise StopIteration
        self.used += len(line)
        if line[-1] in "\r\n":
            self.line_num += 1
        if self.used <= self.cap + 2:
            self.record.append(line)
            return line
        state = _QuoteState()
        for earlier in self.record:  # all inside quotes, or csv.reader would not have asked for more
            state.feed(earlier)
        while line and not state.feed(line):
            line = self.f.readline(1 << 16)
            if line and line[-1] in "\r\n":
                self.line_num += 1
        raise _RecordTooLong(self.used)


def read_csv_stream(f: io.TextIOBase, max_line_bytes: int, header: list[str] | None = None,
                    first_line: int = 0) -> Iterator[Line]:
    """Yield every CSV record after the header as a dict row (header → value).

    `offset` is the physical line the record starts on (the header is line 0). A record over
    `max_line_bytes` is refused as line_too_long without being read whole (memory stays flat
    on a 2 GB line). A byte range of a file after its header (refinery.partitions): `f` holds
    the range, `header` is the file's, `first_line` the number of the range's first line.
    """
    # above the record cap, so that a long quoted field is caught (and drained) as a long record
    csv.field_size_limit(max_line_bytes + 3)
    lines = _CappedLines(f, max_line_bytes)
    lines.line_num = first_line
    reader = csv.reader(lines)
    if header is None:
        try:
            header = _header(reader)
        except StopIteration:
            return
        except (csv.Error, _RecordTooLong) as e:
            yield Line(0, b"", None, Reason.CSV_MALFORMED, f"unreadable header: {_too_long(e, max_line_bytes)}")
            return
    header_problem = None
    if len(set(header)) != len(header) or any(not h for h in header):
        header_problem = f"the header has empty or repeated column names: {header}"
    try:
        "".join(header).encode("utf-8")
    except UnicodeEncodeError:
        header_problem = "the header is not valid UTF-8"
    ncols = len(header)
    start = lines.line_num
    while True:
        lines.next_record()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except (csv.Error, _RecordTooLong) as e:
            too_long = isinstance(e, _RecordTooLong) or "field larger" in str(e)
            yield Line(start, b"", None, Reason.LINE_TOO_LONG if too_long else Reason.CSV_MALFORMED,
                       _too_long(e, max_line_bytes))
            start = lines.line_num
            continue
        offset, start = start, lines.line_num
        if not fields:
            yield Line(offset, b"", None, Reason.BLANK_LINE, "blank line")
            continue
        if header_problem:
            raw = csv_raw(fields)
            yield Line(offset, raw, None, Reason.CSV_MALFORMED, header_problem)
            continue
        try:
            "\x1f".join(fields).encode("utf-8")
        except UnicodeEncodeError as e:
            yield Line(offset, csv_raw(fields), None, Reason.INVALID_UTF8,
                       f"invalid UTF-8 near column {e.start + 1}")
            continue
        if len(fields) != ncols:
            yield Line(offset, csv_raw(fields), None, Reason.CSV_MALFORMED,
                       f"{len(fields)} columns, but the header has {ncols}")
            continue
        # raw is rebuilt from the row only if the row is refused later (see `row_raw`)
        yield Line(offset, None, dict(zip(header, fields)), None, None)


def _header(reader: Any) -> list[str]:
    """The first record, as a header (raises what the reader raises)."""
    header = next(reader)
    if header:
        header[0] = header[0].removeprefix("\ufeff")  # a UTF-8 BOM (Excel writes one) is not a column name
    return header


def csv_header(f: io.TextIOBase, max_line_bytes: int) -> list[str] | None:
    """A CSV text's header as read_csv_stream reads it; None when it has none that can be read."""
    csv.field_size_limit(max_line_bytes + 3)
    try:
        return _header(csv.reader(_CappedLines(f, max_line_bytes)))
    except (StopIteration, csv.Error, _RecordTooLong):
        return None


def record_ends(f: io.TextIOBase) -> tuple[int, bool]:
    """(the physical lines in a CSV text, whether it ends between records) — the csv module's
    reading (_QuoteState): a byte range of a file may start only where the one before it ends
    between records."""
    n, state, between = 0, _QuoteState(), True
    while piece := f.readline(1 << 16):  # in pieces: a line may be gigabytes (it is refused, not held)
        if piece[-1] in "\r\n":
            n += 1
        between = state.feed(piece)
        if between:
            state = _QuoteState()
    return n, between


def _too_long(e: Exception, cap: int) -> str:
    if isinstance(e, _RecordTooLong):
        return f"record is longer than the {cap}-byte limit (read no further than that)"
    return str(e)


def read_rows(src: SourceFile, max_line_bytes: int, record_paths: tuple[RecordPath, ...] = (),
              max_document_bytes: int = Limits.max_document_bytes, strict: bool = False) -> Iterator[Line]:
    """Every record of `src` (see refinery.containers.read_records)."""
    return read_records(src.path, src.container, src.compressed, record_paths,
                        Limits(max_line_bytes, max_document_bytes), strict)


class SourceRecords:
    """Records of source files by (file, offset, record locator), for re-checking provenance:
    line records are read forward (reopened only to go back), documents are parsed once and
    kept while their records are asked for."""

    def __init__(self, root: Path, max_line_bytes: int = 1 << 20,
                 max_document_bytes: int = Limits.max_document_bytes):
        self.root, self.limits = root, Limits(max_line_bytes, max_document_bytes)
        self._cursors: dict[str, tuple[int, Line | None, LineCursor]] = {}
        self._docs: dict[str, tuple[Any, Line | None]] = {}  # most recently used last
        self._sniffed: dict[str, tuple[str | None, bool]] = {}
        self._archive: tuple[str, Any] | None = None  # (rel, its open ZipFile): the one asked for last

    def _kind(self, rel: str) -> tuple[str | None, bool]:
        if rel not in self._sniffed:
            self._sniffed[rel] = sniff(self.root / rel)
        return self._sniffed[rel]

    def line(self, rel: str, offset: int) -> Line | None:
        """The line record at `offset` of a line or CSV file (as materialize read it)."""
        last, line, cur = self._cursors.get(rel, (-1, None, None))
        if offset == last:
            return line
        if cur is None or offset < last:
            path = self.root / rel
            if not path.is_file():
                return None
            container, compressed = self._kind(rel)
            if container not in ("lines", "csv"):
                return None
            cur = LineCursor(read_records(path, container, compressed, (), self.limits))
        line = cur.at(offset)
        self._cursors[rel] = (offset, line, cur)
        return line

    def at(self, rel: str, offset: int, record: str | None) -> Line | None:
        """The record a provenance names, or None when it is not there any more."""
        if record is None:
            return self.line(rel, offset)
        path = self.root / rel
        if not path.is_file():
            return None
        try:
            kind, line_no, where = split_locator(record)
            if kind == "line":
                line = self.line(rel, line_no)
                if line is None:
                    return None
                if not where:  # the whole line (it held no document records)
                    return line._replace(offset=offset, record=record)
                if line.obj is None:
                    return None
                return _found(offset, walk_locator(line.obj, where), record)
            doc, bad = self._document(rel, where if kind == "member" else None)
            if bad is not None:
                whole = (kind == "doc" and where == "$") or kind == "member"
                return bad._replace(offset=offset) if whole else None
            return _found(offset, walk_locator(doc, where) if kind == "doc" else doc, record)
        except (LookupError, ValueError, OSError):
            return None

    #: documents kept parsed at once (a join's evidence refers to two or three files in turn)
    KEEP_DOCUMENTS = 4

    def _document(self, rel: str, member: str | None) -> tuple[Any, Line | None]:
        key = f"{rel}\x00{member or ''}"
        if key in self._docs:
            self._docs[key] = self._docs.pop(key)
        else:
            import zipfile

            from refinery.containers import read_document, read_member

            path = self.root / rel
            if member is not None:
                # kept open: each opening reads the whole central directory again, once per member
                # asked for (an inspect log of n samples cost n² entries read)
                if self._archive is None or self._archive[0] != rel:
                    if self._archive is not None:
                        self._archive[1].close()
                        self._archive = None
                    self._archive = (rel, zipfile.ZipFile(path))
                doc, bad = read_member(self._archive[1], member, self.limits.max_document_bytes)
            else:
                doc, bad = read_document(path, self._kind(rel)[1], self.limits.max_document_bytes)
            self._docs[key] = (doc, bad)
            while len(self._docs) > self.KEEP_DOCUMENTS:
                del self._docs[next(iter(self._docs))]
        return self._docs[key]


def _found(offset: int, obj: Any, record: str) -> Line:
    if type(obj) is not dict:
        import orjson

        return Line(offset, orjson.dumps(obj), None, Reason.NOT_AN_OBJECT, "not an object", record)
    return Line(offset, None, obj, None, None, record)

