"""Stage 1 — materialize: every source record becomes evidence, joins another's evidence, or is
quarantined with a reason.

    data/_kb/<stream>.<jsonl|csv|json|eval|...>[.gz]
        ──▶  data/evidence/YYYY/MM/DD/<stream>.jsonl   (EvidenceRecord)
        ──▶  exports/quarantine/materialize.jsonl       (QuarantineRecord)

How it runs. The importer of each file is decided first (refinery.discovery: refinery.toml,
file name, or content). Then, in worker processes, one file each:

- a record is read from its container (refinery.containers) and, unless it is bad, a
  duplicate or unclaimed, handed to its importer's `transform` — one evidence record (or
  several, one per `part`) or a refusal;
- a record of an importer that joins (`join_key`) is spilled instead, with its key, into one
  of N hash buckets on disk.

Then each bucket is read back — one at a time per worker, so memory holds one bucket, never a
whole file — its records grouped by key and handed to the importer's `assemble`, which emits
evidence with the records joined into it. Outputs are written into part files and put
together in a fixed order (files in path order, then buckets in order), published by one
rename of a staging folder: the same inputs give the same bytes, whatever the worker count.

Accounting, per file: rows in = records that became evidence + records joined into another's
evidence + records quarantined (a record split into several parts is one record in).

With a single-pass plan (run-all's; refinery.single_pass), every evidence line is also scored
and read for the exports as it is written, into a tail beside its part; once the partitions are
put together, the tails of a partition made of several parts are joined (renumbered), and the
result's `prepared` hands them all to score and export.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from refinery import partitions, sensitive
from refinery.canonical import file_sha256
from refinery.containers import Limits, span_text
from refinery.config import Config, MaterializeConfig, table_name
from refinery.dedup import SeenHashes
from refinery.discovery import Claim, Registry, Transform
from refinery.errors import AccountingError
from refinery.jsonl import (
    WRITE_FAILED, JsonlWriter, concat_files, dumps_line, fsync, fsync_dir, publish_dir, recover_dir, staging_dir,
)
from refinery.mapping import unmatched_paths
from refinery.parallel import map_files
from refinery.quarantine import quarantine_record
from refinery.reasons import Reason
from refinery.single_pass import Plan, Prepared, Tail, TailResult, join_tails, open_tails
from refinery.sources import SourceFile, csv_header, csv_raw, list_sources, read_rows
from refinery.stages import StageResult, by_source
from refinery.transform import (
    PART_KEY, UNDATED, Emit, FieldHits, GroupContext, Keyed, Member, Refusal, Refuse, RowContext, RowError,
)
from refinery.workspace import Workspace, quarantine_file

STAGE = "materialize"
#: Spilled join records per bucket (bytes): bounds what one bucket's grouping holds in memory.
BUCKET_BYTES = 8 << 20
MAX_BUCKETS = 4096


@dataclass
class FileResult:
    source_file: str
    source: str
    transform: str | None
    input_sha256: str | None
    rows_in: int = 0
    evidence: int = 0
    quarantined: int = 0
    joined: int = 0
    """records merged into another record's evidence (a join)"""
    split: int = 0
    """evidence records beyond the first made from one record (e.g. the rejected side of a pair)"""
    undated: int = 0
    """evidence records with no time of their own, of their document or partner, or configured"""
    dropped_fields: dict[str, int] = field(default_factory=dict)
    """optional fields a mapping dropped for a wrong type (the rows were kept), by field"""
    by_reason: dict[str, int] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    """evidence path (relative to the evidence root) → rows"""
    transform_errors: int = 0
    first_transform_error: str | None = None
    file_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    container: str | None = None
    claimed_because: str | None = None
    unreadable: bool = False
    """the file could not be read: its one quarantine record is outside the counts"""
    tails: list[TailResult] = field(default_factory=list, repr=False)
    """with a single-pass plan: its evidence parts' scoring and export reading (not reported)"""
    absent: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)
    """a CSV's columns its importer needs and it lacks → the rows refused for each, by reason"""
    columns: list[str] = field(default_factory=list, repr=False)
    """that CSV's header (for the warning)"""

    def add(self, other: dict[str, Any]) -> None:
        """Fold in what a join bucket did with this file's records."""
        self.evidence += other["evidence"]
        self.quarantined += other["quarantined"]
        self.joined += other["joined"]
        self.split += other["split"]
        self.undated += other["undated"]
        self.by_reason = dict(sorted((Counter(self.by_reason) + Counter(other["by_reason"])).items()))
        for rel, n in other["partitions"].items():
            self.partitions[rel] = self.partitions.get(rel, 0) + n
        self.partitions = dict(sorted(self.partitions.items()))
        self.transform_errors += other["transform_errors"]
        if self.first_transform_error is None:
            self.first_transform_error = other["first_transform_error"]


