"""Stage 3 — exports: scored runs (with their evidence) → every export in refinery/exporters/.

    data/scored-runs + data/evidence ──▶ exports/rag/playbooks.jsonl              (RagSample)
                                     ──▶ exports/sft/instruction_response.jsonl   (SftSample)
                                     ──▶ exports/preference/chosen_rejected.jsonl (PreferencePair)
                                     ──▶ exports/quarantine/export.jsonl          (refused on reading)
                                     ──▶ exports/quarantine/export-<name>.jsonl   (refused on merging)
                                     ──▶ <export>.stats.json next to each export  (composition)

Every scored run is accounted for in every export it was offered to: written, or quarantined
with a reason (a category the export does not take, no text, a secret or personal data, a
duplicate answer, no counterpart for a pair, ...). For preference, a row counts as written
when it is in at least one pair. What is decided on reading a row — its category, its text —
is decided for every export at once, and a row refused by several exports for one reason is
one record naming them (`exports`) in the shared exports/quarantine/export.jsonl; what only a
merge can decide (a duplicate, a missing partner) goes to that export's own file.

How it runs: each scored-run file is read together with its evidence file (they correspond
line for line) in a worker process, which writes each export's candidate rows (`Exporter.
candidate`) and the refusals into part files. A merge per export (`Exporter.merge`) then
drops duplicate answers across files, or pairs candidates one hash bucket of task keys at a
time — so grouping never holds more than one bucket in memory; the merges run in worker
processes side by side. Nothing is published until every export is complete and checked
(`Exporter.verify`: the SFT file is re-read against the scored runs); then each file is renamed
into place. In run-all, the reading of each file was done by the single pass as the evidence was
written (refinery.single_pass): its part files are taken as they are, and only the merges run
here. The exports themselves — what each takes, writes and checks — are the modules of
refinery/exporters/; this module knows none of them by name.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from refinery import sensitive
from refinery.config import Config
from refinery.errors import AccountingError, RefineryError
from refinery.dedup import SeenHashes
from refinery.exporters import (
    BY_NAME, EXPORTERS, NAMES, Candidate, Composition, ExportStats, LeakError, Settings, reply,
)
from refinery.exporters.preference import PREFERENCE_CHOSEN, PREFERENCE_REJECTED, pair_group, repeats_chosen_call
from refinery.exporters.sft import SFT_NEVER, sft_categories, verify_sft
from refinery.jsonl import (
    JsonlWriter, LineCursor, atomic_write, concat_files, dumps_line, fsync_dir, read_jsonl,
)
from refinery.normalize import answer_text, normalize_text
from refinery.parallel import map_files
from refinery.quarantine import quarantine_record
from refinery.reasons import Reason
from refinery.score import StaleInputError, read_manifest
from refinery.single_pass import Prepared, TailResult
from refinery.stages import StageResult
from refinery.workspace import EXPORT_FILES, EXPORT_QUARANTINE, Workspace, quarantine_file

EXPORTS = NAMES
PATHS = {e: rel.removeprefix("exports/") for e, rel in EXPORT_FILES.items()}  # under exports/
BUCKET_BYTES = 32 << 20  # evidence bytes per bucket of a grouped export: bounds the grouping's memory
# what tests and scripts import from here, whose home is now the export's module
__all__ = ["EXPORTS", "PATHS", "LeakError", "ExportStats", "SFT_NEVER", "PREFERENCE_CHOSEN", "PREFERENCE_REJECTED",
           "pair_group", "repeats_chosen_call", "reply", "sft_categories", "verify_sft", "refusals", "run"]


def stage_name(export: str) -> str:
    return f"export-{export}"


# --- results ------------------------------------------------------------------------------


@dataclass
class ExportResult:
    exports: dict[str, dict[str, Any]]
    """export → {rows_in, rows_out, quarantined, by_reason, path, quarantine, stats, ...}"""
    outputs: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"stage": "export", "exports": self.exports, "outputs": self.outputs,
                "seconds": round(self.seconds, 3)}

    def stage_results(self) -> list[StageResult]:
        """One per export written: its outputs (the export, its own quarantine, the shared one,
        its stats), and its counts — the export's own (pairs, tool use, ...) from its exporter."""
        out = []
        for name, e in self.exports.items():
            mine = {e["path"], e["quarantine"], e["quarantine_shared"], e["stats_path"]}
            own = BY_NAME[name].composition().receipt_counts(e)
            counts = {"rows_in": e["rows_in"], "rows_out": e["rows_out"], "quarantined": e["quarantined"],
                      "written": e["rows"], **own["counts"], **{f"redacted.{k}": v for k, v in e["redacted"].items()}}
            out.append(StageResult(stage_name(name), [o for o in self.outputs if o["path"] in mine], counts,
                                   by_category=own["by_category"], by_reason=e["by_reason"],
                                   by_source={s: {"written": n} for s, n in own["by_source"].items()}))
        return out


