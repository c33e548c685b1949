"""Stage 2 — score: every evidence record gets one ScoredRun, by the rules in refinery.policy.

    data/evidence/YYYY/MM/DD/<src>.jsonl  ──▶  data/scored-runs/YYYY/MM/DD/<src>.jsonl  (ScoredRun)
                                          ──▶  exports/quarantine/score.jsonl          (unreadable lines)

The scored-runs tree mirrors the evidence tree file for file and line for line, so line N of
a scored-run file scores line N of the evidence file of the same name; each ScoredRun's
provenance points at that evidence line and carries its sig_hash. `manifest.json` in the
tree records the sha256 of every evidence file it was computed from, so the exports can
refuse to combine evidence with stale scores. In run-all the evidence was scored as it was
written (refinery.single_pass): those files are taken as they are, not read again.
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

from refinery import decisions
from refinery.canonical import file_sha256
from refinery.config import Config, ScoreConfig
from refinery.decisions import Reviews
from refinery.errors import AccountingError, RefineryError
from refinery.jsonl import (
    HashingReader, JsonlWriter, concat_files, fsync, iter_lines, publish_dir, recover_dir, staging_dir,
)
from refinery.normalize import task_key
from refinery.parallel import map_files
from refinery.policy import POLICY_VERSION, policy_hash, score_record
from refinery.quarantine import quarantine_record
from refinery.reasons import Reason
from refinery.single_pass import SCORE_QUARANTINE, SCORED, Prepared, TailResult
from refinery.stages import StageResult, by_source
from refinery.workspace import Workspace, quarantine_file

STAGE = "score"
MANIFEST = "manifest.json"
CATEGORIES = ("accepted", "partially_accepted", "rejected", "needs_human_review")


class StaleInputError(RefineryError):
    """A stage's input is missing or does not match what the stage before it wrote."""


@dataclass
class FileResult:
    evidence_file: str
    scored_file: str
    evidence_sha256: str
    rows_in: int = 0
    scored: int = 0
    quarantined: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)
    sha256: str = ""


