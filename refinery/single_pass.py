"""The single pass: while materialize writes a record's evidence, the record is scored and read
for the exports in the same worker, so run-all parses each source row once.

    source row ──transform──▶ evidence line ──score──▶ scored-run line ──read──▶ export candidates
                                  (one parse: the line just written, read back from its bytes)

What the pass writes beside each evidence partition (a `Tail`) is what `refinery score` and the
exports' reading (`export.Reader`) would write from that partition, byte for byte: the same
functions make it, from the same bytes. Score and export then take those parts instead of
reading the evidence and the scored runs again (`Prepared`), and do the rest — the manifest,
the merges, the receipts — as they always do; each stage's outputs and receipt are unchanged.

A part's lines are numbered as its writer writes them, and provenance names those numbers. A
partition made of one part (one source file's evidence, or one join bucket's) keeps them. A
partition put together from several parts (a joined source's evidence comes out of many join
buckets) has its parts' tails joined (`join_tails`): each line renumbered by the lines of the
parts before it — the scored runs' evidence lines, the exports' scored-run lines, and the
sig_hash of each scored run, which holds its evidence line. Nothing is read twice but those
small lines; the sensitive-data scan, the scoring and the transforms are not done again.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from refinery.config import Config, ScoreConfig
from refinery.decisions import Reviews
from refinery.exporters import BY_NAME, NAMES, ExportStats, Settings
from refinery.jsonl import DEFAULT_MAX_LINE_BYTES, JsonlWriter, dumps_line, fsync, iter_lines
from refinery.quarantine import moved

#: Each file of a tail, in its folder.
SCORED, SCORE_QUARANTINE = "scored.jsonl", "score-q.jsonl"
#: Each tail file's write buffer (a job holds a tail per partition it writes: 5 files each).
BUFFER = 128 << 10
#: Up to this many task buckets a tail writes a grouped export's bucket files directly; past it,
#: into one file it spreads into the buckets' files when it closes (see export.Reader).
DIRECT_BUCKETS = 8
#: At most this many tails of a job keep their files open (the least recently written close
#: theirs for now): a source spanning years of days has a partition a day.
OPEN_TAILS = 64


def open_tails(buckets: int) -> int:
    """How many partitions may keep their files open at once in one process — each its evidence
    file and its tail's —: OPEN_TAILS, or fewer when the open-file limit is low (they take at
    most half of it)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_tail = 6 + (1 if buckets > DIRECT_BUCKETS else buckets)
    if soft == resource.RLIM_INFINITY:
        return OPEN_TAILS
    return max(1, min(OPEN_TAILS, soft // 2 // per_tail))
#: Grouped exports' candidates by task bucket: bounds what a bucket's merge holds, as export's own count does.
BUCKET_BYTES = 32 << 20


@dataclass(frozen=True)
class Plan:
    """What the reading pass computes besides the evidence, and where it puts it."""

    root: Path
    score: ScoreConfig
    preview_chars: int
    settings: Settings
    evidence_rel: str
    """the evidence tree, relative to the workspace (what score's provenance names)"""
    scored_rel: str
    reviews: Reviews = field(default_factory=Reviews)
    """the decisions people made on the review queue (refinery.decisions), which score applies"""
    buckets: int = 1
    """a grouped export's task buckets (`sized`, once the sources' sizes are known)"""

    @classmethod
    def make(cls, root: Path, cfg: Config, include_partial: bool | None, evidence_rel: str,
             scored_rel: str, reviews: Reviews | None = None) -> Plan:
        partial = cfg.export.include_partial if include_partial is None else include_partial
        return cls(root, cfg.score, cfg.materialize.quarantine_preview_chars, Settings(cfg.export, partial),
                   evidence_rel, scored_rel, reviews or Reviews())

    def sized(self, source_bytes: int) -> Plan:
        """The plan for sources of this many bytes (uncompressed): as many task buckets as the
        exports would cut their evidence into."""
        return replace(self, buckets=max(1, min(4096, -(-source_bytes // BUCKET_BYTES))))


@dataclass
class TailResult:
    """What a tail made of one partition's part: score's file result and the exports' reading."""

    rel: str
    folder: Path
    score: Any
    """refinery.score.FileResult"""
    exports: dict[str, ExportStats]


class Tail:
    """One evidence part's scoring and export reading, a line at a time as the part is written."""

    def __init__(self, plan: Plan, job: str, rel: str):
        from refinery.export import Reader
        from refinery.score import Scorer

        self.rel, self.folder = rel, plan.root / job / rel
        self.folder.mkdir(parents=True, exist_ok=True)
        self.scored_rel = f"{plan.scored_rel}/{rel}"
        # one tail per partition a job writes is open at once: small buffers, a few files each
        self.scorer = Scorer(self.folder / SCORED, self.scored_rel, f"{plan.evidence_rel}/{rel}",
                             self.folder / SCORE_QUARANTINE, plan.score, plan.preview_chars, plan.reviews,
                             buffer=BUFFER)
        self.reader = Reader(self.folder, 0, NAMES, plan.settings, plan.buckets, buffer=BUFFER,
                             spread=plan.buckets > DIRECT_BUCKETS)

    def line(self, data: bytes, offset: int) -> None:
        """Evidence line `offset` of the part, as written (`data`, with its newline)."""
        if len(data) > DEFAULT_MAX_LINE_BYTES + 2:  # what score refuses to read (over 1 MiB): refused alike
            (line,) = iter_lines(io.BytesIO(data))
            self.scorer.refuse("?", offset, f"{line.reason}: {line.detail}", hashlib.sha256(line.raw).hexdigest(),
                               line.raw)
            return
        ev = orjson.loads(data)  # the record as every later reader of the file sees it
        sr = self.scorer.row(ev, offset, data[:-1])  # the line as a reader holds it: no newline
        if sr is None:
            return
        prov = {"source_file": self.scored_rel, "line_offset": self.scorer.w.rows - 1,
                "sig_hash": hashlib.sha256(orjson.dumps(sr, option=orjson.OPT_SORT_KEYS)).hexdigest(),
                "recorded_at": sr["recorded_at"]}
        self.reader.row(ev, sr, prov)

    def suspend(self) -> None:
        """Close its files for now (what is written stays; the next line opens them again)."""
        self.scorer.suspend()
        self.reader.suspend()

    def close(self, evidence_sha256: str) -> TailResult:
        return TailResult(self.rel, self.folder, self.scorer.close(evidence_sha256), self.reader.close())

    def discard(self) -> None:
        self.scorer.discard()
        self.reader.suspend()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Prepared:
    """Every evidence partition's tail, by its path relative to the evidence tree: what score and
    export take instead of reading the partitions again."""

    plan: Plan
    tails: dict[str, TailResult]


def _part_names(buckets: int) -> list[str]:
    """The files the exports' reading of one evidence file (index 0) writes."""
    from refinery.export import part_path, refusals_path

    here = Path()
    names = [refusals_path(here, 0).name]
    for e in NAMES:
        names += [part_path(here, e, 0, b).name for b in (range(buckets) if BY_NAME[e].grouped else (None,))]
    return names


def join_tails(tails: list[TailResult], folder: Path, evidence_sha256: str, buckets: int) -> TailResult:
    """The tail of a partition put together from several parts: the parts' tails (in the parts'
    order) joined, each line numbered as the reading of the whole partition numbers it."""
    from refinery.score import FileResult, summed

    loads, dumps, sort_keys, sha256 = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.sha256
    folder.mkdir(parents=True, exist_ok=True)
    first = tails[0].score
    res = FileResult(first.evidence_file, first.scored_file, evidence_sha256)
    # the scored runs: each part's evidence lines moved by the evidence lines before it; the new
    # sig_hash of each scored run (32 bytes a line, in a file) for the lines that point at them
    with open(folder / SCORED, "wb") as f, open(folder / SCORE_QUARANTINE, "wb") as qf, \
            open(folder / "sigs.bin", "wb") as sigs:
        w, qw = JsonlWriter(f), JsonlWriter(qf)
        shift = 0
        for t in tails:
            with open(t.folder / SCORED, "rb") as part:
                for line in part:
                    sr = loads(line)
                    sr["provenance"]["line_offset"] += shift
                    w.write(sr)
                    sigs.write(sha256(dumps(sr, option=sort_keys)).digest())
            with open(t.folder / SCORE_QUARANTINE, "rb") as part:
                for line in part:
                    rec = loads(line)
                    qw.write(moved(rec, rec["provenance"]["line_offset"] + shift))
            shift += t.score.rows_in
            res.rows_in += t.score.rows_in
            res.quarantined += t.score.quarantined
        f.flush()
        fsync(f.fileno())
    res.scored, res.sha256 = w.rows, w.sha256
    for name in ("by_category", "by_reason", "by_rule"):
        setattr(res, name, summed([t.score for t in tails], name))

    # the exports' reading: each line's scored-run provenance moved by the scored runs before it
    def renumber(prov: dict[str, Any], shift: int) -> None:
        line = prov["line_offset"] = prov["line_offset"] + shift
        prov["sig_hash"] = digests[32 * line:32 * line + 32].hex()

    with open(folder / "sigs.bin", "rb") as sigs_file:
        digests = mmap.mmap(sigs_file.fileno(), 0, access=mmap.ACCESS_READ) if res.scored else b""
        for name in (names := _part_names(buckets)):
            out, shift = None, 0
            for t in tails:
                if (part := t.folder / name).exists():
                    out = out or open(folder / name, "wb", buffering=1 << 18)
                    with open(part, "rb") as lines:
                        for line in lines:
                            obj = loads(line)
                            if name == names[0]:  # a refusal: its id names its line
                                renumber(obj["provenance"], shift)
                                moved(obj, obj["provenance"]["line_offset"])
                            else:  # a candidate holds the scored run's provenance as one of its values
                                provs = [v for v in obj.values()
                                         if type(v) is dict and v.get("source_file") == res.scored_file]
                                if not provs:
                                    raise ValueError(f"{name}: a candidate without its scored run's provenance as "
                                                     "a value of its own (see Exporter.candidate)")
                                for v in provs:
                                    renumber(v, shift)
                            out.write(dumps_line(obj))
                shift += t.score.scored
            if out is not None:
                out.close()
        if res.scored:
            digests.close()
    (folder / "sigs.bin").unlink()
    from refinery.export import near_path

    for e in NAMES:  # the near-duplicate records: one per candidate, in line order, nothing to renumber
        if parts := [p for t in tails if (p := near_path(t.folder, e, 0)).exists()]:
            with open(near_path(folder, e, 0), "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out)
    exports: dict[str, ExportStats] = {}
    for e in NAMES:
        st = exports[e] = ExportStats(e)
        for t in tails:
            part = t.exports[e]
            st.add(part)
            st.candidates += part.candidates
            st.keys.extend(part.keys)
    for t in tails:
        shutil.rmtree(t.folder, ignore_errors=True)
    return TailResult(tails[0].rel, folder, res, exports)