#: The evidence fields an export row is made of: all of them are scanned, keys and values.
SCANNED = ("task_name", "prompt", "response", "tool_calls", "messages")


def _texts(ev: dict[str, Any]) -> list[tuple[str, Any]]:
    """The fields of an evidence record that can reach an export, for the sensitive-data scan."""
    return [(k, ev[k]) for k in SCANNED if ev[k]]


def _redact_evidence(ev: dict[str, Any], allow: list[str]) -> tuple[dict[str, Any], list[str]]:
    out = dict(ev)
    found: list[str] = []
    for key in SCANNED:
        if ev[key]:
            out[key], kinds = sensitive.redact(ev[key], allow)
            found += kinds
    return out, found


# --- the per-file worker ------------------------------------------------------------------


@dataclass
class FileJob:
    index: int
    evidence: Path
    evidence_rel: str
    scored: Path
    scored_rel: str
    parts: Path
    exports: tuple[str, ...]
    settings: Settings
    buckets: int


def _pairs(job: FileJob) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    return pairs(job.evidence, job.evidence_rel, job.scored, job.scored_rel)


def pairs(evidence_path: Path, evidence_rel: str, scored: Path, scored_rel: str
          ) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(evidence record, scored run, provenance of the scored-run line) for every line of a
    scored-run file and its evidence file. Raises StaleInputError when they do not match."""
    sha256, dumps, sort_keys = hashlib.sha256, orjson.dumps, orjson.OPT_SORT_KEYS
    evidence = LineCursor(read_jsonl(evidence_path))
    for line in read_jsonl(scored):
        if line.obj is None:
            raise StaleInputError(f"{scored_rel}:{line.offset}: {line.reason} — scored runs are written by "
                                  "`refinery score`; run it again")
        sr = line.obj
        target = sr["provenance"]["line_offset"]
        ev_line = evidence.at(target)
        if ev_line is None or ev_line.obj is None or ev_line.obj["id"] != sr["id"]:
            raise StaleInputError(f"{scored_rel}:{line.offset} does not match {evidence_rel}:{target}; "
                                  "run `refinery score` again")
        prov = {"source_file": scored_rel, "line_offset": line.offset,
                "sig_hash": sha256(dumps(sr, option=sort_keys)).hexdigest(), "recorded_at": sr["recorded_at"]}
        yield ev_line.obj, sr, prov


class _Lazy:
    """A file whose handle is asked for at each write (a Reader's, which may have closed it)."""

    def __init__(self, handle: Callable[[], Any]):
        self.handle = handle

    def write(self, data: bytes) -> None:
        self.handle().write(data)


class QuarantineWriter:
    """Writes the exports' refusals into a part file: the shared file's (stage "export", decided
    on reading for every export at once), or one export's own (decided by its merge). Parts are
    hashed when they are joined, not as they are written."""

    def __init__(self, f: Any, *, shared: bool):
        self._f = f
        self.shared = shared

    def refuse(self, stats: list[ExportStats], exports: list[str], source: str, prov: dict[str, Any],
               reason: Reason, detail: str) -> None:
        """Count one refusal for each of `stats` and write one record of it, naming `exports`,
        pointing at its scored-run line. The row itself is not copied (it may hold the very
        secret it was refused for)."""
        for st in stats:
            st.quarantined += 1
            st.by_reason[reason.value] += 1
        stage = "export" if self.shared else stage_name(exports[0])
        self._f.write(dumps_line(quarantine_record(stage, source, prov["source_file"], prov["line_offset"], reason,
                                                   detail, prov["sig_hash"], recorded_at=prov["recorded_at"],
                                                   exports=exports)))


def refusals_path(parts: Path, index: int) -> Path:
    """Where the reading of file `index` writes the refusals it decides for every export."""
    return parts / f"q-{index:06d}.jsonl"


def near_path(parts: Path, export: str, index: int) -> Path:
    """Where the reading of file `index` writes the MinHash record of each of an export's
    candidates, in line order (refinery.neardup.RECORD)."""
    return parts / f"n-{export}-{index:06d}.bin"


def part_path(parts: Path, export: str, index: int, bucket: int | None = None) -> Path:
    """Where the reading of file `index` writes an export's candidates (a grouped one's, by bucket)."""
    return parts / (f"c-{export}-{index:06d}.jsonl" if bucket is None else
                    f"c-{export}-b{bucket:04d}-{index:06d}.jsonl")


class Reader:
    """The reading of one scored-run file (with its evidence) for every export, a row at a time:
    each row's candidates and refusals go into the file's part files under `parts`.

    A row's category and text are judged for every export, asked for or not (they cost one check
    each; the scan is shared): what a command that writes only some exports keeps of the shared
    quarantine is `_splice_shared`'s to decide.

    `buffer`: each part file's write buffer. `spread`: a grouped export's candidates go into one
    file, each line prefixed with its bucket, and are spread into their buckets' files on
    `close()` — for a reader that is one of many open at once (the single pass keeps one per
    evidence partition), so that it holds a few open files, not one per bucket.
    """

    def __init__(self, parts: Path, index: int, exports: tuple[str, ...], settings: Settings, buckets: int, *,
                 buffer: int = 1 << 18, spread: bool = False):
        self.parts, self.index, self.settings, self.buckets = parts, index, settings, buckets
        self.buffer, self.spread = buffer, spread
        self.stats = {e: ExportStats(e) for e in exports}
        self.allow = list(settings.export.allow_sensitive)
        self.redact = settings.export.sensitive == "redact"
        self.files: dict[Any, Any] = {}
        self.made: set[Any] = set()  # the part files made so far (a suspended reader appends to them)
        self.ungrouped = [e for e in exports if not BY_NAME[e].grouped]
        for e in self.ungrouped:  # made even when empty: the merge takes one part per file
            self._candidates(e)
        self.lines = dict.fromkeys(self.ungrouped, 0)  # candidates written to each ungrouped export's part so far
        self.dedup = [e for e in self.ungrouped if BY_NAME[e].dedup and settings.export.dedup]
        self.near = [e for e in self.dedup if settings.export.near_duplicates]
        if self.near:
            from refinery.neardup import Signer

            self.signer = Signer()
            for e in self.near:  # made even when empty: the near-duplicate pass takes one per file
                self._file(("n", e), lambda e=e: near_path(parts, e, index))
        refusals = lambda: self._file(("q",), lambda: refusals_path(parts, index))  # noqa: E731
        refusals()  # made even when empty: it is moved into place
        self.qw = QuarantineWriter(_Lazy(refusals), shared=True)

    def _file(self, key: Any, path: Callable[[], Path]) -> Any:
        """The part file `key` names (opened on first use: most files feed a few buckets)."""
        f = self.files.get(key)
        if f is None:
            f = self.files[key] = open(path(), "ab" if key in self.made else "wb", buffering=self.buffer)
            self.made.add(key)
        return f

    def _candidates(self, e: str) -> Any:
        return self._file(e, lambda: part_path(self.parts, e, self.index))

    def suspend(self) -> None:
        """Close the part files (what is written stays): the next row opens them again to append."""
        for f in self.files.values():
            f.close()
        self.files.clear()

    def _refuse(self, exports: list[str], sr: dict[str, Any], prov: dict[str, Any], reason: Reason,
                detail: str) -> None:
        self.qw.refuse([self.stats[e] for e in exports if e in self.stats], exports, sr["source"], prov, reason,
                       detail)

    def row(self, ev: dict[str, Any], sr: dict[str, Any], prov: dict[str, Any]) -> None:
        """One scored run `sr` of evidence `ev`; `prov` points at the scored-run line."""
        s, stats, refuse = self.settings, self.stats, self._refuse
        cat = sr["category"]
        for st in stats.values():
            st.rows_in += 1
        admitted = [x.name for x in EXPORTERS if x.admits(cat, s)]
        if excluded := [e for e in NAMES if e not in admitted]:
            refuse(excluded, sr, prov, Reason.CATEGORY_EXCLUDED, f"category {cat} is not taken")
        if not admitted:
            return
        has_prompt = bool(ev["prompt"] and ev["prompt"].strip())
        has_answer = bool((ev["response"] or "").strip() or ev["tool_calls"])
        if not has_prompt or not has_answer:
            refuse(admitted, sr, prov, Reason.MISSING_TEXT, "no prompt" if not has_prompt else "no answer")
            return
        finding = sensitive.first_finding(_texts(ev), self.allow)
        if finding is not None:
            kind, where = finding
            if not self.redact:
                secret = sensitive.reason_family(kind) == "secret"
                refuse(admitted, sr, prov, Reason.SECRET_DETECTED if secret else Reason.PII_DETECTED,
                       f"{kind} in {where}")
                return
            ev, kinds = _redact_evidence(ev, self.allow)
            left = sensitive.first_finding(_texts(ev), self.allow)
            if left is not None:  # never expected; the re-scan is the guarantee, not the redaction
                reason = Reason.SECRET_DETECTED if sensitive.reason_family(left[0]) == "secret" else \
                    Reason.PII_DETECTED
                refuse(admitted, sr, prov, reason, f"{left[0]} in {left[1]} survived redaction")
                return
            for e in admitted:
                if e in stats:
                    stats[e].redacted.update(kinds)
        wanted = [BY_NAME[e] for e in admitted if e in stats]
        if not wanted:
            return
        answer = answer_text(ev)
        norm = normalize_text(answer)
        key = hashlib.sha256(f"{sr['task_key']}\x1f{norm}".encode()).hexdigest()[:16]
        c = Candidate(ev, sr, prov, answer, norm, key)
        signature = None
        for x in wanted:
            e = x.name
            if x.grouped:
                b = x.bucket(c, self.buckets)
                line = x.candidate(c, s)
                if self.spread:
                    self._file(("spread", e), lambda e=e: self._spread_path(e)).write(b"%d\t" % b + line)
                else:
                    self._file((e, b), lambda e=e, b=b: part_path(self.parts, e, self.index, b)).write(line)
                continue
            self._candidates(e).write(x.candidate(c, s))
            if e in self.dedup:  # its key, for the dedup across files
                stats[e].keys.append(int(key, 16))
            if e in self.near:  # its signature, for the near-duplicate pass across files
                signature = signature or self.signer.record(sr["id"], ev["prompt"], answer)
                self._file(("n", e), lambda e=e: near_path(self.parts, e, self.index)).write(signature)
            self.lines[e] += 1

    def _spread_path(self, e: str) -> Path:
        return self.parts / f"g-{e}-{self.index:06d}.jsonl"

    def close(self) -> dict[str, ExportStats]:
        self.suspend()
        # every spread file made, not only those open now: a suspended reader closed its own
        spread = [key[1] for key in self.made if type(key) is tuple and key[0] == "spread"]
        for e in sorted(spread):  # into the buckets' files: only this reader's are open
            path = self._spread_path(e)
            with open(path, "rb") as lines:
                for line in lines:
                    tab = line.index(b"\t")
                    b = int(line[:tab])
                    self._file((e, b), lambda e=e, b=b: part_path(self.parts, e, self.index, b)).write(line[tab + 1:])
            self.suspend()
            path.unlink()
        for e, n in self.lines.items():
            self.stats[e].candidates = n
        return self.stats


def export_file(job: FileJob) -> dict[str, ExportStats]:
    """Read one scored-run file with its evidence; write candidates and refusals into part files."""
    reader = Reader(job.parts, job.index, job.exports, job.settings, job.buckets)
    try:
        for ev, sr, prov in _pairs(job):
            reader.row(ev, sr, prov)
    finally:
        stats = reader.close()
    return stats


class SharedQuarantineDamaged(RefineryError):
    """The published exports/quarantine/export.jsonl has a line that is not an export refusal, so
    the other exports' refusals cannot be kept from it."""


def _splice_shared(new: Path, old: Path, mine: tuple[str, ...], dest: Path) -> tuple[int, str]:
    """The shared refusals after a command that wrote only the exports `mine`: theirs as this
    run decided them, the other exports' as the published file has them (decided by the run or
    command that wrote those exports, perhaps with other settings). Records are in file order
    (scored-run file, line, a category refusal before a text one), one per row and reason, each
    naming its exports in their order; with the same settings and inputs the result is the file
    a run of every export writes. Without a published file, this run's decisions stand for
    every export. Raises SharedQuarantineDamaged on a published line that is not a refusal."""
    import heapq

    if not old.is_file():
        return concat_files([new], dest)

    def records(path: Path, keep: set[str]) -> Iterator[tuple[tuple[str, int, int], dict[str, Any]]]:
        for line in read_jsonl(path):
            rec = line.obj
            p = rec.get("provenance") if isinstance(rec, dict) else None
            if not (isinstance(p, dict) and isinstance(rec.get("exports"), list) and isinstance(rec.get("reason"), str)
                    and isinstance(p.get("source_file"), str) and type(p.get("line_offset")) is int):
                raise SharedQuarantineDamaged(
                    f"{path.name}:{line.offset} is not an export refusal ({line.reason or 'fields missing'}), so "
                    "the other exports' refusals cannot be kept from it: run `refinery export-all` (or "
                    "`refinery run-all`) to write every export and this file anew")
            if named := [e for e in rec["exports"] if e in keep]:
                key = (p["source_file"], p["line_offset"], 0 if rec["reason"] == Reason.CATEGORY_EXCLUDED.value else 1)
                yield key, {**rec, "exports": named}

    others = set(NAMES) - set(mine)
    merged = heapq.merge(records(new, set(mine)), records(old, others), key=lambda r: r[0])
    with atomic_write(dest) as f:
        w = JsonlWriter(f)
        # the records of one row and rank come together: merge them by reason, first seen first
        for _, group in itertools.groupby(merged, key=lambda r: r[0]):
            by_reason: dict[str, dict[str, Any]] = {}
            for _, rec in group:
                if (kept := by_reason.get(rec["reason"])) is None:
                    by_reason[rec["reason"]] = rec
                else:
                    named = set(kept["exports"]) | set(rec["exports"])
                    kept["exports"] = [e for e in NAMES if e in named]
            for rec in by_reason.values():
                w.write(rec)
    return w.rows, w.sha256


def refusals(ws: Workspace, export: str) -> Iterator[dict[str, Any]]:
    """Every quarantine record of a row `export` refused: the shared file's records that name it
    (refused on reading, in file order), then its own file's (refused while merging)."""
    for rel in (EXPORT_QUARANTINE, quarantine_file(stage_name(export))):
        path = ws.out / rel
        if path.is_file():
            for line in read_jsonl(path):
                if line.obj is not None and export in (line.obj.get("exports") or ()):
                    yield line.obj


# --- the stage ----------------------------------------------------------------------------


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        if path.exists():
            with open(path, "rb") as f:
                yield from f


class Lines(AbstractSet[int]):
    """Line numbers of a merge unit's candidates (ascending), as 8 bytes each until a worker asks
    about one: then a set of this unit's only (at 10^6 rows sets of every repeated line held
    tens of MiB in the driver and in each pickled unit)."""

    def __init__(self, lines: Iterable[int] = ()):
        self.lines = lines if isinstance(lines, array) else array("q", lines)
        self._set: frozenset[int] | None = None

    def __contains__(self, line: object) -> bool:
        if self._set is None:
            self._set = frozenset(self.lines)
        return line in self._set

    def __iter__(self) -> Iterator[int]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def __getstate__(self) -> tuple[array[int]]:  # a tuple: an empty array is falsy, and pickle would drop it
        return (self.lines,)

    def __setstate__(self, state: tuple[array[int]]) -> None:
        self.lines, self._set = state[0], None


def _duplicates(keys: list[array[int]]) -> dict[int, array[int]]:
    """file → the lines of its candidates (ascending) whose (task, answer) key an earlier
    candidate (in file order) has: the export keeps the first of each. 8 bytes a key, one pass."""
    seen = SeenHashes(sum(map(len, keys))).add
    out: dict[int, array[int]] = {}
    for i, file_keys in enumerate(keys):
        for line, key in enumerate(file_keys):
            if not seen(key):
                out.setdefault(i, array("q")).append(line)
    return out


#: A near-duplicate refusal's detail as `NearRefusals` writes it (`row`: the kept row's id): the
#: audit masks that id before its secret scans, since refinery made it (invariants.scanned_fields).
NEAR_DETAIL = re.compile(r"near-duplicate of (?P<row>[a-z][a-z0-9]*-[0-9a-f]{16}), kept in the export \(estimated "
                         r"Jaccard similarity [01]\.\d{3}; threshold [0-9.]+\)")


class NearRefusals(Mapping[int, str]):
    """line → the refusal's detail for a merge unit's near-duplicates: the lines (ascending), the
    kept rows' ids and the similarities as arrays, each detail written when it is asked for (as
    strings in dicts they were ~300 bytes a refusal, and templated traces have many)."""

    def __init__(self, prefix: str, threshold: float, lines: Iterable[int] = (), kept: Iterable[int] = (),
                 sims: Iterable[float] = ()):
        self.prefix, self.threshold = prefix, threshold
        self.lines, self.kept, self.sims = array("q", lines), array("Q", kept), array("d", sims)
        self._at: dict[int, int] | None = None

    def extend(self, other: NearRefusals, offset: int) -> None:
        self.lines.extend(line + offset for line in other.lines)
        self.kept.extend(other.kept)
        self.sims.extend(other.sims)

    def _index(self) -> dict[int, int]:
        if self._at is None:
            self._at = {line: k for k, line in enumerate(self.lines)}
        return self._at

    def __contains__(self, line: object) -> bool:
        return line in self._index()

    def __getitem__(self, line: int) -> str:
        k = self._index()[line]
        return (f"near-duplicate of {self.prefix}-{self.kept[k]:016x}, kept in the export (estimated Jaccard "
                f"similarity {self.sims[k]:.3f}; threshold {self.threshold})")

    def __iter__(self) -> Iterator[int]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def __getstate__(self) -> tuple[Any, ...]:
        return self.prefix, self.threshold, self.lines, self.kept, self.sims

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.prefix, self.threshold, self.lines, self.kept, self.sims = state
        self._at = None


def _near_duplicates(e: str, tmp_root: Path, s: Settings, counts: list[int],
                     repeated: dict[int, array[int]]) -> dict[int, NearRefusals]:
    """file → its candidates' lines found near a kept row, with the refusals' details, for an
    export's near-duplicates (refinery.neardup), the exact repeats left out; none when
    export.near_duplicates is off."""
    if not (s.export.dedup and s.export.near_duplicates):
        return {}
    from refinery.neardup import find

    starts = list(itertools.accumulate(counts, initial=0))
    excluded = (starts[i] + line for i, lines in repeated.items() for line in lines)
    threshold = s.export.near_duplicate_threshold
    prefix = BY_NAME[e].id_prefix
    out: dict[int, NearRefusals] = {}
    found = find([near_path(tmp_root, e, i) for i in range(len(counts))], excluded, threshold)
    for place, kept, sim in zip(found.places.tolist(), found.kept.tolist(), found.sims.tolist()):
        i = bisect.bisect_right(starts, place) - 1
        if i not in out:
            out[i] = NearRefusals(prefix, threshold)
        out[i].lines.append(place - starts[i])
        out[i].kept.append(kept)
        out[i].sims.append(sim)
    return out


@dataclass
class MergeUnit:
    """A part of one export's merge that needs no other: one file's candidates (an ungrouped
    export; `duplicates`: its lines found repeated by the dedup; `near`: its lines found near
    another, with the refusal's detail), or one hash bucket of task keys (a grouped one). Units
    run side by side; their outputs are joined in unit order."""

    export: str
    parts: list[Path]
    out: Path
    quarantine: Path
    duplicates: Lines
    near: Mapping[int, str]


def _merge_unit(u: MergeUnit, s: Settings) -> tuple[ExportStats, Composition]:
    x = BY_NAME[u.export]
    st, comp = ExportStats(u.export), x.composition()
    with open(u.out, "wb") as f, open(u.quarantine, "wb") as qf:
        qw = QuarantineWriter(qf, shared=False)

        def write(row: dict[str, Any], line: bytes | None = None) -> None:
            f.write(line if line is not None else dumps_line(row))  # hashed when the units are joined

        def refuse(source: str, prov: dict[str, Any], reason: Reason, detail: str) -> None:
            qw.refuse([st], [u.export], source, prov, reason, detail)

        for row in x.merge(_lines(u.parts), write, refuse, st, s, duplicates=u.duplicates, near=u.near):
            comp.add(row)
    return st, comp


#: Candidate bytes per merge unit of an ungrouped export: consecutive files are merged together
#: up to this much (a file each would be hundreds of small units at 10^6 rows).
UNIT_BYTES = 8 << 20


def _merge_units(e: str, tmp_root: Path, buckets: int, candidates: list[int], repeated: dict[int, array[int]],
                 near: dict[int, NearRefusals]) -> list[MergeUnit]:
    """An export's merge units: its task buckets (grouped), or runs of consecutive files' parts
    with the lines among them that repeat an earlier candidate or are near one (ungrouped)."""
    def unit(u: int, parts: list[Path], duplicates: Lines | None = None,
             close: NearRefusals | None = None) -> MergeUnit:
        return MergeUnit(e, parts, tmp_root / f"m-{e}-{u:06d}.jsonl", tmp_root / f"mq-{e}-{u:06d}.jsonl",
                         duplicates or Lines(), close or {})

    if BY_NAME[e].grouped:
        return [unit(b, [part_path(tmp_root, e, i, b) for i in range(len(candidates))]) for b in range(buckets)]
    units: list[MergeUnit] = []
    parts: list[Path] = []
    duplicates, close = Lines(), None
    size = lines = 0
    for i, n in enumerate(candidates):
        path = part_path(tmp_root, e, i)
        parts.append(path)
        duplicates.lines.extend(lines + line for line in repeated.get(i, ()))
        if i in near:
            close = close or NearRefusals(near[i].prefix, near[i].threshold)
            close.extend(near[i], lines)
        lines += n
        size += path.stat().st_size if path.exists() else 0
        if size >= UNIT_BYTES or i == len(candidates) - 1:
            units.append(unit(len(units), parts, duplicates, close))
            parts, duplicates, close, size, lines = [], Lines(), None, 0, 0
    return units


def _finish_export(e: str, ws: Workspace, tmp_root: Path, s: Settings, st: ExportStats, units: list[MergeUnit],
                   merged: list[tuple[ExportStats, Composition]]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Path, Path]]]:
    """Join one export's merged units into its export, quarantine and stats files under
    `tmp_root` (nothing published), and check them: (its result, its outputs, the moves)."""
    x = BY_NAME[e]
    comp = x.composition()
    for part_st, part_comp in merged:
        st.absorb(part_st)
        comp.merge(part_comp)
    rel, qrel = EXPORT_FILES[e], quarantine_file(stage_name(e))
    stats_rel = rel.removesuffix(".jsonl") + ".stats.json"
    tmp, qtmp = tmp_root / f"out-{e}.jsonl", tmp_root / f"outq-{e}.jsonl"
    rows, st.sha256 = concat_files([u.out for u in units], tmp)
    q_rows, q_sha = concat_files([u.quarantine for u in units], qtmp)
    if st.rows_in != st.rows_out + st.quarantined:
        raise AccountingError(f"{e}: {st.rows_in} in, {st.rows_out} out + {st.quarantined} quarantined")
    x.verify(tmp, ws, s)
    stats_tmp = tmp_root / f"stats-{e}.json"
    stats_json = {**comp.to_json(st, rel), "rows_in": st.rows_in, "quarantined": st.quarantined,
                  "by_reason": dict(sorted(st.by_reason.items())), "redacted": dict(sorted(st.redacted.items()))}
    stats_bytes = orjson.dumps(stats_json, option=orjson.OPT_INDENT_2) + b"\n"
    stats_tmp.write_bytes(stats_bytes)
    result = {**stats_json, "rows_out": st.rows_out, "quarantine": qrel, "quarantine_shared": EXPORT_QUARANTINE,
              "stats_path": stats_rel}
    outputs = [{"path": rel, "sha256": st.sha256, "rows": rows},
               {"path": qrel, "sha256": q_sha, "rows": q_rows},
               {"path": stats_rel, "sha256": hashlib.sha256(stats_bytes).hexdigest(), "rows": 1}]
    return result, outputs, [(tmp, ws.out / rel), (qtmp, ws.out / qrel), (stats_tmp, ws.out / stats_rel)]


