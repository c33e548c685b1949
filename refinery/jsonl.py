"""Streaming JSONL reading and atomic writing.

`read_jsonl` yields every physical line of a file — good or bad — with its 0-based line
offset; it never stops at a bad line. Writers go through a temporary file that is fsynced and
renamed into place, so a killed process never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from refinery.reasons import Reason

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB
UTF8_BOM = b"\xef\xbb\xbf"


class Line(NamedTuple):
    """One record of a source or output file: a physical JSONL line, a CSV record, or a record
    inside a JSON document or archive (see refinery.containers).

    Exactly one of `obj` / `reason` is set. `raw` holds the line's bytes without the line
    terminator (for a line over the size limit: only its first bytes); a reader may leave it
    None for a parsed record, to be rebuilt only if the record is refused. `record` pins a
    record that is not a whole line (`$.samples[3]`, `samples/3_epoch_1.json`, ...); `parents`
    are the objects enclosing it in its document, outermost first.
    """

    offset: int
    raw: bytes | None
    obj: dict[str, Any] | None
    reason: Reason | None
    detail: str | None
    record: str | None = None
    parents: tuple[Any, ...] = ()


def _classify_unparseable(raw: bytes, err: Exception) -> tuple[Reason, str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reason.INVALID_UTF8, f"invalid UTF-8 byte at column {e.start + 1}"
    return Reason.INVALID_JSON, str(err)


def read_jsonl(path: str | os.PathLike, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Line]:
    """Yield every line of `path` with its offset and either its parsed object or a reason."""
    with open(path, "rb") as f:
        yield from iter_lines(f, max_line_bytes)


def iter_lines(f: Any, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, first: int = 0,
               end: int | None = None) -> Iterator[Line]:
    """`read_jsonl` over an open binary stream (a file, a gzip stream, a zip member). A byte
    range of a file: `f` positioned at a line's start, `first` that line's number in the file,
    `end` the position (a line's start, or the end of the file) to stop at."""
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    limit = max_line_bytes + 2  # room for "\r\n"
    readline = f.readline
    tell = f.tell if end is not None else None
    offset = first - 1
    while True:
        if tell is not None and tell() >= end:
            return
        raw = readline(limit)
        if not raw:
            return
        offset += 1
        if len(raw) == limit and not raw.endswith(b"\n"):
            # Over the limit: drain the rest of the line without holding it in memory.
            total = len(raw)
            while chunk := readline(1 << 20):
                total += len(chunk)
                if chunk.endswith(b"\n"):
                    total -= 2 if chunk.endswith(b"\r\n") else 1
                    break
            yield Line(offset, raw[:256], None, Reason.LINE_TOO_LONG,
                       f"line is {total} bytes, over the {max_line_bytes}-byte limit")
            continue
        raw = raw.rstrip(b"\r\n")
        if offset == 0 and raw.startswith(UTF8_BOM):  # Windows tools start files with one
            raw = raw[len(UTF8_BOM):]
        if not raw.strip():
            yield Line(offset, raw, None, Reason.BLANK_LINE, "blank line")
            continue
        try:
            obj = loads(raw)
        except decode_error as err:
            reason, detail = _classify_unparseable(raw, err)
            yield Line(offset, raw, None, reason, detail)
            continue
        if type(obj) is not dict:
            yield Line(offset, raw, None, Reason.NOT_AN_OBJECT,
                       f"expected a JSON object, got a JSON {type(obj).__name__}")
            continue
        yield Line(offset, raw, obj, None, None)


class HashingReader:
    """A binary stream for `iter_lines` that hashes every byte it hands out: a stage that reads a
    whole file once gets its sha256 from that read, not from a second one."""

    def __init__(self, f: Any):
        self._f = f
        self.sha256 = hashlib.sha256()

    def readline(self, limit: int = -1) -> bytes:
        data = self._f.readline(limit)
        self.sha256.update(data)
        return data


class LineCursor:
    """Forward-only access by line offset to a stream of Lines (from read_jsonl / read_csv)."""

    def __init__(self, lines: Iterator[Line]):
        self._lines = lines
        self._last: Line | None = None

    def at(self, offset: int) -> Line | None:
        """The line at `offset`, or None if the stream has no such line (or is already past it)."""
        while self._last is None or self._last.offset < offset:
            self._last = next(self._lines, None)
            if self._last is None:
                return None
        return self._last if self._last.offset == offset else None


def dumps_line(obj: Any) -> bytes:
    """One JSONL line: compact JSON in the dict's own (fixed) key order, plus a newline."""
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


#: Errors of writing that no source is to blame for: a full disk, a quota, a read-only file system.
WRITE_FAILED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

#: Every output is fsynced before it is renamed into place, so that a power cut cannot leave a
#: renamed but empty file. A killed process does not need it (the page cache outlives the
#: process), so a throwaway workspace — the test suite — may turn it off with REFINERY_FSYNC=0.
DURABLE = os.environ.get("REFINERY_FSYNC", "1") != "0"


def fsync(fd: int) -> None:
    if DURABLE:
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    if not DURABLE:
        return
    with contextlib.suppress(OSError):  # not every platform/file system allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`.

    On any exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class JsonlWriter:
    """Writes dicts as JSONL lines, counting rows and hashing the bytes as it goes."""

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self.rows = 0

    def write(self, obj: Any) -> None:
        self.write_line(dumps_line(obj))

    def switch(self, f) -> None:
        """Go on writing into `f` (the same file opened again to append): rows and hash go on."""
        self._f = f

    def write_line(self, data: bytes) -> None:
        """One line already serialized (`dumps_line`), newline included."""
        self._f.write(data)
        self._h.update(data)
        self.rows += 1

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def write_jsonl_atomic(path: str | os.PathLike, rows) -> tuple[int, str]:
    """Write `rows` to `path` atomically; return (row count, sha256 of the file)."""
    with atomic_write(path) as f:
        w = JsonlWriter(f)
        for row in rows:
            w.write(row)
    return w.rows, w.sha256


def concat_files(parts: list[Path], dest: Path) -> tuple[int, str]:
    """Concatenate JSONL `parts` into `dest` atomically; return (rows, sha256 of dest)."""
    h = hashlib.sha256()
    rows = 0
    with atomic_write(dest) as out:
        for part in parts:
            with open(part, "rb") as pf:
                while block := pf.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    rows += block.count(b"\n")
    return rows, h.hexdigest()


def publish_dir(staging: Path, target: Path) -> None:
    """Atomically (as far as the file system allows) replace directory `target` by `staging`.

    The old tree is moved aside first and only deleted once the new one is in place; if the
    process dies between the two renames, `recover_dir` puts the old tree back.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, trash)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if trash.exists():
        shutil.rmtree(trash)


def recover_dir(target: Path) -> None:
    """Undo what a killed `publish_dir` / staging step left behind next to `target`."""
    parent = target.parent
    if not parent.exists():
        return
    olds, links = [], []
    for p in sorted(parent.glob(f".{target.name}.old-*")):
        (links if p.is_symlink() else olds).append(p)
    for link in links:  # never put a link back: refinery only ever moves its own folders aside
        link.unlink()
    if olds and not target.exists():
        os.replace(olds[0], target)
        olds = olds[1:]
    for leftover in [*olds, *parent.glob(f".{target.name}.staging-*")]:
        if leftover.is_symlink():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)


#: In a run's staging root: the moves still to make, so a publish killed half-way can be completed.
PUBLISH_JOURNAL = "PUBLISH.json"
RUN_STAGING_PREFIX = ".run-"
#: The stages' temporary folders in data/ (part files): a killed stage leaves one behind.
STAGE_TEMP_PREFIXES = (".materialize-", ".score-", ".export-")


def publish_together(root: Path, staging_root: Path, moves: list[tuple[str, str]]) -> None:
    """Move several staged trees and files (paths relative to `root`) into place together.

    The list of moves is journaled in `staging_root` first: if the process dies part-way,
    the next holder of the workspace lock completes them (`finish_publishes`), so the
    workspace never stays a mix of two runs.
    """
    journal = staging_root / PUBLISH_JOURNAL
    with atomic_write(journal) as f:
        f.write(orjson.dumps({"moves": [list(m) for m in moves]}))
    _apply_moves(root, moves)
    shutil.rmtree(staging_root, ignore_errors=True)


def _apply_moves(root: Path, moves: list[tuple[str, str]]) -> None:
    for src, dest in moves:
        s, d = root / src, root / dest
        recover_dir(d)  # an old tree moved aside by a killed publish_dir goes back first
        if s.is_dir():
            publish_dir(s, d)
        elif s.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(s, d)
            fsync_dir(d.parent)


def finish_publishes(data_dir: Path, check: Callable[[Path, list[tuple[str, str]] | None], None]) -> list[str]:
    """Complete journaled publishes that a killed run left; drop unpublished run stagings and
    the stages' temporary folders. Call it only while holding the workspace lock. `check`
    sees every journal's moves (None: unreadable) before any is applied, and raises to refuse
    them. Returns the names of the folders it dealt with."""
    done: list[str] = []
    if not data_dir.is_dir():
        return done
    journaled = []
    for staging in sorted(data_dir.glob(RUN_STAGING_PREFIX + "*")):
        journal = staging / PUBLISH_JOURNAL
        moves = None
        if journal.is_file() or staging.is_symlink():
            try:
                moves = [(str(a), str(b)) for a, b in orjson.loads(journal.read_bytes())["moves"]]
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                moves = None
            check(staging, moves)
        journaled.append((staging, moves))
    for staging, moves in journaled:
        if moves is not None:
            _apply_moves(data_dir.parent, moves)
        shutil.rmtree(staging, ignore_errors=True)
        done.append(staging.name)
    for prefix in STAGE_TEMP_PREFIXES:
        for temp in sorted(data_dir.glob(prefix + "*")):
            shutil.rmtree(temp, ignore_errors=True)
            done.append(temp.name)
    return done


@contextlib.contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """A fresh staging folder that replaces directory `target` as a whole when the block ends
    without an error, and is dropped when it raises (a killed process leaves it to the next
    `recover_dir`): readers see the old tree or the new one, never half of one."""
    recover_dir(target)
    staging = staging_dir(target)
    try:
        yield staging
        publish_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A fresh staging directory beside `target`, for `publish_dir`."""
    d = target.with_name(f".{target.name}.staging-{os.getpid()}")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d