@dataclass
class MaterializeResult:
    files: list[FileResult]
    ignored: list[str]
    outputs: list[dict[str, Any]]
    """[{path, sha256, rows}] of every evidence file and the quarantine file"""
    seconds: float
    prepared: Prepared | None = None
    """with a single-pass plan: the partitions scored and read for the exports as they were written"""

    @property
    def rows_in(self) -> int:
        return sum(f.rows_in for f in self.files)

    @property
    def evidence(self) -> int:
        return sum(f.evidence for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def joined(self) -> int:
        return sum(f.joined for f in self.files)

    @property
    def split(self) -> int:
        return sum(f.split for f in self.files)

    @property
    def by_reason(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for f in self.files:
            c.update(f.by_reason)
        return dict(sorted(c.items()))

    @property
    def transform_errors(self) -> int:
        return sum(f.transform_errors for f in self.files)

    @property
    def file_errors(self) -> list[str]:
        return [f"{f.source_file}: {f.file_error}" for f in self.files if f.file_error]

    @property
    def exit_code(self) -> int:
        """2 when a source file could not be read or is claimed ambiguously, 1 when a transform
        failed on a record, else 0."""
        return 2 if self.file_errors else 1 if self.transform_errors else 0

    def stage_result(self) -> StageResult:
        """What its receipt records: each source read (with the sha256 of the bytes read), and
        the counts, per reason and per source."""
        def per_file(f: FileResult) -> dict[str, int]:
            c = {"rows_in": f.rows_in, "evidence": f.evidence, "quarantined": f.quarantined}
            return {**c, "joined": f.joined, "split": f.split} if f.joined or f.split else c

        return StageResult(
            STAGE, self.outputs,
            counts={"files": len(self.files), "rows_in": self.rows_in, "rows_out": self.evidence,
                    "quarantined": self.quarantined, "joined": self.joined, "split": self.split,
                    "transform_errors": self.transform_errors,
                    "unreadable_files": sum(1 for f in self.files if f.unreadable)},
            by_reason=self.by_reason, by_source=by_source((f.source, per_file(f)) for f in self.files),
            inputs=[{"path": f.source_file, "sha256": f.input_sha256, "rows": f.rows_in}
                    for f in self.files if f.input_sha256])

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": STAGE, "rows_in": self.rows_in, "evidence": self.evidence, "joined": self.joined,
            "split": self.split, "quarantined": self.quarantined, "by_reason": self.by_reason,
            "transform_errors": self.transform_errors, "file_errors": self.file_errors,
            "ignored": self.ignored, "files": [_public(f) for f in self.files],
            "outputs": self.outputs, "seconds": round(self.seconds, 3),
        }


def _public(f: FileResult) -> dict[str, Any]:
    return {x.name: getattr(f, x.name) for x in fields(f) if x.name not in ("tails", "absent", "columns")}


def _validator() -> Callable[[dict[str, Any]], None]:
    from refinery.models import EvidenceRecord

    return EvidenceRecord.model_validate


#: Beside an evidence part: the sha256 of its bytes, taken by its writer.
SHA_SUFFIX = ".sha256"


def partition_rel(recorded_at: str, source: str) -> str:
    return f"{recorded_at[:4]}/{recorded_at[5:7]}/{recorded_at[8:10]}/{source}.jsonl"


class EvidenceSink:
    """Writes one job's evidence into part files by partition, and its refusals. With a single-
    pass plan, each partition's lines are also scored and read for the exports as they are
    written (a `Tail` per partition).

    A source can span years of days, a partition each: only the partitions written most recently
    keep their files open (`max_open`); the others close them and open them again to append."""

    def __init__(self, root: Path, validate: bool, plan: Plan | None = None):
        self.root, self.plan = root, plan
        self.writers: dict[str, list[Any]] = {}  # partition → [its open file or None, its writer]
        self.tails: dict[str, Tail] = {}
        self.open: dict[str, None] = {}  # the partitions with open files, least recently written first
        self.max_open = open_tails(plan.buckets) if plan is not None else _open_parts()
        self.check = _validator() if validate else None

    def write(self, ev: dict[str, Any]) -> str:
        rel = partition_rel(ev["recorded_at"], ev["source"])
        w = self.writers.get(rel)
        if w is None:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "wb", buffering=PART_BUFFER)
            w = self.writers[rel] = [fh, JsonlWriter(fh)]
            if self.plan is not None:
                self.tails[rel] = Tail(self.plan, self.root.name, rel)
        elif w[0] is None:
            w[0] = open(self.root / rel, "ab", buffering=PART_BUFFER)
            w[1].switch(w[0])
        self.open.pop(rel, None)
        self.open[rel] = None
        if len(self.open) > self.max_open:
            self._suspend(next(iter(self.open)))
        data = dumps_line(ev)
        w[1].write_line(data)
        if self.tails:
            self.tails[rel].line(data, w[1].rows - 1)
        return rel

    def _suspend(self, rel: str) -> None:
        del self.open[rel]
        w = self.writers[rel]
        w[0].close()
        w[0] = None
        if rel in self.tails:
            self.tails[rel].suspend()

    def close(self, sync: bool) -> tuple[dict[str, int], list[TailResult]]:
        """Close the parts; beside each, `<part>.sha256` holds the hash of its bytes as they were
        written (what a partition made of one part is, without reading it again). Returns the
        parts' rows and their tails' results."""
        for rel, w in self.writers.items():
            fh = w[0] if w[0] is not None else open(self.root / rel, "ab")
            if sync:
                fh.flush()
                fsync(fh.fileno())
            fh.close()
            w[0] = None
            (self.root / (rel + SHA_SUFFIX)).write_text(w[1].sha256)
        self.open.clear()
        tails = [self.tails[rel].close(w.sha256) for rel, (_, w) in sorted(self.writers.items())
                 if rel in self.tails]
        self.tails.clear()
        return {rel: w.rows for rel, (_, w) in sorted(self.writers.items())}, tails

    def close_files(self) -> None:
        """Close every file still open (after an error: what was written is dropped with the run)."""
        for w in self.writers.values():
            if w[0] is not None:
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    w[0].close()
                w[0] = None
        for tail in self.tails.values():
            with contextlib.suppress(OSError):
                tail.suspend()

    def discard(self) -> None:
        for w in self.writers.values():
            if w[0] is not None:
                w[0].close()
        for rel in self.writers:
            (self.root / rel).unlink(missing_ok=True)
        self.writers.clear()
        self.open.clear()
        for tail in self.tails.values():
            tail.discard()
        self.tails.clear()


#: An evidence part file's write buffer.
PART_BUFFER = 256 << 10
#: At most this many partitions of a job keep their evidence file open (without the single pass).
OPEN_PARTS = 256


