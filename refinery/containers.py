"""Containers: how the bytes of a source file become records.

    lines   *.jsonl *.ndjson *.jsonlines   one JSON object per line
    csv     *.csv                          a header, then one record per row
    json    *.json                         one JSON document or array (JSONL under a .json name is read as lines)
    zip     *.eval *.zip                   an archive of JSON members (inspect_ai's .eval logs)
    any of these + .gz                     gzip-compressed

A file with another name is recognised by its first bytes (the gzip or zip magic, or a
leading `{` / `[`); one that is none of these is refused by name, never skipped.

Every record comes out as a `refinery.jsonl.Line`, good or bad, with its `offset`: the 0-based
line of a line or CSV file (as in the decompressed text), otherwise the record's 0-based index
in reading order. A record that is not a whole line also carries `record`, which pins it:

    $.samples[3]                               inside a JSON document (`$[5]` in a top-level array)
    line 4 $.resourceSpans[0].scopeSpans[0].spans[1]   inside the JSON document on line 4
    samples/3_epoch_1.json                     an archive member

A document's records are found by the importer's record paths (`samples[]`,
`results.results[]`, `resourceSpans[].scopeSpans[].spans[]`, `trace`; for an archive, member
globs such as `samples/*.json`); a document none of them matches is a record itself, and a
top-level array's elements are records. `locate` walks a `record` back to its object, which is
how `refinery trace` and the audit re-check a record's sig_hash.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

from refinery.jsonl import UTF8_BOM, Line, iter_lines
from refinery.reasons import Reason

LINE_EXTS = (".jsonl", ".ndjson", ".jsonlines")
CONTAINER_OF_EXT = {**dict.fromkeys(LINE_EXTS, "lines"), ".csv": "csv", ".json": "json", ".eval": "zip",
                    ".zip": "zip"}
GZIP_MAGIC, ZIP_MAGIC = b"\x1f\x8b", b"PK\x03\x04"
#: An archive's member that describes the whole archive (inspect_ai's eval spec), given to each record;
#: an archive still being written (or whose run crashed) has only the journal's start record.
ARCHIVE_HEADER = "header.json"
ARCHIVE_HEADERS = (ARCHIVE_HEADER, "_journal/start.json")
PROBE_RECORDS = 8


class DamagedContainer(Exception):
    """The container cannot be opened at all (not a zip, not gzip, unreadable header)."""


# --- what a file is -------------------------------------------------------------------------


def stream_name(kb_rel: str) -> str:
    """The stream name of a file: its path under data/_kb without the container extensions,
    `/` as `.` (`batch/output.jsonl.gz` → `batch.output`)."""
    name = kb_rel
    if name.lower().endswith(".gz"):
        name = name[:-3]
    head, dot, ext = name.rpartition(".")
    if dot and "/" not in ext and ext:
        name = head
    return name.replace("/", ".")


def _peek(path: Path, compressed: bool, n: int = 1 << 16, line_max: int = 1 << 20) -> bytes:
    """The first `n` bytes — and at least the whole first line, up to `line_max`."""
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(n)
            if b"\n" not in head and len(head) == n:
                head += f.readline(line_max) + f.read(256)  # and a glimpse of the line after it
            return head
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return b""


def sniff(path: Path) -> tuple[str | None, bool]:
    """(container, gzip-compressed) of a file: by its name, confirmed or decided by its bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    name = path.name.lower()
    compressed = name.endswith(".gz") or magic[:2] == GZIP_MAGIC
    inner = name[:-3] if name.endswith(".gz") else name
    ext = "." + inner.rsplit(".", 1)[-1] if "." in inner else ""
    container = CONTAINER_OF_EXT.get(ext)
    if not compressed and magic == ZIP_MAGIC:
        return "zip", False
    if container == "zip" and not compressed:
        return "zip", False
    head = _peek(path, compressed)
    if container in ("json", None) and head:
        first = head.lstrip(b" \t\r\n" + UTF8_BOM)[:1]
        if first in (b"{", b"["):
            return ("lines" if _looks_like_lines(head) else "json"), compressed
        return (container if container == "json" else None), compressed
    return container, compressed


def _looks_like_lines(head: bytes) -> bool:
    """JSONL under a .json name: the first line is a whole JSON value and more follows it."""
    first, nl, rest = head.lstrip(UTF8_BOM).partition(b"\n")
    if not nl or not rest.strip():
        return False
    try:
        orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return True


