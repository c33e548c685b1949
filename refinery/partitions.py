"""Byte-range partitions: a large JSONL or CSV source cut into line-aligned ranges, worked on in parallel.

One 20 GB source file would otherwise be one unit of work. A file larger than
`materialize.partition_bytes` is cut into ranges of about that size, each starting at the start
of a line; materialize works on each range as it would on a file of its own, and puts the
file's results back together. Nothing in the outputs depends on the cut:

- provenance stays file-global: a range knows the number of its first line;
- "an exact duplicate of an earlier record in this file" stays file-wide: a first, cheap pass
  over every range (in parallel) lists each record's 64-bit hash, and the duplicates are found
  in file order from those lists before any range is worked on;
- each range's evidence, quarantine and single-pass tails are parts, put together in range
  order, as the parts of a joined source's partitions already are.

A CSV record may hold line breaks inside quotes, so a cut at a line start may fall inside one:
the first pass also reads each range the csv module's way (refinery.sources.record_ends), and a
range that does not end between records is joined to the next and read again (materialize).
Every range after the first reads the file's header, as the first range read it.

Only what can be cut this way is cut: uncompressed JSONL and CSV read record by record by an
importer module (not a declarative mapping, whose "this path matched nothing" is said per
file; not a joined source; no record paths). Everything else is one unit per file, as before.
"""

from __future__ import annotations

import errno
import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from refinery.containers import Limits, read_csv_span, read_span, span_text
from refinery.dedup import SeenHashes
from refinery.jsonl import Line


@dataclass(frozen=True)
class Span:
    """One byte range of a source file, and what the file-wide pass found for it."""

    start: int
    end: int
    first_line: int
    """the number of its first line in the file"""
    dups: array
    """line numbers of its records that repeat an earlier record of the file (array('q'),
    ascending: 8 bytes a duplicate, in the driver and on the way to the worker)"""
    header: tuple[str, ...] | None = None
    """a CSV's header, read from the first range, for the ranges after it"""

    def read(self, path: Path, limits: Limits) -> Iterator[Line]:
        """Its records, numbered as in the whole file."""
        if self.header is None:
            return read_span(path, self.start, self.end, self.first_line, limits)
        return read_csv_span(path, self.start, self.end, self.first_line,
                             None if self.start == 0 else list(self.header), limits)


def cut(path: Path, size: int, target: int) -> list[tuple[int, int]]:
    """Line-aligned (start, end) ranges of about `target` bytes covering the file (one range,
    the whole file, when it cannot be read: read in one piece, it says so for itself)."""
    try:
        return _cut(path, size, target)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise
        return [(0, size)]


def _cut(path: Path, size: int, target: int) -> list[tuple[int, int]]:
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + target < size:
            f.seek(bounds[-1] + target - 1)  # from the byte before: a cut right after a newline stays there
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            bounds.append(pos)
    return list(zip(bounds, [*bounds[1:], size], strict=True))


def scan(path: Path, start: int, end: int, max_line_bytes: int, out: Path,
         header: tuple[str, ...] | None = None) -> tuple[int, bool]:
    """The first pass over a range: (the number of its lines, whether it ends between records),
    and into `out` each record's line number in the range and the first 64 bits of its
    sig_hash — the records materialize checks for duplicates: those that parse to an object
    orjson can write back. `header`: a CSV's (JSONL: None)."""
    try:
        return _scan(path, start, end, max_line_bytes, out, header)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE):
            raise  # the disk or the system: the run stops and says so
        return -1, False  # unreadable here: the file is read in one piece, which says so for it


def _scan(path: Path, start: int, end: int, max_line_bytes: int, out: Path,
          header: tuple[str, ...] | None) -> tuple[int, bool]:
    offsets, hashes = array("q"), array("Q")
    sha256, dumps, sort_keys, from_bytes = hashlib.sha256, orjson.dumps, orjson.OPT_SORT_KEYS, int.from_bytes
    limits, lines, between = Limits(max_line_bytes), 0, True
    if header is None:
        # the file's first line is line 0 (its byte-order mark is dropped only there)
        base = 0 if start == 0 else 1
        records: Iterator[Line] = read_span(path, start, end, base, limits)
    else:
        from refinery.sources import record_ends

        with span_text(path, start, end) as text:
            lines, between = record_ends(text)
        base = 0
        records = read_csv_span(path, start, end, 0, None if start == 0 else list(header), limits)
    for line in records:
        if header is None:
            lines += 1
        if line.obj is None:
            continue
        try:
            digest = sha256(dumps(line.obj, option=sort_keys)).digest()
        except TypeError:  # nested too deep: refused before the duplicate check
            continue
        offsets.append(line.offset - base)
        hashes.append(from_bytes(digest[:8], "little"))
    with open(out, "wb") as f:
        f.write(len(offsets).to_bytes(8, "little"))
        offsets.tofile(f)
        hashes.tofile(f)
    return lines, between


def spans(ranges: list[tuple[int, int]], scanned: list[tuple[int, bool]], found: list[Path], expected_rows: int,
          header: tuple[str, ...] | None = None) -> list[Span] | None:
    """The ranges numbered (each range's first line: the lines of those before it) with the
    duplicates among their records, in file order — what one reader of the whole file finds.
    None when a range but the last does not end between records, or one could not be read: the
    file is not to be cut."""
    if not all(between for _, between in scanned[:-1]) or any(n < 0 for n, _ in scanned):
        return None
    seen_add = SeenHashes(expected=expected_rows).add
    out, first = [], 0
    for (start, end), (n, _), path in zip(ranges, scanned, found, strict=True):
        with open(path, "rb") as f:
            count = int.from_bytes(f.read(8), "little")
            offsets, hashes = array("q"), array("Q")
            offsets.fromfile(f, count)
            hashes.fromfile(f, count)
        dups = array("q", (first + o for o, h in zip(offsets, hashes, strict=True) if not seen_add(h)))
        out.append(Span(start, end, first, dups, header))
        first += n
    return out
