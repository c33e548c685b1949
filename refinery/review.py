"""`refinery review export|import`: the human review queue — every scored run the rules left to a
person — and the decisions people make on it.

    reports/review/queue.jsonl   one row per needs_human_review scored run: what was asked and
                                 answered, the rules that fired and what each means, provenance
    reports/review/queue.csv     the same rows for a spreadsheet, with empty decision columns
                                 (decision: accept | reject | correct, corrected_answer,
                                 reviewer, note) to fill in

Rows come in scored-run file order, then line order, so the same run gives the same queue. The
text shown is redacted like a quarantine preview: a secret or personal data in a prompt or an
answer reads `[REDACTED:<kind>]` (the row names the kinds), so the queue can be handed around.
Each row's `provenance` points at its scored-run line (`refinery trace <review_id>` walks it back
to the source line).

`refinery review import FILE` reads a filled-in queue (the CSV, or JSONL rows with the same
columns) and appends each decision to the human_reviews source stream (refinery.decisions),
with what was reviewed and where it came from; the next run-all applies them. Every line of
the file ends up imported, left undecided (no decision), already imported (the same decision
is in the stream) or refused with a reason — each named with its line in
reports/review/import.jsonl; a refused line changes nothing.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from refinery import decisions, sensitive
from refinery.errors import RefineryError
from refinery.jsonl import atomic_write, dumps_line
from refinery.policy import RULES
from refinery.transform import RowError, now_utc, parse_timestamp
from refinery.workspace import Workspace

if TYPE_CHECKING:
    from refinery.config import Config

QUEUE_DIR = "reports/review"
CATEGORY = "needs_human_review"
#: The CSV's columns: the row, then what the reviewer fills in.
DECISION_COLUMNS = ("decision", "corrected_answer", "reviewer", "note")
CSV_COLUMNS = ("review_id", "source", "task_name", "prompt", "response", "tool_calls", "rules", "why",
               "scored_run", *DECISION_COLUMNS)


@dataclass
class Queue:
    jsonl: Path
    csv: Path
    rows: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)
    redacted: int = 0
    pending: int = 0
    """rows decided since the run (imported decisions the next run-all applies): left out"""

    def to_json(self) -> dict[str, Any]:
        return {"queue": str(self.jsonl), "csv": str(self.csv), "rows": self.rows, "by_source": self.by_source,
                "by_rule": self.by_rule, "redacted_rows": self.redacted, "decided_not_applied": self.pending}


def _row(ev: dict[str, Any], sr: dict[str, Any], prov: dict[str, Any]) -> dict[str, Any]:
    shown, kinds = {}, []
    for key in ("prompt", "response", "tool_calls"):
        shown[key], found = sensitive.redact(ev[key]) if ev[key] else (ev[key], [])
        kinds += found
    return {
        "review_id": sr["id"], "source": sr["source"], "task_key": sr["task_key"], "task_name": sr["task_name"],
        "prompt": shown["prompt"], "response": shown["response"], "tool_calls": shown["tool_calls"] or [],
        "score": sr["score"],
        "rules_fired": [{"rule": r, "effect": RULES[r][0] if r in RULES else None,
                         "why": RULES[r][1] if r in RULES else None} for r in sr["rules_fired"]],
        "redacted": sorted(set(kinds)), "provenance": prov,
    }


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one starting with =, +, - or @ would be read as a
    formula (CSV injection), so it gets a leading apostrophe, as spreadsheets themselves do."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def counted(n: int, noun: str) -> str:
    """`1 decision`, `2 decisions`."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


class UnimportedDecisions(RefineryError):
    """The queue.csv an export would replace holds decisions not imported yet."""


def _keep_decisions(ws: Workspace, path: Path, reviews: decisions.Reviews) -> None:
    """Refuse to write over a queue.csv in which a reviewer decided rows not imported yet: a
    re-export would throw their work away."""
    if not path.is_file():
        return
    waiting = []
    try:
        for n, _, row, _ in _rows(path):
            if row and (row.get("decision") or "").strip() and (row.get("review_id") or "").strip() \
                    not in reviews.by_id:
                waiting.append(n)
    except DecisionFileError:
        return  # not a queue with decisions in it
    if waiting:
        rel = ws.rel(path)
        raise UnimportedDecisions(
            f"{rel} holds {counted(len(waiting), 'decision')} not imported yet (line "
            f"{', '.join(map(str, waiting[:5]))}{', …' if len(waiting) > 5 else ''}): take them in first with "
            f"`refinery review import {rel}`, or move the file away to start over; nothing was written")