def open_binary(path: Path, compressed: bool) -> Any:
    return gzip.open(path, "rb") if compressed else open(path, "rb")


# --- record paths ---------------------------------------------------------------------------

_SEGMENT = re.compile(r"^([A-Za-z_][\w-]*)?(\[\])?$")


@dataclass(frozen=True)
class RecordPath:
    """`results.results[]`: keys to follow, `[]` where a list's items are records."""

    text: str
    steps: tuple[tuple[str | None, bool], ...]

    @classmethod
    def parse(cls, text: str) -> RecordPath:
        steps = []
        for seg in text.split("."):
            m = _SEGMENT.match(seg)
            if not seg or not m or (m.group(1) is None and m.group(2) is None):
                raise ValueError(f"record path {text!r}: {seg!r} is not a key, `key[]` or `[]` "
                                 "(e.g. 'samples[]', 'results.results[]', 'resourceSpans[].scopeSpans[].spans[]')")
            steps.append((m.group(1), m.group(2) is not None))
        if steps[0][0] is None and len(steps) > 1 and steps[1][0] is None:
            raise ValueError(f"record path {text!r}: nested top-level lists are not supported")
        return cls(text, tuple(steps))

    def matches(self, unit: Any) -> bool:
        """Whether the path's first step is in `unit`: an object, or a list holding an object (a
        list of ids or an empty list is not where records are)."""
        key, many = self.steps[0]
        value = unit if key is None else (unit.get(key) if isinstance(unit, dict) else None)
        if many:
            return isinstance(value, list) and any(isinstance(v, dict) for v in value)
        return isinstance(value, dict)

    def expand(self, unit: Any, where: str = "$") -> Iterator[tuple[str, Any, tuple[Any, ...]]]:
        """(locator, record, parents) for every record the path reaches in `unit`."""
        yield from self._walk(unit, 0, where, ())

    def _walk(self, cur: Any, i: int, where: str, parents: tuple[Any, ...]):
        if i == len(self.steps):
            yield where, cur, parents
            return
        key, many = self.steps[i]
        if key is not None:
            if not isinstance(cur, dict) or key not in cur:
                return
            value, here = cur[key], where + _key(key)
        else:
            value, here = cur, where
        if many:
            if isinstance(value, list):
                for j, item in enumerate(value):
                    yield from self._walk(item, i + 1, f"{here}[{j}]", (*parents, cur))
        else:
            yield from self._walk(value, i + 1, here, (*parents, cur))


def _key(key: str) -> str:
    return f".{key}" if re.fullmatch(r"[A-Za-z_][\w-]*", key) else f"[{orjson.dumps(key).decode()}]"


def parse_paths(paths: tuple[str, ...] | list[str]) -> tuple[RecordPath, ...]:
    return tuple(RecordPath.parse(p) for p in paths)