def _merge(ws: Workspace, cfg: Config, s: Settings, exports: tuple[str, ...], tmp_root: Path, buckets: int,
           read: list[dict[str, ExportStats]]
           ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[tuple[Path, Path]]]:
    """Every export's merge, as units that run side by side on every worker — each export's
    runs of files (ungrouped; which candidates repeat an earlier one is decided first, from the
    keys the reading of each file returned: none without dedup) or task buckets (grouped) —;
    then each export is joined in order. `read`: what the reading of each file found."""
    size = lambda paths: sum(p.stat().st_size for p in paths if p.exists())  # noqa: E731
    workers = {"workers": cfg.materialize.workers, "parallel_min_bytes": cfg.materialize.parallel_min_bytes}
    units = {}
    for e in exports:
        counts = [f[e].candidates for f in read]
        repeated = _duplicates([f[e].keys for f in read])
        near = _near_duplicates(e, tmp_root, s, counts, repeated) if BY_NAME[e].dedup else {}
        units[e] = _merge_units(e, tmp_root, buckets, counts, repeated, near)
    flat = [u for e in exports for u in units[e]]
    merged = map_files(_merge_unit, [(u, s) for u in flat], [size(u.parts) for u in flat], **workers)
    finish, at = [], 0
    for e in exports:
        st = ExportStats(e)
        for f in read:
            st.add(f[e])
        finish.append((e, ws, tmp_root, s, st, units[e], merged[at:at + len(units[e])]))
        at += len(units[e])
    # joining and checking (SFT's re-read) are one pass over each export: side by side too
    done = map_files(_finish_export, finish, [size([u.out for u in units[e]]) for e in exports], **workers)
    results: dict[str, dict[str, Any]] = {}
    outputs: list[dict[str, Any]] = []
    staged: list[tuple[Path, Path]] = []
    for e, (result, outs, moves) in zip(exports, done):
        results[e] = result
        outputs += outs
        staged += moves
    return results, outputs, staged


