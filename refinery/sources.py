"""Source streams: listing the files under data/_kb and reading their rows.

Both readers yield `refinery.jsonl.Line`s — every row, good or bad, with its 0-based line
offset — so the materializer accounts for each one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from refinery.jsonl import Line, read_jsonl
from refinery.reasons import Reason
from refinery.workspace import Workspace

FORMATS = {".jsonl": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kb_rel: str
    """path relative to data/_kb, e.g. "runs.csv" — what transform patterns match"""
    ws_rel: str
    """path relative to the workspace, e.g. "data/_kb/runs.csv" — what provenance records"""
    format: str
    size: int

    @property
    def source(self) -> str:
        """The stream's name: its path under data/_kb without the extension."""
        return self.kb_rel.rsplit(".", 1)[0].replace("/", ".")


#: data/_kb/ also holds the audit's baseline ledger (refinery.audit).
ALWAYS_IGNORED = "audit_baselines.jsonl"


def list_sources(ws: Workspace, ignore: list[str]) -> tuple[list[SourceFile], list[str]]:
    """(source files, in sorted order; ignored files) under data/_kb."""
    sources, ignored = [], []
    if not ws.kb.is_dir():
        return sources, ignored
    for path in sorted(p for p in ws.kb.rglob("*") if p.is_file()):
        kb_rel = path.relative_to(ws.kb).as_posix()
        if any(part.startswith(".") for part in kb_rel.split("/")):
            continue
        fmt = FORMATS.get(path.suffix.lower())
        # the audit's ledger lives here but is never a stream, whatever materialize.ignore says
        if fmt is None or kb_rel == ALWAYS_IGNORED or any(fnmatchcase(kb_rel, g) for g in ignore):
            ignored.append(kb_rel)
            continue
        sources.append(SourceFile(path, kb_rel, ws.rel(path), fmt, path.stat().st_size))
    return sources, ignored


def csv_raw(fields: list[str]) -> bytes:
    """A CSV record as one line of bytes (invalid UTF-8 restored as it was in the file)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def read_csv(path: Path, max_line_bytes: int) -> Iterator[Line]:
    """Yield every CSV record after the header as a dict row (header → value).

    `offset` is the physical line the record starts on (the header is line 0).
    """
    csv.field_size_limit(max_line_bytes)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Line(0, b"", None, Reason.CSV_MALFORMED, f"unreadable header: {e}")
            return
        header_problem = None
        if len(set(header)) != len(header) or any(not h for h in header):
            header_problem = f"the header has empty or repeated column names: {header}"
        try:
            "".join(header).encode("utf-8")
        except UnicodeEncodeError:
            header_problem = "the header is not valid UTF-8"
        ncols = len(header)
        start = reader.line_num
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                reason = Reason.LINE_TOO_LONG if "field larger" in str(e) else Reason.CSV_MALFORMED
                yield Line(start, b"", None, reason, f"{e}")
                start = reader.line_num
                continue
            offset, start = start, reader.line_num
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


def read_rows(src: SourceFile, max_line_bytes: int) -> Iterator[Line]:
    if src.format == "csv":
        return read_csv(src.path, max_line_bytes)
    return read_jsonl(src.path, max_line_bytes)