@dataclass
class ScoreResult:
    files: list[FileResult]
    policy_version: str
    policy_hash: str
    outputs: list[dict[str, Any]]
    seconds: float

    def _sum(self, attr: str) -> dict[str, int]:
        return summed(self.files, attr)

    @property
    def rows_in(self) -> int:
        return sum(f.rows_in for f in self.files)

    @property
    def scored(self) -> int:
        return sum(f.scored for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def by_category(self) -> dict[str, int]:
        c = self._sum("by_category")
        return {k: c.get(k, 0) for k in CATEGORIES}

    def stage_result(self) -> StageResult:
        return StageResult(
            STAGE, self.outputs, counts={"rows_in": self.rows_in, "rows_out": self.scored,
                                         "quarantined": self.quarantined},
            by_category=self.by_category, by_reason=self._sum("by_reason"),
            by_source=by_source(((f.evidence_file.rsplit("/", 1)[-1].removesuffix(".jsonl"), f.by_category)
                                 for f in self.files), sort_counts=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": STAGE, "rows_in": self.rows_in, "scored": self.scored, "quarantined": self.quarantined,
            "by_category": self.by_category, "by_rule": self._sum("by_rule"), "by_reason": self._sum("by_reason"),
            "policy_version": self.policy_version, "policy_hash": self.policy_hash,
            "files": [asdict(f) for f in self.files], "outputs": self.outputs, "seconds": round(self.seconds, 3),
        }


def summed(files: list[FileResult], attr: str) -> dict[str, int]:
    """One of the files' counters (by_category, by_reason, by_rule) summed, keys sorted."""
    c: Counter[str] = Counter()
    for f in files:
        c.update(getattr(f, attr))
    return dict(sorted(c.items()))


def scored_run(ev: dict[str, Any], evidence_file: str, offset: int, sig: str, scfg: ScoreConfig,
               phash: str, reviews: Reviews | None = None) -> dict[str, Any]:
    """The ScoredRun dict for one evidence record (field order as in refinery.models.ScoredRun)."""
    category, score, fired = score_record(ev, scfg, reviews)
    return {
        "schema_version": 1, "id": ev["id"], "source": ev["source"], "kind": ev["kind"],
        "task_key": task_key(ev), "task_id": ev["task_id"], "task_name": ev["task_name"],
        "category": category, "score": score, "rules_fired": fired,
        "policy_version": POLICY_VERSION, "policy_hash": phash, "recorded_at": ev["recorded_at"],
        "provenance": {"source_file": evidence_file, "line_offset": offset, "sig_hash": sig,
                       "recorded_at": ev["recorded_at"]},
    }


class Scorer:
    """Scores one evidence file's records, a record at a time, into its scored-run file (and
    the lines it cannot score into its quarantine part); `close()` gives the file's result."""

    def __init__(self, out: Path, out_rel: str, evidence_rel: str, quarantine_part: Path, scfg: ScoreConfig,
                 preview_chars: int, reviews: Reviews | None = None, *, buffer: int = 1 << 20):
        self.res = FileResult(evidence_rel, out_rel, "")
        self.scfg, self.phash, self.preview_chars, self.reviews = scfg, policy_hash(scfg), preview_chars, reviews
        self.cats: Counter[str] = Counter()
        self.rules: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        self.paths, self.buffer = (out, quarantine_part), buffer
        self.f, self.qf = open(out, "wb", buffering=buffer), open(quarantine_part, "wb", buffering=buffer)
        self.w, self.qw = JsonlWriter(self.f), JsonlWriter(self.qf)

    def suspend(self) -> None:
        """Close the files (what is written stays): the next row opens them again to append."""
        if self.f is not None:
            self.f.close()
            self.qf.close()
            self.f = self.qf = None

    def _resume(self) -> None:
        if self.f is None:
            self.f, self.qf = (open(p, "ab", buffering=self.buffer) for p in self.paths)
            self.w.switch(self.f)
            self.qw.switch(self.qf)

    def refuse(self, source: str, offset: int, detail: str, sig: str, raw: bytes | None) -> None:
        self._resume()
        self.res.rows_in += 1
        self.reasons[Reason.INVALID_EVIDENCE] += 1
        self.qw.write(quarantine_record(STAGE, source, self.res.evidence_file, offset, Reason.INVALID_EVIDENCE,
                                        detail, sig, raw=raw, preview_chars=self.preview_chars))

    def row(self, ev: dict[str, Any], offset: int, raw: bytes | None) -> dict[str, Any] | None:
        """The scored run of evidence line `offset` (written), or None (quarantined)."""
        sig = hashlib.sha256(orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)).hexdigest()
        try:
            sr = scored_run(ev, self.res.evidence_file, offset, sig, self.scfg, self.phash, self.reviews)
        except (KeyError, TypeError, AttributeError) as e:
            src = ev.get("source") if isinstance(ev.get("source"), str) else "?"
            self.refuse(src, offset, f"not an EvidenceRecord: {type(e).__name__} {e}", sig,
                        raw if raw is not None else orjson.dumps(ev))
            return None
        self._resume()
        self.res.rows_in += 1
        self.w.write(sr)
        self.cats[sr["category"]] += 1
        self.rules.update(sr["rules_fired"])
        return sr

    def close(self, evidence_sha256: str) -> FileResult:
        self._resume()
        self.f.flush()
        fsync(self.f.fileno())
        self.suspend()
        res = self.res
        res.evidence_sha256 = evidence_sha256
        res.scored, res.sha256 = self.w.rows, self.w.sha256
        res.quarantined = sum(self.reasons.values())
        res.by_category = dict(sorted(self.cats.items()))
        res.by_rule = dict(sorted(self.rules.items()))
        res.by_reason = {str(k): v for k, v in sorted(self.reasons.items())}
        if res.rows_in != res.scored + res.quarantined:
            raise AccountingError(f"{res.evidence_file}: {res.rows_in} in, {res.scored} scored + "
                                  f"{res.quarantined} quarantined")
        return res

    def discard(self) -> None:
        self.suspend()


def score_file(evidence: Path, evidence_rel: str, out: Path, out_rel: str, quarantine_part: Path,
               scfg: ScoreConfig, preview_chars: int, reviews: Reviews | None = None) -> FileResult:
    scorer = Scorer(out, out_rel, evidence_rel, quarantine_part, scfg, preview_chars, reviews)
    try:
        with open(evidence, "rb") as ev_file:
            reader = HashingReader(ev_file)  # the manifest's evidence sha256, from the one read
            for line in iter_lines(reader):
                if line.obj is None:
                    scorer.refuse("?", line.offset, f"{line.reason}: {line.detail}",
                                  hashlib.sha256(line.raw or b"").hexdigest(), line.raw)
                else:
                    scorer.row(line.obj, line.offset, line.raw)
    except BaseException:
        scorer.discard()
        raise
    return scorer.close(reader.sha256.hexdigest())


def evidence_files(ws: Workspace) -> list[Path]:
    """The evidence partition files, in path order (the order every later stage reads them in)."""
    if not ws.evidence.is_dir():
        raise StaleInputError("no evidence in data/evidence/; run `refinery materialize` first")
    return sorted(ws.evidence.rglob("*.jsonl"), key=lambda p: p.relative_to(ws.evidence).as_posix())


def _tails(cfg: Config, prepared: Prepared | None) -> dict[str, TailResult]:
    """The evidence files the single pass already scored, with this stage's settings."""
    if prepared is None or (prepared.plan.score, prepared.plan.preview_chars) != \
            (cfg.score, cfg.materialize.quarantine_preview_chars):
        return {}
    return {t.score.evidence_file: t for t in prepared.tails.values()}


def run(ws: Workspace, cfg: Config, *, on_file_done: Callable[[FileResult, int], None] | None = None,
        prepared: Prepared | None = None) -> ScoreResult:
    """Score every evidence file. `prepared`: the files run-all's single pass scored as it wrote
    them (refinery.single_pass), taken as they are; the others are read and scored here. The
    decisions in the human_reviews stream (refinery.decisions) move the rows they decide on."""
    t0 = time.perf_counter()
    with ws.lock():
        files = evidence_files(ws)
        # the decisions the single pass scored with (read at the start of this run, under its
        # lock: the same stream), else the stream's now
        reviews = prepared.plan.reviews if prepared is not None else decisions.load(ws, cfg)
        recover_dir(ws.scored_runs)
        staging = staging_dir(ws.scored_runs)
        parts = Path(tempfile.mkdtemp(prefix=".score-", dir=ws.root / "data"))
        tails = _tails(cfg, prepared)
        try:
            jobs, quarantine_parts = [], []
            done: dict[int, FileResult] = {}
            for i, p in enumerate(files):
                rel = p.relative_to(ws.evidence).as_posix()
                if (t := tails.get(ws.rel(p))) is not None:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(t.folder / SCORED, staging / rel)
                    quarantine_parts.append(t.folder / SCORE_QUARANTINE)
                    done[i] = t.score
                    if on_file_done:
                        on_file_done(t.score, p.stat().st_size)
                    continue
                quarantine_parts.append(parts / f"{i:06d}.jsonl")
                jobs.append((p, ws.rel(p), staging / rel, f"{ws.rel(ws.scored_runs)}/{rel}",
                             quarantine_parts[-1], cfg.score, cfg.materialize.quarantine_preview_chars, reviews))
            scored: list[FileResult] = map_files(
                score_file, jobs, [j[0].stat().st_size for j in jobs], workers=cfg.materialize.workers,
                parallel_min_bytes=cfg.materialize.parallel_min_bytes, on_done=on_file_done)
            left = iter(scored)
            results = [done[i] if i in done else next(left) for i in range(len(files))]
            phash = policy_hash(cfg.score)
            manifest = {
                "stage": STAGE, "policy_version": POLICY_VERSION, "policy_hash": phash,
                "by_rule": summed(results, "by_rule"),  # how often each rule fired (what the report shows)
                "files": [{"evidence": r.evidence_file, "evidence_sha256": r.evidence_sha256,
                           "scored": r.scored_file, "sha256": r.sha256, "rows": r.scored} for r in results],
            }
            manifest_bytes = orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"
            (staging / MANIFEST).write_bytes(manifest_bytes)
            qpath = ws.out / quarantine_file(STAGE)
            qrows, qsha = concat_files(quarantine_parts, qpath)
            publish_dir(staging, ws.scored_runs)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    outputs = [{"path": r.scored_file, "sha256": r.sha256, "rows": r.scored} for r in results]
    outputs.append({"path": f"{ws.rel(ws.scored_runs)}/{MANIFEST}",
                    "sha256": hashlib.sha256(manifest_bytes).hexdigest(), "rows": 1})
    outputs.append({"path": ws.rel(qpath), "sha256": qsha, "rows": qrows})
    return ScoreResult(results, POLICY_VERSION, phash, outputs, time.perf_counter() - t0)


def read_manifest(ws: Workspace, digest: Callable[[Path], str] = file_sha256) -> dict[str, Any]:
    """The scored-runs manifest, checked against the evidence on disk (raises StaleInputError);
    `digest(path)`: a file's sha256 (run-all's, which knows what it wrote without reading it)."""
    path = ws.scored_runs / MANIFEST
    if not path.exists():
        raise StaleInputError("no scored runs in data/scored-runs/; run `refinery score` first")
    manifest = orjson.loads(path.read_bytes())
    on_disk = [rel for _, rel in ws.rels(evidence_files(ws))]
    listed = [f["evidence"] for f in manifest["files"]]
    if on_disk != listed:
        raise StaleInputError("the evidence files changed since scoring; run `refinery score` again")
    for f in manifest["files"]:
        if digest(ws.out / f["evidence"]) != f["evidence_sha256"]:
            raise StaleInputError(f"{f['evidence']} changed since it was scored; run `refinery score` again")
    return manifest