def _open_parts() -> int:
    """OPEN_PARTS, or fewer when the open-file limit is low (at most half of it)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OPEN_PARTS if soft == resource.RLIM_INFINITY else max(1, min(OPEN_PARTS, soft // 2))


def _envelope(out: dict[str, Any], source: str, digest: bytes, part: str | None, prov: dict[str, Any],
              trust: str | None) -> dict[str, Any]:
    """Fill the id, source, provenance and trust of an evidence dict made by an importer."""
    id_basis = (source + "\x1f").encode() + digest + (b"\x1f" + part.encode() if part else b"")
    out["id"] = "ev-" + hashlib.sha256(id_basis).hexdigest()[:16]
    out["source"] = source
    if trust is not None:
        out["signals"]["trust"] = trust
    out["provenance"] = prov
    return out


def _provenance(source_file: str, offset: int, record: str | None, part: str | None, sig: str,
                recorded_at: str, joined: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"source_file": source_file, "line_offset": offset}
    if record is not None:
        p["record"] = record
    if part is not None:
        p["part"] = part
    p["sig_hash"] = sig
    p["recorded_at"] = recorded_at
    if joined:
        p["joined"] = joined
    return p


def _distinct_parts(names: list[str | None], what: str) -> None:
    """Several evidence records of one source record need distinct part names (their ids and
    provenance tell them apart by it)."""
    if len(names) > 1 and (None in names or len(set(names)) != len(names)):
        raise TypeError(f"{what} made {len(names)} evidence records without distinct part= names ({names})")


def _parts(out: Any) -> list[tuple[str | None, dict[str, Any]]] | None:
    """An importer's result as [(part, evidence)], or None for a Refusal."""
    if type(out) is Refusal:
        return None
    items = out if isinstance(out, list) else [out]
    parts = [(ev.pop(PART_KEY, None), ev) for ev in items]
    _distinct_parts([p for p, _ in parts], "the transform")
    return parts


# --- spilling join records to hash buckets -----------------------------------------------------

#: Spill files: "b" files hold members by group key (phase B reads them); "a" files hold
#: aliases and the members that name their group by one (resolved in between).
GROUPS, ALIASES = "b", "a"
ALIAS, VIA = "=", "?"


def _bucket(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % buckets


class Spill:
    """One job's lines into a spill folder's bucket files, `<kind><bucket>-<job>.jsonl`, opened
    as needed: the job index in the name keeps every group's members in reading order."""

    def __init__(self, folder: Path, job: int, buckets: int):
        self.folder, self.job, self.buckets = folder, job, buckets
        self.files: dict[tuple[str, int], Any] = {}

    def write(self, kind: str, key: str, line: bytes) -> None:
        at = (kind, _bucket(key, self.buckets))
        f = self.files.get(at)
        if f is None:
            f = self.files[at] = open(self._path(*at), "wb", buffering=1 << 18)
        f.write(line + b"\n")

    def _path(self, kind: str, bucket: int) -> Path:
        return self.folder / f"{kind}{bucket:04d}-{self.job:06d}.jsonl"

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def discard(self) -> None:
        self.close()
        for at in self.files:
            self._path(*at).unlink(missing_ok=True)


def spilled(folder: Path, kind: str, bucket: int) -> list[Path]:
    """A bucket's spill files, in job order."""
    return sorted(folder.glob(f"{kind}{bucket:04d}-*.jsonl"))


def resolve_aliases(folder: Path, bucket: int, job: int, buckets: int) -> None:
    """Put the members that name their group by an alias into the group it stands for (an
    alias no record lists keeps them in a group of their own). Reads one alias bucket twice —
    the aliases, then the members — so memory holds that bucket's aliases only."""
    parts = spilled(folder, ALIASES, bucket)
    targets: dict[str, str] = {}
    for part in parts:
        with open(part, "rb") as f:
            for line in f:
                v = orjson.loads(line)
                if v[0] == ALIAS:
                    targets.setdefault(v[1], v[2])  # the first record to list it, in reading order
    out = Spill(folder, job, buckets)
    try:
        for part in parts:
            with open(part, "rb") as f:
                for line in f:
                    v = orjson.loads(line)
                    if v[0] == VIA:
                        member = v[1:]
                        member[0] = targets.get(member[0], member[0])
                        out.write(GROUPS, member[0], orjson.dumps(member))
    finally:
        out.close()


# --- phase A: one file ----------------------------------------------------------------------


@dataclass
class FileJob:
    index: int
    src: SourceFile
    transform: str | None
    """the claiming importer's name (the worker looks it up in its own registry)"""
    claim_why: str
    claim_error: str | None
    record_paths: tuple[Any, ...]
    strict_paths: bool
    trust: str | None
    fallback: tuple[str, str] | None
    evidence_dir: Path
    quarantine_part: Path
    spill_dir: Path
    buckets: int
    validate: bool
    plan: Plan | None = None
    seq: int = 0
    """the job's number in the run (a file cut into ranges is several jobs): orders its parts"""
    span: partitions.Span | None = None
    """the byte range of the file it works on (refinery.partitions); None: the whole file"""


#: Out of file handles: the system's limit, not the source's fault (the run stops).
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})