_TOKEN = re.compile(r'\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def walk_locator(doc: Any, path: str) -> Any:
    """The value at a `$...` locator path in `doc`; raises LookupError if it is not there."""
    if not path.startswith("$"):
        raise LookupError(f"not a record path: {path!r}")
    pos, cur = 1, doc
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m:
            raise LookupError(f"cannot read {path!r} at {path[pos:]!r}")
        if m.group(2) is not None:
            idx = int(m.group(2))
            if not isinstance(cur, list) or idx >= len(cur):
                raise LookupError(f"{path}: no item {idx}")
            cur = cur[idx]
        else:
            key = m.group(1) if m.group(1) is not None else orjson.loads(m.group(3))
            if not isinstance(cur, dict) or key not in cur:
                raise LookupError(f"{path}: no key {key!r}")
            cur = cur[key]
        pos = m.end()
    return cur


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 1 << 20
    max_document_bytes: int = 256 << 20


def read_records(path: Path, container: str | None, compressed: bool, record_paths: tuple[RecordPath, ...] = (),
                 limits: Limits = Limits(), strict: bool = False) -> Iterator[Line]:
    """Every record of a source file, good or bad (see the module docstring). With `strict`
    (record paths the operator configured), a document they do not match is refused as
    record_path_missing instead of being read as one record."""
    if container == "lines":
        yield from _read_lines(path, compressed, record_paths, limits, strict)
    elif container == "csv":
        yield from _read_csv(path, compressed, limits)
    elif container == "json":
        yield from _read_document(path, compressed, record_paths, limits, strict)
    elif container == "zip":
        yield from _read_archive(path, record_paths, limits)
    else:
        raise ValueError(f"unknown container {container!r}")


def read_span(path: Path, start: int, end: int, first_line: int, limits: Limits = Limits()) -> Iterator[Line]:
    """The lines of an uncompressed JSONL file from byte `start` (a line's start: line number
    `first_line`) up to byte `end`, numbered as in the whole file (refinery.partitions)."""
    with open(path, "rb") as f:
        f.seek(start)
        yield from iter_lines(f, limits.max_line_bytes, first_line, end)


class _Bounded(io.RawIOBase):
    """The next `left` bytes of a binary file, as a file of their own."""

    def __init__(self, f: Any, left: int):
        self.f, self.left = f, left

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.left <= 0:
            return 0
        n = self.f.readinto(memoryview(b)[:min(len(b), self.left)]) or 0
        self.left -= n
        return n


@contextlib.contextmanager
def span_text(path: Path, start: int, end: int) -> Iterator[io.TextIOWrapper]:
    """Bytes `start` to `end` of a file as text, decoded as _read_csv decodes the whole file."""
    with open(path, "rb") as f:
        f.seek(start)
        yield io.TextIOWrapper(io.BufferedReader(_Bounded(f, end - start)), encoding="utf-8",
                               errors="surrogateescape", newline="")


def read_csv_span(path: Path, start: int, end: int, first_line: int, header: list[str] | None,
                  limits: Limits = Limits()) -> Iterator[Line]:
    """The records of a CSV file from byte `start` (where a record starts: physical line
    `first_line`) up to byte `end`; `header`: the file's (None for the range that holds it)."""
    from refinery.sources import read_csv_stream

    with span_text(path, start, end) as text:
        yield from read_csv_stream(text, limits.max_line_bytes, header, first_line)


def _damage(offset: int, what: str, err: BaseException) -> Line:
    return Line(offset, b"", None, Reason.DAMAGED_CONTAINER, f"{what}: {type(err).__name__}: {err}")


def _no_path(n: int, record_paths: tuple[RecordPath, ...], where: str, raw: bytes | None) -> Line:
    return Line(n, raw, None, Reason.RECORD_PATH_MISSING,
                f"{where}: no record at {' or '.join(repr(p.text) for p in record_paths)}", where)


def _read_lines(path: Path, compressed: bool, record_paths: tuple[RecordPath, ...], limits: Limits,
                strict: bool = False) -> Iterator[Line]:
    n = 0
    with open_binary(path, compressed) as f:
        lines = iter_lines(f, limits.max_line_bytes)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                yield _damage(n, f"the gzip stream breaks off after {n} records", e)
                return
            obj = line.obj
            if obj is not None and record_paths:
                found = [(loc, rec, ps) for p in record_paths if p.matches(obj) for loc, rec, ps in p.expand(obj)]
                if found:
                    for loc, rec, parents in found:
                        yield _record(n, rec, f"line {line.offset} {loc}", parents)
                        n += 1
                    continue
                if strict:
                    yield _no_path(n, record_paths, f"line {line.offset} $", line.raw)
                    n += 1
                    continue
            # once a line has held several records, a line's offset is no longer its line: say which
            yield line if line.offset == n else line._replace(offset=n, record=f"line {line.offset}")
            n += 1


def _record(n: int, rec: Any, where: str, parents: tuple[Any, ...]) -> Line:
    if type(rec) is not dict:
        return Line(n, orjson.dumps(rec), None, Reason.NOT_AN_OBJECT,
                    f"{where}: expected a JSON object, got a JSON {type(rec).__name__}", where, parents)
    return Line(n, None, rec, None, None, where, parents)


def _read_csv(path: Path, compressed: bool, limits: Limits) -> Iterator[Line]:
    from refinery.sources import read_csv_stream

    try:
        with open_binary(path, compressed) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
            last = -1
            try:
                for line in read_csv_stream(text, limits.max_line_bytes):
                    last = line.offset
                    yield line
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                yield _damage(last + 1, f"the gzip stream breaks off after line {last}", e)
    except UnicodeDecodeError as e:  # only a BOM check can get here; rows keep bad bytes escaped
        yield _damage(0, "cannot decode", e)


def _slurp(f: Any, cap: int) -> bytes | None:
    data = f.read(cap + 1)
    return None if len(data) > cap else data


def _too_large(what: str, cap: int) -> Line:
    return Line(0, b"", None, Reason.DOCUMENT_TOO_LARGE, f"{what} is over the {cap}-byte limit "
                "(materialize.max_document_bytes); convert it to JSONL or raise the limit")


def _parse_document(data: bytes, where: str) -> tuple[Any, Line | None]:
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    try:
        return orjson.loads(data), None
    except orjson.JSONDecodeError as e:
        try:
            data.decode("utf-8")
            reason, detail = Reason.INVALID_JSON, f"{where} is not a complete JSON document (cut short?): {e}"
        except UnicodeDecodeError as u:
            reason, detail = Reason.INVALID_UTF8, f"{where}: invalid UTF-8 byte at offset {u.start}"
        return None, Line(0, data, None, reason, detail, where if where != "the file" else "$")


def _expand_document(doc: Any, record_paths: tuple[RecordPath, ...], start: int, prefix: str,
                     parents: tuple[Any, ...] = (), strict: bool = False) -> Iterator[Line]:
    n = start
    # a document whose record paths reach no record is a record itself: it is never lost
    found = [(loc, rec, ps) for p in record_paths if p.matches(doc) for loc, rec, ps in p.expand(doc)]
    if strict and not found:
        yield _no_path(n, record_paths, prefix + "$", orjson.dumps(doc))
    elif found:
        for loc, rec, ps in found:
            yield _record(n, rec, prefix + loc, (*parents, *ps))
            n += 1
    elif isinstance(doc, list):
        for i, rec in enumerate(doc):
            yield _record(n, rec, f"{prefix}$[{i}]", (*parents, doc))
            n += 1
    else:
        yield _record(n, doc, prefix + "$", parents)


def read_document(path: Path, compressed: bool, cap: int) -> tuple[Any, Line | None]:
    """A whole JSON document: (the parsed document, None), (None, the refusal of the whole file:
    cut-off gzip, over `cap` bytes, not JSON), or (None, None) for an empty file."""
    try:
        with open_binary(path, compressed) as f:
            data = _slurp(f, cap)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return None, _damage(0, "the gzip stream breaks off", e)
    if data is None:
        return None, _too_large("the document", cap)
    if not data.strip():
        return None, None
    return _parse_document(data, "the file")


def _read_document(path: Path, compressed: bool, record_paths: tuple[RecordPath, ...], limits: Limits,
                   strict: bool = False) -> Iterator[Line]:
    doc, bad = read_document(path, compressed, limits.max_document_bytes)
    if bad is not None:
        yield bad
    elif doc is not None:  # an empty file has no records (materialize warns)
        yield from _expand_document(doc, record_paths, 0, "", strict=strict)


def archive_members(zf: zipfile.ZipFile) -> list[str]:
    return [i.filename for i in zf.infolist() if not i.is_dir()]


ZIP_ZSTANDARD = 93  # inspect_ai's .eval members; Python's zipfile reads it only from 3.14


def _read_zstd_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A Zstandard-compressed member, read from its local header (zipfile cannot before 3.14)."""
    import struct

    import zstandard

    if info.flag_bits & 0x1:
        raise RuntimeError(f"{info.filename} is encrypted")
    fp = zf.fp
    fp.seek(info.header_offset)
    header = fp.read(30)
    if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    fp.seek(info.header_offset + 30 + name_len + extra_len)
    compressed = fp.read(info.compress_size)
    # read at most the size the archive declares: a frame that claims more is a bomb, not a log
    with zstandard.ZstdDecompressor().stream_reader(compressed) as reader:
        data = reader.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise zipfile.BadZipFile(f"{info.filename} decompresses to more than the {info.file_size} bytes declared")
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"CRC mismatch in {info.filename}")
    return data


def read_member(zf: zipfile.ZipFile, name: str, cap: int) -> tuple[Any, Line | None]:
    """An archive member's JSON document: (document, None) or (None, its refusal)."""
    info = zf.getinfo(name)
    if info.file_size > cap:
        return None, _too_large(f"archive member {name}", cap)._replace(record=name)
    try:
        if info.compress_type == ZIP_ZSTANDARD and not _zip_reads_zstd():
            data = _read_zstd_member(zf, info)
        else:
            data = zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError,
            OSError, _zstd_error()) as e:  # RuntimeError: an encrypted member; ZstdError: damaged data
        return None, _damage(0, f"archive member {name} cannot be read", e)._replace(record=name)
    doc, bad = _parse_document(data, f"archive member {name}")
    return doc, (bad._replace(record=name) if bad is not None else None)