def export_queue(ws: Workspace, cfg: Config) -> Queue:
    """Write the review queue of the scored runs on disk (JSONL and CSV, each atomically): the
    rows awaiting review, less those decided since (imported, waiting for the next run-all).
    Raises StaleInputError when there are no scored runs or they do not match the evidence."""
    from refinery.export import pairs
    from refinery.score import read_manifest

    manifest = read_manifest(ws)
    reviews = decisions.load(ws, cfg)
    out = ws.root / QUEUE_DIR
    q = Queue(out / "queue.jsonl", out / "queue.csv")
    _keep_decisions(ws, q.csv, reviews)
    sources: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    with atomic_write(q.jsonl) as f, atomic_write(q.csv) as c:
        text = io.TextIOWrapper(c, encoding="utf-8", newline="")
        table = csv.writer(text, lineterminator="\n")
        table.writerow(CSV_COLUMNS)
        for entry in manifest["files"]:
            for ev, sr, prov in pairs(ws.out / entry["evidence"], entry["evidence"], ws.out / entry["scored"],
                                      entry["scored"]):
                if sr["category"] != CATEGORY:
                    continue
                if reviews.rule(ev) in decisions.RULE.values():
                    q.pending += 1
                    continue
                row = _row(ev, sr, prov)
                f.write(dumps_line(row))
                q.rows += 1
                q.redacted += bool(row["redacted"])
                sources[row["source"]] += 1
                rules.update(r["rule"] for r in row["rules_fired"])
                table.writerow([_cell(v) for v in (
                    row["review_id"], row["source"], row["task_name"] or "", row["prompt"] or "",
                    row["response"] or "", orjson.dumps(row["tool_calls"]).decode() if row["tool_calls"] else "",
                    "; ".join(r["rule"] for r in row["rules_fired"]),
                    "; ".join(f"{r['rule']}: {r['why']}" for r in row["rules_fired"]),
                    f"{prov['source_file']}:{prov['line_offset']}", *("",) * len(DECISION_COLUMNS))])
        text.flush()
        text.detach()  # the atomic write closes (and renames) the file itself
    q.by_source = dict(sorted(sources.items()))
    q.by_rule = dict(rules.most_common())
    return q


# --- review import ------------------------------------------------------------------------

IMPORT_LOG = f"{QUEUE_DIR}/import.jsonl"
#: what became of a line of a decision file (the first three change nothing wrong)
IMPORTED, UNDECIDED, ALREADY = "imported", "undecided", "already_imported"
#: why a line was refused → what to do about it
PROBLEMS: dict[str, str] = {
    "bad_line": "write the line as the queue's columns (CSV) or a JSON object (JSONL)",
    "missing_id": "keep the review_id column as `refinery review export` wrote it",
    "bad_decision": "write accept, reject or correct (or leave it empty to decide later)",
    "missing_answer": "write the corrected answer in corrected_answer, or choose accept or reject",
    "answer_not_allowed": "a corrected answer goes with decision correct: change the decision or clear it",
    "missing_reviewer": "say who decided in the reviewer column (or pass --reviewer NAME)",
    "bad_time": "write decided_at as ISO 8601 (2026-11-30T14:00:00Z), or leave it empty for now",
    "duplicate": "the file decides this row twice: delete the repeat (the first line was taken)",
    "conflicting": "the file decides this row differently on several lines: keep one of them",
    "unknown_id": "no scored run has this id: run `refinery review export` again and decide on its rows",
    "not_in_review": "only rows awaiting review (needs_human_review) take a decision",
    "too_long": "the reviewed row and the answer are too long for one line of the stream: shorten the corrected "
                "answer, or raise materialize.max_line_bytes in refinery.toml",
    "conflicts_earlier": "this row was already decided otherwise (data/_kb/human_reviews.jsonl): keep that "
                         "one, or edit that line and run run-all again",
}
#: the columns of a decision file that are read (the others are the row, for the reviewer)
_COLUMNS = ("review_id", "decision", "corrected_answer", "reviewer", "note", "decided_at")
_SYNONYMS = {"accepted": decisions.ACCEPT, "rejected": decisions.REJECT, "corrected": decisions.CORRECT}


