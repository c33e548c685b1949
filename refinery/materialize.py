"""Stage 1 — materialize: every source line becomes evidence or a quarantined refusal.

    data/_kb/<stream>.jsonl|csv  ──▶  data/evidence/YYYY/MM/DD/<stream>.jsonl   (EvidenceRecord)
                                 ──▶  exports/quarantine/materialize.jsonl       (QuarantineRecord)

Files are independent, so they are processed in parallel (one worker per core) and their
outputs are written into a staging folder that replaces the old evidence tree only once
everything succeeded. Output order is source order within each partition file; ids derive from
the stream name and the row's sig_hash, so two runs on the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery.canonical import file_sha256
from refinery.config import Config, MaterializeConfig
from refinery.dedup import SeenHashes
from refinery.discovery import Registry, Transform
from refinery.jsonl import JsonlWriter, concat_files, publish_dir, recover_dir, staging_dir
from refinery.parallel import map_files
from refinery.quarantine import quarantine_record
from refinery.reasons import Reason
from refinery.sources import SourceFile, csv_raw, list_sources, read_rows
from refinery.transform import Refusal, RowContext, RowError
from refinery.workspace import Workspace

STAGE = "materialize"


@dataclass
class FileResult:
    source_file: str
    source: str
    transform: str | None
    input_sha256: str | None
    rows_in: int = 0
    evidence: int = 0
    quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    """evidence path (relative to the evidence root) → rows"""
    transform_errors: int = 0
    first_transform_error: str | None = None
    file_error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class MaterializeResult:
    files: list[FileResult]
    ignored: list[str]
    outputs: list[dict[str, Any]]
    """[{path, sha256, rows}] of every evidence file and the quarantine file"""
    seconds: float

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
        """2 when a source file could not be read, 1 when a transform failed on a row, else 0."""
        return 2 if self.file_errors else 1 if self.transform_errors else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": STAGE, "rows_in": self.rows_in, "evidence": self.evidence,
            "quarantined": self.quarantined, "by_reason": self.by_reason,
            "transform_errors": self.transform_errors, "file_errors": self.file_errors,
            "ignored": self.ignored, "files": [asdict(f) for f in self.files],
            "outputs": self.outputs, "seconds": round(self.seconds, 3),
        }


class AccountingError(AssertionError):
    """rows in ≠ evidence + quarantined for some file: a bug, never a data problem."""


def _validator() -> Callable[[dict[str, Any]], None]:
    from refinery.models import EvidenceRecord

    return EvidenceRecord.model_validate


def process_file(src: SourceFile, transform: Transform | None, mcfg: MaterializeConfig,
                 evidence_root: Path, quarantine_part: Path, validate: bool = False) -> FileResult:
    """Materialize one source file into `evidence_root` (partitioned) and `quarantine_part`."""
    res = FileResult(src.ws_rel, src.source, transform.spec.name if transform else None, None)
    writers: dict[str, tuple[Any, JsonlWriter]] = {}
    by_reason: Counter[str] = Counter()
    raw_max = mcfg.quarantine_raw_max
    sha256 = hashlib.sha256
    dumps = orjson.dumps
    sort_keys = orjson.OPT_SORT_KEYS
    check = _validator() if validate else None
    ctx = RowContext(source=src.source, source_file=src.ws_rel)
    fn = transform.fn if transform else None
    # The one structure that grows with the input: 64 bits of each row's hash (16 bytes a
    # row), so that exact duplicates anywhere in the file are caught.
    seen_add = SeenHashes(expected=src.size // 1024).add
    from_bytes = int.from_bytes
    source = src.source
    id_prefix = (source + "\x1f").encode()
    try:
        res.input_sha256 = file_sha256(src.path)
        with open(quarantine_part, "wb", buffering=1 << 20) as qf:
            qw = JsonlWriter(qf)

            def refuse(offset, raw, reason, detail, sig, recorded_at=None):
                if raw is None:  # a parsed CSV row: rebuild its line only now that it is refused
                    raw = csv_raw(list(row.values()))
                by_reason[reason.value] += 1
                qw.write(quarantine_record(STAGE, source, src.ws_rel, offset, reason, detail, sig, raw=raw,
                                           raw_max=raw_max, recorded_at=recorded_at))

            for line in read_rows(src, mcfg.max_line_bytes):
                res.rows_in += 1
                offset, raw, row = line.offset, line.raw, line.obj
                if row is None:
                    refuse(offset, raw, line.reason, line.detail, sha256(raw).hexdigest())
                    continue
                digest = sha256(dumps(row, option=sort_keys)).digest()
                sig = digest.hex()
                if fn is None:
                    refuse(offset, raw, Reason.UNKNOWN_SOURCE,
                           f"no transform or mapping claims data/_kb/{src.kb_rel}", sig)
                    continue
                key = from_bytes(digest[:8], "little")
                if not seen_add(key):
                    refuse(offset, raw, Reason.DUPLICATE_ROW,
                           "exact duplicate of an earlier row in this file (same sig_hash)", sig)
                    continue
                ctx.line_offset = offset
                try:
                    out = fn(row, ctx)
                except RowError as e:
                    refuse(offset, raw, e.reason, e.detail, sig)
                    continue
                except Exception as e:  # a bug in the transform: count it, keep the row, go on
                    res.transform_errors += 1
                    msg = f"transform {transform.spec.name} raised {type(e).__name__}: {e}"
                    if res.first_transform_error is None:
                        res.first_transform_error = f"{src.ws_rel}:{offset}: {msg}"
                    refuse(offset, raw, Reason.TRANSFORM_ERROR, msg, sig)
                    continue
                if type(out) is Refusal:
                    refuse(offset, raw, out.reason, out.detail, sig)
                    continue
                recorded_at = out["recorded_at"]
                out["id"] = "ev-" + sha256(id_prefix + digest).hexdigest()[:16]
                out["source"] = source
                out["provenance"] = {"source_file": src.ws_rel, "line_offset": offset,
                                     "sig_hash": sig, "recorded_at": recorded_at}
                if check is not None:
                    try:
                        check(out)
                    except Exception as e:
                        res.transform_errors += 1
                        msg = f"transform {transform.spec.name} produced an invalid record: {e}"
                        if res.first_transform_error is None:
                            res.first_transform_error = f"{src.ws_rel}:{offset}: {msg}"
                        refuse(offset, raw, Reason.TRANSFORM_ERROR, msg.splitlines()[0], sig)
                        continue
                day = recorded_at[:10]
                w = writers.get(day)
                if w is None:
                    rel = f"{day[:4]}/{day[5:7]}/{day[8:10]}/{source}.jsonl"
                    path = evidence_root / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fh = open(path, "wb", buffering=1 << 20)
                    w = writers[day] = (fh, JsonlWriter(fh))
                w[1].write(out)
                res.evidence += 1
        for fh, _ in writers.values():
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        # Unreadable (or vanished) mid-way: publish nothing of this file, say so once.
        for fh, _ in writers.values():
            fh.close()
        for day in writers:
            (evidence_root / f"{day[:4]}/{day[5:7]}/{day[8:10]}/{src.source}.jsonl").unlink(missing_ok=True)
        res.rows_in = res.evidence = 0
        by_reason.clear()
        res.file_error = f"cannot read: {e.strerror or e}"
        with open(quarantine_part, "wb") as qf:
            JsonlWriter(qf).write(quarantine_record(STAGE, source, src.ws_rel, None, Reason.UNREADABLE_FILE,
                                                    res.file_error, None))
        res.by_reason = {}
        return res
    finally:
        for fh, _ in writers.values():
            fh.close()
    res.quarantined = sum(by_reason.values())
    res.by_reason = dict(sorted(by_reason.items()))
    res.partitions = {f"{d[:4]}/{d[5:7]}/{d[8:10]}/{src.source}.jsonl": w.rows
                      for d, (_, w) in sorted(writers.items())}
    if res.rows_in == 0:
        res.warnings.append(f"{src.ws_rel} is empty")
    if res.rows_in != res.evidence + res.quarantined:
        raise AccountingError(f"{src.ws_rel}: {res.rows_in} rows in, {res.evidence} evidence + "
                              f"{res.quarantined} quarantined")
    return res


# --- worker processes ---------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(ws_root: str, cfg: Config) -> None:
    _WORKER["registry"] = Registry.load(Path(ws_root), cfg)
    _WORKER["cfg"] = cfg


def _work(src: SourceFile, evidence_root: Path, quarantine_part: Path, validate: bool) -> FileResult:
    registry: Registry = _WORKER["registry"]
    return process_file(src, registry.resolve(src.kb_rel), _WORKER["cfg"].materialize,
                        evidence_root, quarantine_part, validate)


def run(ws: Workspace, cfg: Config, *, validate: bool = False,
        on_file_done: Callable[[FileResult, int], None] | None = None) -> MaterializeResult:
    """Materialize every source stream of `ws`. Raises TransformLoadError for a broken transform."""
    t0 = time.perf_counter()
    # Fail fast, before touching any output, on a broken module or a file claimed twice.
    registry = Registry.load(ws.root, cfg)
    sources, ignored = list_sources(ws, cfg.materialize.ignore)
    for s in sources:
        registry.resolve(s.kb_rel)

    with ws.lock():  # one writer per workspace
        recover_dir(ws.evidence)
        staging = staging_dir(ws.evidence)
        parts = Path(tempfile.mkdtemp(prefix=".materialize-", dir=ws.root / "data"))
        try:
            part_of = [parts / f"{i:06d}.jsonl" for i in range(len(sources))]
            mcfg = cfg.materialize
            results = map_files(
                _work, [(s, staging, part, validate) for s, part in zip(sources, part_of)],
                [s.size for s in sources], workers=mcfg.workers, parallel_min_bytes=mcfg.parallel_min_bytes,
                initializer=_init_worker, initargs=(str(ws.root), cfg), on_done=on_file_done)
            files = results

            outputs = []
            for r in files:
                for rel in r.partitions:
                    p = staging / rel
                    outputs.append({"path": f"{ws.rel(ws.evidence)}/{rel}", "sha256": file_sha256(p),
                                    "rows": r.partitions[rel]})
            outputs.sort(key=lambda o: o["path"])
            qpath = ws.quarantine / f"{STAGE}.jsonl"
            qrows, qsha = concat_files(part_of, qpath)
            publish_dir(staging, ws.evidence)
            outputs.append({"path": ws.rel(qpath), "sha256": qsha, "rows": qrows})
        finally:
            shutil.rmtree(parts, ignore_errors=True)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return MaterializeResult(files, ignored, outputs, time.perf_counter() - t0)