def process_file(job: FileJob, transform: Transform | None, mcfg: MaterializeConfig,
                 score_rules: dict[str, Any] | None = None) -> FileResult:
    """Materialize one source file: evidence and refusals into the job's part files, join
    records into the spill buckets."""
    src = job.src
    res = FileResult(src.ws_rel, src.source, transform.spec.name if transform else None, None,
                     container=src.container, claimed_because=job.claim_why)
    sink = EvidenceSink(job.evidence_dir, job.validate, job.plan)
    by_reason: Counter[str] = Counter()
    preview_chars = mcfg.quarantine_preview_chars
    sha256, dumps, sort_keys = hashlib.sha256, orjson.dumps, orjson.OPT_SORT_KEYS
    fallback_time, fallback_origin = job.fallback or (None, None)
    dropped: Counter[str] = Counter()
    hits = FieldHits() if transform is not None and transform.paths else None
    ctx = RowContext(source=src.source, source_file=src.ws_rel, fallback_time=fallback_time,
                     fallback_origin=fallback_origin, score_rules=score_rules, dropped=dropped, hits=hits)
    # A CSV without a column its importer needs refuses every row for it: counted here, said once.
    absent_columns: dict[str, Counter[str]] = {}
    header: list[str] = []
    fn = transform.fn if transform else None
    join_key = transform.join_key if transform is not None and transform.joins else None
    # The one structure that grows with the input: 64 bits of each row's hash (16 bytes a
    # row), so that exact duplicates anywhere in the file are caught. A byte range of a file has
    # its duplicates found for it, file-wide (refinery.partitions).
    span = job.span
    seen_add = SeenHashes(expected=max(src.size, 1) // 1024).add if span is None else None
    dups = set(span.dups) if span is not None else set()
    from_bytes = int.from_bytes
    source = src.source
    is_csv = src.container == "csv"
    spill = Spill(job.spill_dir, job.seq, job.buckets)
    trust = job.trust

    def refuse(offset, raw, row, reason, detail, sig, record=None, recorded_at=None):
        if raw is None and row is not None:  # rebuild the row's text only now that it is refused
            raw = csv_raw(list(row.values())) if is_csv else dumps(row)
        by_reason[reason.value] += 1
        q = quarantine_record(STAGE, source, src.ws_rel, offset, reason, detail, sig, raw=raw,
                              preview_chars=preview_chars, recorded_at=recorded_at, record=record)
        qw.write(q)

    def whole_file(reason: Reason, detail: str) -> None:
        res.rows_in += 1
        by_reason[reason.value] += 1
        qw.write(quarantine_record(STAGE, source, src.ws_rel, None, reason, detail, None))

    def transform_error(offset, msg) -> None:
        res.transform_errors += 1
        if res.first_transform_error is None:
            res.first_transform_error = f"{src.ws_rel}:{offset}: {msg}"

    try:
        if src.refused:
            raise OSError(0, src.refused)
        res.input_sha256 = file_sha256(src.path) if span is None or span.start == 0 else None
        with open(job.quarantine_part, "wb", buffering=1 << 20) as qf:
            qw = JsonlWriter(qf)
            if src.container is None:
                whole_file(Reason.UNSUPPORTED_CONTAINER,
                           f"data/_kb/{src.kb_rel} is not a file refinery reads (JSONL/NDJSON, CSV, JSON, an "
                           "inspect .eval archive, or gzip of those); convert it, or add it to materialize.ignore")
            elif job.claim_error is not None:
                whole_file(Reason.AMBIGUOUS_SOURCE, job.claim_error)
                res.file_error = job.claim_error
            elif src.container == "zip" and transform is None:
                import zipfile

                try:
                    zipfile.ZipFile(src.path).close()
                    whole_file(Reason.UNKNOWN_SOURCE,
                               f"an archive no importer claims ({job.claim_why}); refinery reads inspect_ai .eval "
                               "logs (header.json, samples/*.json)")
                except (zipfile.BadZipFile, EOFError) as e:
                    whole_file(Reason.DAMAGED_CONTAINER, f"not a readable zip archive (cut short?): {e}")
            else:
                rows = read_rows(src, mcfg.max_line_bytes, job.record_paths, mcfg.max_document_bytes,
                                 strict=job.strict_paths) if span is None else \
                    span.read(src.path, Limits(mcfg.max_line_bytes))
                for line in rows:
                    res.rows_in += 1
                    offset, raw, row, record = line.offset, line.raw, line.obj, line.record
                    if row is None:
                        refuse(offset, raw, None, line.reason, line.detail, sha256(raw or b"").hexdigest(), record)
                        continue
                    try:
                        digest = sha256(dumps(row, option=sort_keys)).digest()
                    except TypeError:  # orjson writes at most 254 levels of nesting
                        refuse(offset, raw or b"", None, Reason.INVALID_JSON, "nested deeper than 254 levels: "
                               "refinery cannot hash or write it; flatten the record", sha256(raw or b"").hexdigest(),
                               record)
                        continue
                    sig = digest.hex()
                    if fn is None:
                        refuse(offset, raw, row, Reason.UNKNOWN_SOURCE,
                               f"no importer claims data/_kb/{src.kb_rel}: {job.claim_why}", sig, record)
                        continue
                    if (offset in dups) if seen_add is None else not seen_add(from_bytes(digest[:8], "little")):
                        refuse(offset, raw, row, Reason.DUPLICATE_ROW,
                               "exact duplicate of an earlier record in this file (same sig_hash)", sig, record)
                        continue
                    ctx.line_offset, ctx.record, ctx.parents = offset, record, line.parents
                    try:
                        keyed = join_key(row, ctx) if join_key is not None else None
                        if keyed is not None:
                            if type(keyed) is not Keyed:
                                raise TypeError(f"join_key returned {type(keyed).__name__}, not Keyed")
                            member = [keyed.key, keyed.role, keyed.extra, job.index, offset, record, sig, row]
                            if keyed.via:  # its group is known by an alias: resolved after every file is read
                                spill.write(ALIASES, keyed.key, dumps([VIA, *member]))
                            else:
                                spill.write(GROUPS, keyed.key, dumps(member))
                            for alias in keyed.aliases:
                                spill.write(ALIASES, alias, dumps([ALIAS, alias, keyed.key]))
                            continue
                        out = fn(row, ctx)
                        parts = _parts(out)
                    except RowError as e:
                        if is_csv and e.field is not None and e.field not in row and hits is None:
                            absent_columns.setdefault(e.field, Counter())[e.reason.value] += 1
                            header = header or list(row)
                        refuse(offset, raw, row, e.reason, e.detail, sig, record)
                        continue
                    except Exception as e:  # a bug in the importer: count it, keep the row, go on
                        msg = f"transform {transform.spec.name} raised {type(e).__name__}: {e}"
                        transform_error(offset, msg)
                        refuse(offset, raw, row, Reason.TRANSFORM_ERROR, msg, sig, record)
                        continue
                    if parts is None:
                        refuse(offset, raw, row, out.reason, out.detail, sig, record)
                        continue
                    try:
                        for part, ev in parts:
                            prov = _provenance(src.ws_rel, offset, record, part, sig, ev["recorded_at"])
                            _envelope(ev, source, digest, part, prov, trust)
                            if sink.check is not None:
                                sink.check(ev)
                    except Exception as e:
                        msg = f"transform {transform.spec.name} produced an invalid record: {e}"
                        transform_error(offset, msg)
                        refuse(offset, raw, row, Reason.TRANSFORM_ERROR, msg.splitlines()[0], sig, record)
                        continue
                    for _, ev in parts:
                        sink.write(ev)
                        res.undated += ev["recorded_at_from"] == UNDATED
                    res.evidence += len(parts)
                    res.split += len(parts) - 1
        res.partitions, res.tails = sink.close(sync=True)
    except OSError as e:
        if e.errno in WRITE_FAILED or e.errno in OUT_OF_FILES:
            raise  # the disk or the system, not this source: the run stops (and says so) rather than drop the file
        # Unreadable (or vanished) mid-way: publish nothing of this file, say so once.
        sink.discard()
        res.rows_in = res.evidence = res.split = 0
        by_reason.clear()
        res.file_error = f"cannot read: {e.strerror or e}"
        res.unreadable = True
        with open(job.quarantine_part, "wb") as qf:
            JsonlWriter(qf).write(quarantine_record(STAGE, source, src.ws_rel, None, Reason.UNREADABLE_FILE,
                                                    res.file_error, None))
        spill.discard()
        res.by_reason = {}
        return res
    finally:
        sink.close_files()
        spill.close()
    res.quarantined = sum(by_reason.values())
    res.by_reason = dict(sorted(by_reason.items()))
    res.dropped_fields = dict(sorted(dropped.items()))
    if res.rows_in == 0:
        res.warnings.append(f"{src.ws_rel} is empty" if src.size == 0 else f"{src.ws_rel} holds no records")
    res.absent, res.columns = {c: dict(r) for c, r in absent_columns.items()}, header
    if span is None:  # a byte range's are said once the file's ranges are summed (_files)
        res.warnings += _absent_warnings(res)
    if hits is not None:
        table = table_name("mappings", transform.spec.name.removeprefix("mapping:"))
        res.warnings += [f"{src.ws_rel}: {w}" for w in unmatched_paths(table, transform.paths, hits)]
    return res


# --- phase B: one join bucket ---------------------------------------------------------------


@dataclass
class BucketJob:
    index: int
    transform: str
    bucket: int
    spill_parts: list[Path]
    """the bucket's spill files, in file order"""
    sources: list[SourceFile]
    trust: dict[int, str]
    fallbacks: dict[int, tuple[str, str]]
    evidence_dir: Path
    quarantine_part: Path
    preview_chars: int
    validate: bool
    plan: Plan | None = None


def _members(parts: list[Path]) -> dict[str, list[Member]]:
    """A bucket's members, grouped by key (members in spill-file order, then line order)."""
    groups: dict[str, list[Member]] = defaultdict(list)
    loads = orjson.loads
    for part in parts:
        with open(part, "rb") as f:
            for line in f:
                key, role, extra, file_i, offset, record, sig, row = loads(line)
                groups[key].append(Member(role, row, extra, file_i, offset, record, sig))
    return groups


def _empty_counts() -> dict[str, Any]:
    return {"evidence": 0, "quarantined": 0, "joined": 0, "split": 0, "undated": 0, "by_reason": Counter(),
            "partitions": Counter(),
            "transform_errors": 0, "first_transform_error": None}


def process_bucket(job: BucketJob, transform: Transform, score_rules: dict[str, Any] | None = None
                   ) -> tuple[dict[int, dict[str, Any]], list[TailResult]]:
    """Group a bucket's records by key and assemble each group; returns counts by file index,
    and with a single-pass plan the tails of its evidence parts."""
    counts: dict[int, dict[str, Any]] = defaultdict(_empty_counts)
    sink = EvidenceSink(job.evidence_dir, job.validate, job.plan)
    gctx = GroupContext(job.sources, job.fallbacks, score_rules)
    dumps = orjson.dumps

    def refuse(m: Member, reason: Reason, detail: str) -> None:
        src = job.sources[m.file]
        c = counts[m.file]
        c["quarantined"] += 1
        c["by_reason"][reason.value] += 1
        qw.write(quarantine_record(STAGE, src.source, src.ws_rel, m.offset, reason, detail, m.sig,
                                   raw=dumps(m.row), preview_chars=job.preview_chars, record=m.record))

    def ref(m: Member) -> dict[str, Any]:
        r: dict[str, Any] = {"source_file": job.sources[m.file].ws_rel, "line_offset": m.offset}
        if m.record is not None:
            r["record"] = m.record
        r["sig_hash"] = m.sig
        return r

    try:
        with open(job.quarantine_part, "wb", buffering=1 << 18) as qf:
            qw = JsonlWriter(qf)
            groups = _members(job.spill_parts)
            for key in sorted(groups):
                members = groups.pop(key)
                try:
                    built, primaries, joined, refusals = _settle(transform, members, gctx, job, ref, sink.check)
                except Exception as exc:  # a bug in the importer: every member of the group is refused
                    msg = f"transform {transform.spec.name} raised {type(exc).__name__} assembling {key!r}: {exc}"
                    for m in members:
                        c = counts[m.file]
                        c["transform_errors"] += 1
                        if c["first_transform_error"] is None:
                            c["first_transform_error"] = f"{job.sources[m.file].ws_rel}:{m.offset}: {msg}"
                        refuse(m, Reason.TRANSFORM_ERROR, msg.splitlines()[0])
                    continue
                for e, ev in built:
                    rel = sink.write(ev)
                    c = counts[e.primary.file]
                    c["partitions"][rel] += 1
                    c["evidence"] += 1
                    c["undated"] += ev["recorded_at_from"] == UNDATED
                for pos, n in primaries.items():
                    counts[pos[0]]["split"] += n - 1
                for m in members:
                    pos = (m.file, m.offset)
                    if pos in primaries:
                        continue
                    if pos in joined:
                        counts[m.file]["joined"] += 1
                    elif pos in refusals:
                        refuse(m, *refusals[pos])
                    else:
                        refuse(m, Reason.UNMATCHED_JOIN,
                               f"a {m.role} record with nothing to join it to (key {key!r}): its partner is in no "
                               "source file")
        _, tails = sink.close(sync=True)
    finally:
        sink.close_files()
    return {i: {**c, "by_reason": dict(c["by_reason"]), "partitions": dict(c["partitions"])}
            for i, c in sorted(counts.items())}, tails


def _settle(transform: Transform, members: list[Member], gctx: GroupContext, job: BucketJob, ref,
            check: Callable[[dict[str, Any]], None] | None) -> tuple[
        list[tuple[Emit, dict[str, Any]]], dict[tuple[int, int], int], set[tuple[int, int]],
        dict[tuple[int, int], tuple[Reason, str]]]:
    """Assemble one group and decide each member's fate: (evidence built, primaries with their
    evidence count, joined members, refused members with reason). Members are told apart by
    their place (file, offset), so an importer's copies of them still count. An answer that
    breaks the contract — an Emit of a record not in the group, two evidence records of one
    record without distinct parts — raises, and the caller refuses the whole group."""
    at = {(m.file, m.offset): m for m in members}
    produced = list(transform.assemble(members, gctx))
    if any(type(p) not in (Emit, Refuse) for p in produced):
        raise TypeError("assemble must return Emit and Refuse items only")
    built, parts = [], defaultdict(list)
    for e in (p for p in produced if type(p) is Emit):
        primary = at.get((e.primary.file, e.primary.offset))
        if primary is None or any((m.file, m.offset) not in at for m in e.joined):
            raise ValueError("an Emit names a record that is not in its group")
        ev = e.evidence
        part = e.part if e.part is not None else ev.pop(PART_KEY, None)
        ev.pop(PART_KEY, None)
        parts[(primary.file, primary.offset)].append(part)
        src = job.sources[primary.file]
        joined = [ref(m) for m in e.joined if (m.file, m.offset) != (primary.file, primary.offset)]
        prov = _provenance(src.ws_rel, primary.offset, primary.record, part, primary.sig, ev["recorded_at"], joined)
        _envelope(ev, src.source, bytes.fromhex(primary.sig), part, prov, job.trust.get(primary.file))
        if check is not None:
            check(ev)
        built.append((e._replace(primary=primary), ev))
    for pos, names in parts.items():
        _distinct_parts(names, f"record {job.sources[pos[0]].ws_rel}:{pos[1]}")
    primaries = {pos: len(names) for pos, names in parts.items()}
    joined = {(m.file, m.offset) for e, _ in built for m in e.joined} - primaries.keys()
    refusals: dict[tuple[int, int], tuple[Reason, str]] = {}
    for r in (p for p in produced if type(p) is Refuse):  # the first refusal of a member stands
        pos = (r.member.file, r.member.offset)
        if pos in at and pos not in primaries and pos not in joined:
            refusals.setdefault(pos, (r.reason, r.detail))
    return built, primaries, joined, refusals


# --- worker processes ---------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(ws_root: str, cfg: Config) -> None:
    _WORKER["registry"] = Registry.load(Path(ws_root), cfg)
    _WORKER["cfg"] = cfg
    _WORKER["rules"] = cfg.score_rules()


def _transform(name: str | None) -> Transform | None:
    return None if name is None else _WORKER["registry"].by_name[name]


def _work_file(job: FileJob) -> FileResult:
    return process_file(job, _transform(job.transform), _WORKER["cfg"].materialize, _WORKER["rules"])


def _work_bucket(job: BucketJob) -> tuple[dict[int, dict[str, Any]], list[TailResult]]:
    return process_bucket(job, _transform(job.transform), _WORKER["rules"])


def _allow_open_files() -> None:
    """A job keeps a file open per evidence partition it writes (and the single pass a few more
    beside each): as many as the system allows, not the shell's default soft limit (often 1,024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    for limit in (want, min(want, 10240)):  # macOS refuses more than its OPEN_MAX, 10,240
        if soft == resource.RLIM_INFINITY or soft >= limit:
            return
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            return


def _buckets(sources: list[SourceFile], claims: list[Claim]) -> int:
    spill = sum(s.size * (8 if s.compressed else 1) for s, c in zip(sources, claims)
                if c.transform is not None and c.transform.joins)
    return max(1, min(MAX_BUCKETS, -(-spill // BUCKET_BYTES)))


def _absent_warnings(res: FileResult) -> list[str]:
    out = []
    for column, reasons in res.absent.items():
        refused = ", ".join(f"{n:,} as {r}" for r, n in reasons.items())
        out.append(
            f"{res.source_file}: the header has no column '{column}', which the {res.transform} importer needs "
            f"(rows quarantined for it: {refused}). Its columns are: {', '.join(res.columns)}. Rename the column in "
            "the file, or read the file with a [mappings.<name>] table in refinery.toml")
    return out


def _cuttable(src: SourceFile, claim: Claim, target: int) -> bool:
    """Whether a file may be worked on in byte ranges (refinery.partitions says which)."""
    t = claim.transform
    return (0 < target < src.size and src.container in ("lines", "csv") and not src.compressed
            and src.refused is None and claim.error is None and t is not None and not t.joins and t.paths is None
            and not claim.record_paths)


def _spans(sources: list[SourceFile], claims: list[Claim], mcfg: MaterializeConfig,
           folder: Path) -> dict[int, list[partitions.Span]]:
    """The byte ranges of each file to cut (by file index), numbered and with their duplicates
    found file-wide by a first pass over every range, in parallel."""
    ranges = {i: r for i, (s, c) in enumerate(zip(sources, claims)) if _cuttable(s, c, mcfg.partition_bytes)
              and len(r := partitions.cut(s.path, s.size, mcfg.partition_bytes)) > 1}
    headers: dict[int, tuple[str, ...] | None] = {}
    for i in list(ranges):
        if sources[i].container == "csv":
            with span_text(sources[i].path, 0, sources[i].size) as text:
                found = csv_header(text, mcfg.max_line_bytes)
            if found is None:  # no header to give the ranges after the first: read in one piece
                del ranges[i]
                continue
            headers[i] = tuple(found)
        else:
            headers[i] = None
    if not ranges:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    scans = [(sources[i].path, a, b, mcfg.max_line_bytes, folder / f"{i:06d}-{k:06d}", headers[i])
             for i, r in ranges.items() for k, (a, b) in enumerate(r)]
    scanned = iter(map_files(partitions.scan, scans, [j[2] - j[1] for j in scans], workers=mcfg.workers,
                             parallel_min_bytes=mcfg.parallel_min_bytes))
    paths = iter(j[4] for j in scans)
    out = {}
    for i, r in ranges.items():
        found, where = [next(scanned) for _ in r], [next(paths) for _ in r]
        # a cut inside a CSV record (a quoted line break): join the range to the next, read it again
        k = 0
        while k < len(r) - 1 and found[k][0] >= 0:
            if found[k][1]:
                k += 1
                continue
            r[k:k + 2] = [(r[k][0], r[k + 1][1])]
            del where[k + 1], found[k + 1]
            found[k] = partitions.scan(sources[i].path, *r[k], mcfg.max_line_bytes, where[k], headers[i])
        if len(r) > 1 and (spans := partitions.spans(r, found, where, sources[i].size // 1024, headers[i])):
            out[i] = spans
    return out


def _files(jobs: list[FileJob], results: list[FileResult], n_files: int) -> list[FileResult]:
    """One result per source file: a file worked on in byte ranges gets its ranges' results
    summed — or, when one range could not be read, the file is unreadable as a whole: nothing
    of it is kept but that one quarantine record, as when it is read in one piece."""
    by_file: list[list[tuple[FileJob, FileResult]]] = [[] for _ in range(n_files)]
    for j, r in zip(jobs, results, strict=True):
        by_file[j.index].append((j, r))
    out = []
    for mine in by_file:
        first = mine[0][1]
        if len(mine) > 1 and (bad := next((r for _, r in mine if r.unreadable), None)) is not None:
            for j, r in mine:
                shutil.rmtree(j.evidence_dir, ignore_errors=True)
                for t in r.tails:
                    shutil.rmtree(t.folder, ignore_errors=True)
                if r is not bad:
                    j.quarantine_part.write_bytes(b"")
            bad.tails, bad.partitions = [], {}
            out.append(bad)
            continue
        for _, r in mine[1:]:
            for name in ("rows_in", "evidence", "quarantined", "joined", "split", "undated", "transform_errors"):
                setattr(first, name, getattr(first, name) + getattr(r, name))
            first.by_reason = dict(sorted((Counter(first.by_reason) + Counter(r.by_reason)).items()))
            first.dropped_fields = dict(sorted((Counter(first.dropped_fields) + Counter(r.dropped_fields)).items()))
            first.partitions = dict(sorted((Counter(first.partitions) + Counter(r.partitions)).items()))
            first.first_transform_error = first.first_transform_error or r.first_transform_error
            first.file_error = first.file_error or r.file_error
            first.warnings += [w for w in r.warnings if w not in first.warnings]
            first.tails += r.tails
            for column, reasons in r.absent.items():
                first.absent[column] = dict(Counter(first.absent.get(column, {})) + Counter(reasons))
            first.columns = first.columns or r.columns
        if len(mine) > 1:
            first.warnings += _absent_warnings(first)
        out.append(first)
    return out


def claims_for(ws: Workspace, cfg: Config, registry: Registry | None = None
               ) -> tuple[Registry, list[SourceFile], list[str], list[Claim]]:
    """The registry, the source files, the ignored files, and who claims each source file."""
    registry = registry or Registry.load(ws.root, cfg)
    sources, ignored = list_sources(ws, cfg.materialize.ignore)
    return registry, sources, ignored, [registry.claim(s) for s in sources]


def _assemble_outputs(ws: Workspace, staging: Path, contributions: dict[str, list[Path]],
                      rows: Counter[str]) -> list[dict[str, Any]]:
    """Put each evidence partition together from its part files (in job order) into `staging`;
    `rows` is the partitions' row counts, as the jobs wrote them."""
    outputs = []
    for rel in sorted(contributions):
        parts = contributions[rel]
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if len(parts) == 1:
            sidecar = parts[0].with_name(parts[0].name + SHA_SUFFIX)
            sha = sidecar.read_text() if sidecar.is_file() else file_sha256(parts[0])  # hashed as written
            os.replace(parts[0], dest)
        else:
            _, sha = concat_files(parts, dest)
        outputs.append({"path": f"{ws.rel(ws.evidence)}/{rel}", "sha256": sha, "rows": rows[rel]})
    for d in {(staging / rel).parent for rel in contributions}:
        fsync_dir(d)
    return outputs


def _prepared(plan: Plan, parts: Path, contributions: dict[str, list[Path]], tails: list[TailResult],
              digests: dict[str, str], mcfg: MaterializeConfig) -> Prepared:
    """Each partition's tail: its part's, or its parts' joined (renumbered across the partition;
    `digests`: the partitions' sha256, by path relative to the evidence tree)."""
    by_part = {(t.folder.relative_to(plan.root).parts[0], t.rel): t for t in tails}
    kept: dict[str, TailResult] = {}
    joins = []
    for rel, ps in contributions.items():
        mine = [by_part.pop((p.relative_to(parts).parts[0], rel), None) for p in ps]
        if None in mine:  # never expected: that partition is read again by score and export
            continue
        if len(mine) == 1:
            kept[rel] = mine[0]
        else:
            joins.append((mine, plan.root / "joined" / rel, digests[rel], plan.buckets))
    for t in by_part.values():
        shutil.rmtree(t.folder, ignore_errors=True)
    sizes = [sum(t.score.rows_in for t in j[0]) for j in joins]
    for t in map_files(join_tails, joins, sizes, workers=mcfg.workers, parallel_min_bytes=mcfg.parallel_min_bytes):
        kept[t.rel] = t
    return Prepared(plan, dict(sorted(kept.items())))


def run(ws: Workspace, cfg: Config, *, validate: bool = False,
        on_file_done: Callable[[FileResult, int], None] | None = None, plan: Plan | None = None) -> MaterializeResult:
    """Materialize every source file of `ws`. Raises TransformLoadError for a broken transform
    or an impossible configuration (a file claimed twice by name, an unknown importer). With a
    `plan` (refinery.single_pass), the evidence is also scored and read for the exports as it is
    written: the result's `prepared`."""
    t0 = time.perf_counter()
    # Fail fast, before touching any output, on a broken module or a file claimed twice.
    registry, sources, ignored, claims = claims_for(ws, cfg)

    with ws.lock():  # one writer per workspace
        recover_dir(ws.evidence)
        staging = staging_dir(ws.evidence)
        parts = Path(tempfile.mkdtemp(prefix=".materialize-", dir=ws.root / "data"))
        try:
            mcfg = cfg.materialize
            buckets = _buckets(sources, claims)
            if plan is not None:
                plan = plan.sized(sum(s.size * (8 if s.compressed else 1) for s in sources))
            spill_root = parts / "spill"
            cut = _spans(sources, claims, mcfg, parts / "scan")
            jobs = []
            for i, (s, c) in enumerate(zip(sources, claims)):
                sc = c.source_cfg
                fallback = (sc.recorded_at, f"fallback:[sources.{c.source_name}] recorded_at") \
                    if sc is not None and sc.recorded_at else None
                spill_dir = spill_root / (c.name or "_")
                spill_dir.mkdir(parents=True, exist_ok=True)
                for span in cut.get(i, [None]):
                    k = len(jobs)
                    jobs.append(FileJob(i, s, c.name, c.why, c.error, c.record_paths, c.strict_paths,
                                        sc.trust if sc else None, fallback, parts / f"ev-a{k:06d}",
                                        parts / f"q-a{k:06d}.jsonl", spill_dir, buckets, validate, plan, k, span))
            sensitive.prepare()  # compiled once, inherited by forked workers
            _allow_open_files()
            done_jobs: list[FileResult] = map_files(
                _work_file, [(j,) for j in jobs], [j.span.end - j.span.start if j.span else j.src.size for j in jobs],
                workers=mcfg.workers, parallel_min_bytes=mcfg.parallel_min_bytes, initializer=_init_worker,
                initargs=(str(ws.root), cfg), on_done=on_file_done)
            files = _files(jobs, done_jobs, len(sources))

            joining = sorted({c.name for c in claims if c.transform is not None and c.transform.joins})
            alias_jobs = [(spill_root / name, b, len(jobs) + b, buckets) for name in joining for b in range(buckets)
                          if spilled(spill_root / name, ALIASES, b)]
            map_files(resolve_aliases, alias_jobs,
                      [sum(p.stat().st_size for p in spilled(d, ALIASES, b)) for d, b, _, _ in alias_jobs],
                      workers=mcfg.workers, parallel_min_bytes=mcfg.parallel_min_bytes)
            bucket_jobs = []
            tails = [t for r in files for t in r.tails]
            trust = {j.index: j.trust for j in jobs if j.trust}
            fallbacks = {j.index: j.fallback for j in jobs if j.fallback}
            for name in joining:
                spill_dir = spill_root / name
                for b in range(buckets):
                    found = spilled(spill_dir, GROUPS, b)
                    if not found:
                        continue
                    k = len(bucket_jobs)
                    bucket_jobs.append(BucketJob(
                        k, name, b, found, sources, trust, fallbacks, parts / f"ev-b{k:06d}",
                        parts / f"q-b{k:06d}.jsonl", mcfg.quarantine_preview_chars, validate, plan))
            if bucket_jobs:
                done = map_files(_work_bucket, [(j,) for j in bucket_jobs],
                                 [sum(p.stat().st_size for p in j.spill_parts) for j in bucket_jobs],
                                 workers=mcfg.workers, parallel_min_bytes=mcfg.parallel_min_bytes,
                                 initializer=_init_worker, initargs=(str(ws.root), cfg))
                for counts, bucket_tails in done:
                    for file_i, c in counts.items():
                        files[file_i].add(c)
                    tails += bucket_tails
            for r in files:
                r.quarantined = sum(r.by_reason.values())
                if r.rows_in != r.evidence - r.split + r.joined + r.quarantined:
                    raise AccountingError(f"{r.source_file}: {r.rows_in} records in, {r.evidence - r.split} became "
                                          f"evidence, {r.joined} joined, {r.quarantined} quarantined")

            contributions: dict[str, list[Path]] = defaultdict(list)
            for d in [j.evidence_dir for j in jobs] + [j.evidence_dir for j in bucket_jobs]:
                if d.is_dir():
                    for p in sorted(d.rglob("*.jsonl")):
                        contributions[p.relative_to(d).as_posix()].append(p)
            rows_of: Counter[str] = Counter()
            for r in files:
                rows_of.update(r.partitions)
            outputs = _assemble_outputs(ws, staging, contributions, rows_of)
            prepared = None
            if plan is not None:
                ev_root = ws.rel(ws.evidence) + "/"
                digests = {o["path"].removeprefix(ev_root): o["sha256"] for o in outputs}
                prepared = _prepared(plan, parts, contributions, tails, digests, mcfg)
            qpath = ws.out / quarantine_file(STAGE)
            qrows, qsha = concat_files([j.quarantine_part for j in jobs] + [j.quarantine_part for j in bucket_jobs],
                                       qpath)
            publish_dir(staging, ws.evidence)
            outputs.append({"path": ws.rel(qpath), "sha256": qsha, "rows": qrows})
        finally:
            shutil.rmtree(parts, ignore_errors=True)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return MaterializeResult(files, ignored, outputs, time.perf_counter() - t0, prepared)