class DecisionFileError(RefineryError):
    """A decision file that cannot be read at all (not a line of it: those are refused one by one)."""


@dataclass(slots=True)
class Entry:
    """One line of a decision file, and what became of it."""

    line: int
    """where it starts in the file (a CSV cell may hold several lines)"""
    row: int
    """its row as a spreadsheet numbers them (the header is row 1; for JSONL, the line)"""
    review_id: str | None = None
    decision: str | None = None
    corrected_answer: str | None = None
    reviewer: str | None = None
    note: str | None = None
    decided_at: str | None = None
    outcome: str = IMPORTED
    detail: str = ""

    def refuse(self, problem: str, detail: str) -> None:
        self.outcome, self.detail = problem, detail

    @property
    def verdict(self) -> tuple[str | None, str | None]:
        """As decisions.Decision.verdict: what two lines must share to agree."""
        return self.decision, self.corrected_answer

    @property
    def refused(self) -> bool:
        return self.outcome not in (IMPORTED, UNDECIDED, ALREADY)

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "row": self.row, "review_id": self.review_id, "decision": self.decision,
                "outcome": self.outcome, "detail": self.detail or None, "fix": PROBLEMS.get(self.outcome)}


@dataclass
class Imported:
    file: str
    stream: Path
    log: Path
    entries: list[Entry]

    def count(self, outcome: str) -> int:
        return sum(e.outcome == outcome for e in self.entries)

    @property
    def refused(self) -> list[Entry]:
        return [e for e in self.entries if e.refused]

    def by_decision(self) -> dict[str, int]:
        c = Counter(e.decision for e in self.entries if e.outcome == IMPORTED)
        return {d: c[d] for d in decisions.DECISIONS if c[d]}

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "stream": str(self.stream), "log": str(self.log), "lines": len(self.entries),
                "imported": self.count(IMPORTED), "by_decision": self.by_decision(),
                "undecided": self.count(UNDECIDED), "already_imported": self.count(ALREADY),
                "refused": [e.to_json() for e in self.refused]}