def _zstd_error() -> type[Exception]:
    try:
        import zstandard

        return zstandard.ZstdError
    except ImportError:  # pragma: no cover - zstandard is a dependency
        return ValueError


def _zip_reads_zstd() -> bool:
    return getattr(zipfile, "ZIP_ZSTANDARD", None) == ZIP_ZSTANDARD


def _archive_header(zf: zipfile.ZipFile, names: list[str], cap: int) -> tuple[Any, Line | None]:
    """The archive's header (see ARCHIVE_HEADERS): (document, None), (None, its refusal), or
    (None, None) when it has none."""
    first = next((h for h in ARCHIVE_HEADERS if h in names), None)
    return read_member(zf, first, cap) if first is not None else (None, None)


def member_globs(record_paths: tuple[RecordPath, ...] | tuple[str, ...]) -> list[str]:
    return [p.text if isinstance(p, RecordPath) else p for p in record_paths]


def _read_archive(path: Path, record_paths: tuple[RecordPath, ...], limits: Limits) -> Iterator[Line]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        yield _damage(0, "not a readable zip archive", e)
        return
    with zf:
        names = archive_members(zf)
        globs = member_globs(record_paths) or ["*.json"]
        header, bad = _archive_header(zf, names, limits.max_document_bytes)
        if bad is not None:
            yield bad
            return
        n = 0
        for name in names:
            if not any(fnmatchcase(name, g) for g in globs):
                continue
            doc, bad = read_member(zf, name, limits.max_document_bytes)
            if bad is not None:
                yield bad._replace(offset=n)
            else:
                yield _record(n, doc, name, ({} if header is None else header,))
            n += 1