def _take(t: TailResult, i: int, exports: tuple[str, ...], tmp_root: Path, buckets: int) -> dict[str, ExportStats]:
    """Move what the single pass read from file i into place as file i's reading would write it."""
    for e in exports:
        for b in range(buckets) if BY_NAME[e].grouped else (None,):
            if (src := part_path(t.folder, e, 0, b)).exists():
                os.replace(src, part_path(tmp_root, e, i, b))
    os.replace(refusals_path(t.folder, 0), refusals_path(tmp_root, i))
    for e in exports:
        if (src := near_path(t.folder, e, 0)).exists():
            os.replace(src, near_path(tmp_root, e, i))
    return {e: t.exports[e] for e in exports}


def run(ws: Workspace, cfg: Config, *, exports: tuple[str, ...] = EXPORTS, include_partial: bool | None = None,
        on_file_done: Callable[[dict[str, ExportStats], int], None] | None = None,
        prepared: Prepared | None = None, digest: Callable[[Path], str] | None = None) -> ExportResult:
    """Write the requested exports. `prepared`: the files run-all's single pass read for the
    exports as it wrote them (refinery.single_pass), taken when their scored runs are those on
    disk; the others are read here. `digest(path)`: a file's sha256, for the check that the
    evidence is what was scored (default: read it). Raises StaleInputError (inputs missing or out of date) or
    LeakError (the SFT re-read failed: nothing was published)."""
    t0 = time.perf_counter()
    settings = Settings(cfg.export, cfg.export.include_partial if include_partial is None else include_partial)
    if unknown := sorted(set(exports) - set(EXPORTS)):
        raise ValueError(f"no export named {', '.join(unknown)} (the exports: {', '.join(EXPORTS)})")
    exports = tuple(e for e in EXPORTS if e in exports)
    with ws.lock():
        manifest = read_manifest(ws, digest) if digest is not None else read_manifest(ws)
        files = manifest["files"]
        sizes = [(ws.out / f["evidence"]).stat().st_size for f in files]
        tails: dict[str, TailResult] = {}
        if prepared is not None and prepared.plan.settings == settings:
            tails = {t.score.evidence_file: t for t in prepared.tails.values()}
            buckets = prepared.plan.buckets  # the exports' bytes do not depend on it
        else:
            buckets = max(1, min(4096, -(-sum(sizes) // BUCKET_BYTES)))
        tmp_root = Path(tempfile.mkdtemp(prefix=".export-", dir=ws.root / "data"))
        try:
            jobs = [FileJob(i, ws.out / f["evidence"], f["evidence"], ws.out / f["scored"], f["scored"], tmp_root,
                            exports, settings, buckets) for i, f in enumerate(files)]
            done: dict[int, dict[str, ExportStats]] = {}
            for j, f, size in zip(jobs, files, sizes):
                t = tails.get(f["evidence"])
                if t is not None and (t.score.scored_file, t.score.sha256) == (f["scored"], f["sha256"]):
                    done[j.index] = _take(t, j.index, exports, tmp_root, buckets)
                    if on_file_done:
                        on_file_done(done[j.index], size)
            left = [j for j in jobs if j.index not in done]
            sensitive.prepare()  # compiled once, inherited by forked workers
            read = iter(map_files(export_file, [(j,) for j in left], [sizes[j.index] for j in left],
                                  workers=cfg.materialize.workers,
                                  parallel_min_bytes=cfg.materialize.parallel_min_bytes, on_done=on_file_done))
            outcomes = [done[j.index] if j.index in done else next(read) for j in jobs]
            # the refusals made on reading, in file order: one file for every export
            shared = tmp_root / "q-all.jsonl"
            shared_rows, shared_sha = concat_files([refusals_path(tmp_root, j.index) for j in jobs], shared)
            if exports != EXPORTS:  # the other exports' refusals stay as their own runs decided them
                decided, shared = shared, tmp_root / "q-spliced.jsonl"
                shared_rows, shared_sha = _splice_shared(decided, ws.out / EXPORT_QUARANTINE, exports, shared)
            results, outputs, staged = _merge(ws, cfg, settings, exports, tmp_root, buckets, outcomes)
            staged.insert(0, (shared, ws.out / EXPORT_QUARANTINE))
            outputs.append({"path": EXPORT_QUARANTINE, "sha256": shared_sha, "rows": shared_rows})
            for src, dest in staged:  # every export complete and checked: publish
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
            for d in {dest.parent for _, dest in staged}:
                fsync_dir(d)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return ExportResult(results, outputs, time.perf_counter() - t0)