def _rows(path: Path) -> Iterator[tuple[int, int, dict[str, Any] | None, str]]:
    """(1-based line, row, the row's fields or None, why not) for each row of a CSV or JSONL
    decision file, read as a stream (a queue at 10^6 rows is hundreds of MB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            f.seek(0)
            if path.suffix.lower() in (".jsonl", ".ndjson", ".json") or (path.suffix.lower() != ".csv"
                                                                         and head[:1] == b"{"):
                yield from _jsonl_rows(f)
            else:
                yield from _csv_rows(path, io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
    except OSError as e:
        raise DecisionFileError(f"{path}: cannot read it ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise DecisionFileError(f"{path}: not UTF-8 text ({e.reason}): save it as UTF-8") from e


def _jsonl_rows(f: Any) -> Iterator[tuple[int, int, dict[str, Any] | None, str]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield n, n, None, f"not JSON ({e})"
            continue
        yield (n, n, row, "") if isinstance(row, dict) else (n, n, None, "not a JSON object")


def _csv_rows(path: Path, text: io.TextIOWrapper) -> Iterator[tuple[int, int, dict[str, Any] | None, str]]:
    # a cell may be long (a corrected answer); the limit is process-wide, and set per read (sources.py)
    csv.field_size_limit(1 << 30)
    reader = csv.reader(text, strict=True)  # a quote left open must not swallow the rows after it
    try:
        yield from _csv_records(path, reader)
    except csv.Error as e:
        raise DecisionFileError(f"{path}:{reader.line_num}: {e} — a cell's quotes do not match (a quote opened "
                                "and not closed?); fix that cell and import again; nothing was imported") from e


def _csv_records(path: Path, reader: Any) -> Iterator[tuple[int, int, dict[str, Any] | None, str]]:
    header = next(reader, None)
    if not header or "review_id" not in header or "decision" not in header:
        hint = ""
        if header and len(header) == 1 and "review_id" in header[0] and ";" in header[0]:
            hint = " (its cells are separated by ';': save it as comma-separated CSV, UTF-8)"
        elif path.suffix.lower() in (".xlsx", ".xls", ".ods"):
            hint = " (a spreadsheet workbook: save it as CSV, UTF-8)"
        raise DecisionFileError(f"{path}: no review_id and decision columns in its first line{hint}: fill in the "
                                "queue.csv that `refinery review export` writes (or JSONL rows with those keys)")
    keep = [i for i, name in enumerate(header) if name in _COLUMNS]  # not the row's text: only what is decided
    start = reader.line_num + 1
    for row, cells in enumerate(reader, 2):
        n, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield n, row, None, f"{len(cells)} cells where the header has {len(header)}"
            continue
        yield n, row, {header[i]: cells[i] for i in keep}, ""


def _cell_text(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    v = v if isinstance(v, str) else orjson.dumps(v).decode()
    return v if v.strip() else None


def _entries(path: Path, reviewer: str | None, now: str) -> list[Entry]:
    entries = []
    for n, at, row, why in _rows(path):
        e = Entry(n, at)
        entries.append(e)
        if row is None:
            e.refuse("bad_line", why)
            continue
        e.review_id = (_cell_text(row, "review_id") or "").strip() or None
        raw = (_cell_text(row, "decision") or "").strip().lower()
        e.decision = _SYNONYMS.get(raw, raw) or None
        e.corrected_answer = _cell_text(row, "corrected_answer")
        e.reviewer = (_cell_text(row, "reviewer") or "").strip() or reviewer
        e.note = _cell_text(row, "note")
        if e.review_id is None:
            e.refuse("missing_id", "no review_id")
        elif e.decision is None:
            e.outcome = UNDECIDED
        elif e.decision not in decisions.DECISIONS:
            e.refuse("bad_decision", f"decision {raw!r} is not accept, reject or correct")
        elif e.decision == decisions.CORRECT and e.corrected_answer is None:
            e.refuse("missing_answer", "decision correct with no corrected_answer")
        elif e.decision != decisions.CORRECT and e.corrected_answer is not None:
            e.refuse("answer_not_allowed", f"a corrected_answer with decision {e.decision}")
        elif e.reviewer is None:
            e.refuse("missing_reviewer", "no reviewer")
        else:
            try:
                when = _cell_text(row, "decided_at")
                e.decided_at = parse_timestamp(when, "decided_at") if when else now
            except RowError as err:
                e.refuse("bad_time", err.detail)
    return entries


def _same_file(entries: list[Entry]) -> None:
    """A row decided twice in one file: the same way, the repeats are refused (duplicate);
    differently, every one of them is (conflicting) — there is no telling which was meant."""
    by_id: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.outcome == IMPORTED:
            by_id[e.review_id].append(e)
    for group in by_id.values():
        if len({e.verdict for e in group}) > 1:
            lines = ", ".join(f"{e.decision} on line {e.line}" for e in group)
            for e in group:
                e.refuse("conflicting", f"decided {lines}")
        else:
            for e in group[1:]:
                e.refuse("duplicate", f"also decided on line {group[0].line}")


#: a scored run's id, near the start of its line (read before the line is parsed)
_SCORED_ID = re.compile(rb'"id":"(ev-[0-9a-f]+)"')


def _resolve(ws: Workspace, wanted: set[str]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(evidence record, scored run) of each wanted id, from the scored runs on disk. Only the
    wanted lines are parsed: a decision file names a few rows of a run of millions."""
    from refinery.score import StaleInputError, read_manifest

    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for entry in read_manifest(ws)["files"]:
        with open(ws.out / entry["scored"], "rb") as scored, open(ws.out / entry["evidence"], "rb") as evidence:
            at, ev_line = -1, b""
            for line in scored:
                m = _SCORED_ID.search(line, 0, 200)
                if m is None or m[1].decode() not in wanted:
                    continue
                sr = orjson.loads(line)
                target = sr["provenance"]["line_offset"]
                while at < target and (ev_line := evidence.readline()):
                    at += 1
                ev = orjson.loads(ev_line) if at == target and ev_line else None
                if ev is None or ev.get("id") != sr["id"]:
                    raise StaleInputError(f"{entry['scored']} does not match {entry['evidence']}:{target}; "
                                          "run `refinery score` again")
                found[sr["id"]] = (ev, sr)
    return found