# --- resolving a record again (trace, audit) ------------------------------------------------


def split_locator(record: str) -> tuple[str, int | None, str | None]:
    """A locator → (kind, line, path/member): ("doc", None, "$.a[1]"), ("line", 4, "$.x"),
    ("member", None, "samples/1.json")."""
    if record.startswith("$"):
        return "doc", None, record
    if record.startswith("line "):
        num, _, path = record[5:].partition(" ")
        return "line", int(num), path
    return "member", None, record


# --- probing (what importers detect formats from) ------------------------------------------


@dataclass
class Probe:
    """What content detection sees of a file: its container and its first records."""

    container: str
    records: list[dict[str, Any]] = field(default_factory=list)
    """the first objects: JSONL lines, a top-level array's items, the document itself, CSV rows"""
    document: Any = None
    """a whole JSON document (container json), else None"""
    members: list[str] = field(default_factory=list)
    """an archive's member names"""
    header: Any = None
    """an archive's header.json"""
    columns: list[str] = field(default_factory=list)
    """a CSV file's header"""

    def mostly(self, pred) -> bool:
        """Whether most probed records (at least 60 %, and one) satisfy `pred`: a file with a few
        broken or foreign records is still recognised, and those records are refused one by one."""
        hits = sum(1 for r in self.records if _safe(pred, r))
        return hits >= 1 and hits * 5 >= len(self.records) * 3


def _safe(pred, r) -> bool:
    try:
        return bool(pred(r))
    except (KeyError, TypeError, AttributeError, ValueError):
        return False


def probe(path: Path, container: str, compressed: bool, limits: Limits = Limits()) -> Probe:
    pr = Probe(container)
    try:
        if container == "zip":
            with zipfile.ZipFile(path) as zf:
                pr.members = archive_members(zf)
                pr.header, _ = _archive_header(zf, pr.members, limits.max_document_bytes)
            return pr
        if container == "json":
            doc, bad = read_document(path, compressed, limits.max_document_bytes)
            if doc is not None:
                pr.document = doc
                items = doc if isinstance(doc, list) else [doc]
                pr.records = [r for r in items[:PROBE_RECORDS] if isinstance(r, dict)]
            return pr
        if container == "lines":
            with open_binary(path, compressed) as f:
                for line in iter_lines(f, limits.max_line_bytes):
                    if line.obj is not None:
                        pr.records.append(line.obj)
                    if len(pr.records) >= PROBE_RECORDS or line.offset >= 64:
                        break
            return pr
        if container == "csv":
            for line in _read_csv(path, compressed, limits):
                if line.obj is not None:
                    pr.records.append(line.obj)
                    if not pr.columns:
                        pr.columns = list(line.obj)
                if len(pr.records) >= PROBE_RECORDS or line.offset >= 64:
                    break
            return pr
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, csv.Error, RuntimeError, ValueError):
        return pr
    return pr