def _stream_line(e: Entry, ev: dict[str, Any], digest: str, sr: dict[str, Any], file: str) -> bytes:
    return dumps_line({
        "review_id": e.review_id, "decision": e.decision, "corrected_answer": e.corrected_answer,
        "reviewer": e.reviewer, "note": e.note, "decided_at": e.decided_at,
        "answer_sha256": digest, "reviewed": sr["provenance"],
        "task_id": ev["task_id"], "task_name": ev["task_name"], "prompt": ev["prompt"], "messages": ev["messages"],
        "response": ev["response"], "tool_calls": ev["tool_calls"],
        "imported_from": {"file": file, "line": e.line},
    })


def import_decisions(ws: Workspace, cfg: Config, path: Path, *, reviewer: str | None = None,
                     decided_at: str | None = None) -> Imported:
    """Append the decisions in `path` (a filled-in queue.csv, or JSONL rows with its columns) to
    data/_kb/human_reviews.jsonl, each with what was reviewed. A line that cannot be taken is
    refused with its problem (PROBLEMS) and changes nothing; the others are imported. Every
    line's outcome is written to reports/review/import.jsonl. `decided_at`: the time of the
    decisions without one of their own (default: now)."""
    try:
        now = parse_timestamp(decided_at, "decided_at") if decided_at else now_utc()
    except RowError as e:
        raise DecisionFileError(f"{e.detail}: write it as ISO 8601, e.g. 2026-11-30T14:00:00Z") from e
    resolved = path.resolve()
    file = ws.rel(resolved) if resolved.is_relative_to(ws.root) else str(resolved)
    entries = _entries(path, reviewer, now)
    _same_file(entries)
    stream, log = ws.kb / decisions.STREAM, ws.root / IMPORT_LOG
    with ws.lock():
        earlier = decisions.load(ws, cfg).by_id
        taken = [e for e in entries if e.outcome == IMPORTED]
        found = _resolve(ws, {e.review_id for e in taken}) if taken else {}
        lines = []
        for e in taken:
            if e.review_id not in found:
                e.refuse("unknown_id", f"no scored run {e.review_id}")
                continue
            ev, sr = found[e.review_id]
            digest = decisions.answer_sha256(ev)
            before = [d for d in earlier.get(e.review_id, ()) if d.answer_sha256 == digest]
            if before:
                if any(d.verdict != e.verdict for d in before):
                    e.refuse("conflicts_earlier", f"already decided {before[0].decision} by {before[0].reviewer} "
                                                  f"at {before[0].decided_at}")
                else:
                    e.outcome = ALREADY
                continue
            if sr["category"] != CATEGORY:
                e.refuse("not_in_review", f"it is {sr['category']} ({', '.join(sr['rules_fired']) or 'no rule'})")
                continue
            line = _stream_line(e, ev, digest, sr, file)
            if len(line) > cfg.materialize.max_line_bytes:
                e.refuse("too_long", f"its line in the stream would be {len(line):,} bytes, over "
                                     f"materialize.max_line_bytes ({cfg.materialize.max_line_bytes:,})")
                continue
            lines.append(line)
        if lines:
            old = stream.read_bytes() if stream.exists() else b""
            with atomic_write(stream) as f:
                f.write(old + (b"\n" if old and not old.endswith(b"\n") else b"") + b"".join(lines))
        with atomic_write(log) as f:
            for e in entries:
                f.write(dumps_line({"file": file, **e.to_json()}))
    return Imported(file, stream, log, entries)
