"""The invariants that make a workspace's outputs training-safe, checked on what is on disk.

Each invariant is a numbered, named function of a `Context` (the workspace, its config and the
receipts of the run whose outputs are published) that returns the problems it found — an empty
list when it holds. The acceptance gate checks all of them on its fixture (plus fixture-specific ones, see
refinery.acceptance); `audit-full` checks them on the real workspace (see refinery.audit).
A check that crashes is reported as failed with the error; it never stops the others.

They read the files themselves, line by line: nothing here trusts a count kept in memory by
the stage that wrote the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery import receipts as rc
from refinery.canonical import sig_hash
from refinery.config import Config
from refinery.export import NEAR_DETAIL
from refinery.jsonl import DEFAULT_MAX_LINE_BYTES, Line, LineCursor, read_jsonl
from refinery.normalize import answer_text, normalize_text
from refinery import exporters, workspace
from refinery.workspace import Workspace

EXPORTERS = {f"export-{x.name}": x for x in exporters.EXPORTERS}
EXPORT_FILES = {stage: x.path for stage, x in EXPORTERS.items()}
#: The trees whose every file a receipt must account for.
RECORDED_TREES = workspace.PUBLISHED
MAX_PROBLEMS = 20  # per check: enough to act on, not a flood
SCHEMA_CROSS_CHECK_ROWS = 200  # rows per schema (and each file's first) also run through the JSON Schema validator


@dataclass
class Check:
    number: int
    key: str
    title: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    required: bool = True
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "key": self.key, "title": self.title, "ok": self.ok,
                "problems": self.problems, "required": self.required, "seconds": self.seconds}


class Context:
    """What the checks read: the workspace, its config and the run whose outputs are published —
    the one reports/distillation/published.json names (a later run that was killed or failed
    published nothing). `why` says how that run was chosen; `run_problem`, what makes the choice
    unsafe (refinery.runs.published_run)."""

    def __init__(self, ws: Workspace, cfg: Config, config_path: Path | None = None):
        from refinery.runs import DRIFT, list_runs, published_run

        self.ws, self.cfg, self.config_path = ws, cfg, config_path
        # outputs can hold a row as long as the longest source line materialize accepts, and more
        self.max_line_bytes = max(DEFAULT_MAX_LINE_BYTES, 4 * cfg.materialize.max_line_bytes)
        runs = list_runs(ws)
        self.newest: dict[str, Any] | None = runs[-1] if runs else None
        audited = published_run(ws, runs)
        self.summary: dict[str, Any] | None = audited.summary
        self.why, self.run_problem = audited.why, audited.problem
        self.receipts: dict[str, dict[str, Any]] = {}
        self.drift: dict[str, Any] | None = None
        self.unreadable: str | None = None
        if self.summary and self.summary["status"] != "unreadable":
            run_dir = ws.reports / self.summary["run_id"]
            try:
                self.receipts = rc.read_receipts(run_dir)
                self.drift = rc.read_json(run_dir / DRIFT) if (run_dir / DRIFT).exists() else None
            except rc.ReportUnreadable as e:
                self.unreadable = str(e)

    def path(self, rel: str) -> Path:
        return self.ws.root / rel

    def rows(self, rel: str) -> Iterator[Line]:
        p = self.path(rel)
        return read_jsonl(p, self.max_line_bytes) if p.is_file() else iter(())

    def files(self, tree: str, pattern: str = "*.jsonl") -> list[str]:
        root = self.path(tree)
        return sorted(rel for _, rel in self.ws.rels(p for p in root.rglob(pattern) if p.is_file())) \
            if root.is_dir() else []

    def outputs(self, stage: str) -> list[dict[str, Any]]:
        return self.receipts.get(stage, {}).get("outputs", [])


class Lines:
    """Records of workspace files by (path, offset[, record]): each file is read forward,
    reopened only to go back, so rows that reference their upstream in order cost one pass.
    Source records (data/_kb/) are read as materialize read them, documents and archives
    included (refinery.sources.SourceRecords)."""

    def __init__(self, ws: Workspace, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_document_bytes: int | None = None):
        from refinery.sources import SourceRecords

        self.ws, self.max_line_bytes = ws, max_line_bytes
        self._cursors: dict[str, tuple[int, Line | None, LineCursor]] = {}
        self._sources = SourceRecords(ws.root, max_line_bytes, *([max_document_bytes] if max_document_bytes else []))

    def at(self, rel: str, offset: int, record: str | None = None) -> Line | None:
        if rel.startswith("data/_kb/"):
            return self._sources.at(rel, offset, record)
        last, line, cur = self._cursors.get(rel, (-1, None, None))
        if offset == last:
            return line
        if cur is None or offset < last:
            path = self.ws.root / rel
            if not path.is_file():
                return None
            cur = LineCursor(read_jsonl(path, self.max_line_bytes))
        line = cur.at(offset)
        self._cursors[rel] = (offset, line, cur)
        return line


def line_sig(line: Line) -> str:
    if line.obj is not None:
        try:
            return sig_hash(line.obj)
        except TypeError:  # nested too deep to write: refused by its raw bytes (materialize does the same)
            pass
    return hashlib.sha256(line.raw or b"").hexdigest()


class Problems(list):
    """A list of problems that stops growing at MAX_PROBLEMS, counting the rest."""

    extra = 0

    def add(self, msg: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(msg)
        else:
            self.extra += 1

    def done(self) -> list[str]:
        return [*self, f"... and {self.extra} more"] if self.extra else list(self)


# --- the invariants ------------------------------------------------------------------------


def latest_run_complete(ctx: Context) -> list[str]:
    problems = [ctx.run_problem] if ctx.run_problem else []
    if ctx.summary is None:
        if problems:
            return problems
        if ctx.newest is None:
            return ["no run recorded: run `refinery run-all` first"]
        return [f"no complete run: the newest, {ctx.newest['run_id']}, is {ctx.newest['status']}"]
    if ctx.unreadable:
        return [*problems, ctx.unreadable]
    s = ctx.summary
    missing = [st for st in rc.STAGES if st not in ctx.receipts]
    if missing:
        problems.append(f"run {s['run_id']} has no receipt for {', '.join(missing)}")
    return problems


def receipt_hashes(ctx: Context) -> list[str]:
    """Every receipt, the summary and the drift report hash to what they record, and the summary
    and drift report say what the receipts do (an edit to status, totals or config_hash breaks
    summary_hash; any edit to drift.json breaks drift_hash)."""
    from refinery.runs import check_reports

    problems = rc.check_hashes(ctx.receipts)
    if ctx.summary and ctx.summary["status"] != "unreadable" and not ctx.unreadable:
        problems += check_reports(ctx.ws, ctx.summary, ctx.receipts, ctx.drift)
    return problems


def receipt_chain(ctx: Context) -> list[str]:
    return rc.check_chain(ctx.receipts)


def receipts_match_files(ctx: Context) -> list[str]:
    """Every file a receipt records is on disk with that sha256 and row count: an edited byte
    anywhere in evidence, scored runs, exports or quarantine is caught, and the file named."""
    problems = Problems()
    for p in rc.check_files(ctx.ws, ctx.receipts):
        problems.add(p)
    return problems.done()


def no_unrecorded_outputs(ctx: Context) -> list[str]:
    """No file in data/evidence/, data/scored-runs/ or exports/ that no receipt accounts for (a
    planted or leftover file). exports/formats/ is `refinery convert`'s, not a run's."""
    recorded = {f["path"] for r in ctx.receipts.values() for f in r["outputs"]}
    trees = [t for t in RECORDED_TREES if not t.startswith("exports/")] + ["exports"]
    return [f"{p} is not in any receipt of run {ctx.summary['run_id'] if ctx.summary else '?'}"
            for tree in trees for p in ctx.files(tree, "*")
            if p not in recorded and not p.startswith("exports/formats/")]


def sources_match_receipt(ctx: Context) -> list[str]:
    """Every source file the run read is still there with the sha256 it had: the outputs follow
    from the sources on disk (an edited or appended source line means they do not any more)."""
    m = ctx.receipts.get("materialize")
    if m is None:
        return ["no materialize receipt"]
    digests, problems = rc.Digests(), []
    for i in m["inputs"]:
        p = ctx.path(i["path"])
        if not p.is_file():
            problems.append(f"{i['path']} was read by run {ctx.summary['run_id']} and is gone")
        elif digests.of(p, i["path"])["sha256"] != i["sha256"]:
            problems.append(f"{i['path']} changed since run {ctx.summary['run_id']} read it: run `refinery run-all`")
    from refinery.sources import list_sources

    read = {i["path"] for i in m["inputs"]}
    files, _ = list_sources(ctx.ws, ctx.cfg.materialize.ignore)
    problems += [f"{s.ws_rel} is a source the run did not read: run `refinery run-all`"
                 for s in files if s.ws_rel not in read]
    return problems


def _file_rows(ctx: Context, rel: str) -> int:
    return sum(1 for _ in ctx.rows(rel))


def _tally(ctx: Context, rels: list[str], key: str) -> Counter[str]:
    """How many rows of `rels` have each value of field `key` (what the files say, not the receipt)."""
    c: Counter[str] = Counter()
    for rel in rels:
        c.update(str((line.obj or {}).get(key)) for line in ctx.rows(rel))
    return c


def _compare(what: str, on_disk: Counter[str], recorded: dict[str, int]) -> list[str]:
    return [f"{what} {k}: {on_disk.get(k, 0)} on disk, {recorded.get(k, 0)} in the receipt"
            for k in sorted(on_disk.keys() | recorded.keys()) if on_disk.get(k, 0) != recorded.get(k, 0)]


def accounting_materialize(ctx: Context) -> list[str]:
    r = ctx.receipts.get("materialize")
    if r is None:
        return ["no materialize receipt"]
    c, problems = r["counts"], []
    joined, split = c.get("joined", 0), c.get("split", 0)
    if c["rows_in"] != c["rows_out"] - split + joined + c["quarantined"]:
        problems.append(f"materialize: {c['rows_in']} records in != {c['rows_out']} evidence (of which {split} "
                        f"extra parts) + {joined} joined + {c['quarantined']} quarantined")
    if (n := sum(i["rows"] for i in r["inputs"])) != c["rows_in"] and not c.get("unreadable_files"):
        problems.append(f"materialize: the source files hold {n} rows, the receipt counts {c['rows_in']} in")
    evidence = sum(_file_rows(ctx, f) for f in ctx.files("data/evidence"))
    if evidence != c["rows_out"]:
        problems.append(f"data/evidence/ holds {evidence} rows, materialize wrote {c['rows_out']}")
    reasons = _tally(ctx, [workspace.quarantine_file("materialize")], "reason")
    unreadable = reasons.pop("unreadable_file", 0)
    if sum(reasons.values()) != c["quarantined"] or unreadable != c.get("unreadable_files", 0):
        problems.append(f"{workspace.quarantine_file('materialize')} holds {sum(reasons.values()) + unreadable} rows, "
                        f"materialize quarantined {c['quarantined']}")
    problems += _compare("materialize quarantine reason", reasons, r["by_reason"])
    return problems


def accounting_score(ctx: Context) -> list[str]:
    s, m = ctx.receipts.get("score"), ctx.receipts.get("materialize")
    if s is None or m is None:
        return ["no score or materialize receipt"]
    c, problems = s["counts"], []
    if c["rows_in"] != m["counts"]["rows_out"]:
        problems.append(f"score read {c['rows_in']} rows, materialize wrote {m['counts']['rows_out']}")
    if c["rows_in"] != c["rows_out"] + c["quarantined"]:
        problems.append(f"score: {c['rows_in']} in != {c['rows_out']} scored + {c['quarantined']} quarantined")
    categories = _tally(ctx, ctx.files("data/scored-runs"), "category")
    if sum(categories.values()) != c["rows_out"]:
        problems.append(f"data/scored-runs/ holds {sum(categories.values())} rows, score wrote {c['rows_out']}")
    problems += _compare("scored runs in category", categories, {k: v for k, v in s["by_category"].items() if v})
    problems += _compare("score quarantine reason", _tally(ctx, [workspace.quarantine_file("score")], "reason"),
                         s["by_reason"])
    return problems


def _export_refusals(ctx: Context) -> dict[str, Counter[str]]:
    """Each export stage's refusals by reason, as the files hold them: its own file's records,
    and each record of the shared file that names the export (one record, several exports)."""
    out = {stage: _tally(ctx, [workspace.quarantine_file(stage)], "reason") for stage in EXPORT_FILES}
    for line in ctx.rows(workspace.EXPORT_QUARANTINE):
        obj = line.obj or {}
        for e in obj.get("exports") or []:
            if (stage := f"export-{e}") in out:
                out[stage][str(obj.get("reason"))] += 1
    return out


def accounting_exports(ctx: Context) -> list[str]:
    s = ctx.receipts.get("score")
    problems = []
    refusals = _export_refusals(ctx)
    for stage, path in EXPORT_FILES.items():
        r = ctx.receipts.get(stage)
        if r is None or s is None:
            problems.append(f"no {stage} or score receipt")
            continue
        c = r["counts"]
        if c["rows_in"] != s["counts"]["rows_out"]:
            problems.append(f"{stage} was offered {c['rows_in']} rows, score wrote {s['counts']['rows_out']}")
        if c["rows_in"] != c["rows_out"] + c["quarantined"]:
            problems.append(f"{stage}: {c['rows_in']} in != {c['rows_out']} out + {c['quarantined']} quarantined")
        if (n := _file_rows(ctx, path)) != c["written"]:
            problems.append(f"{path} holds {n} rows, {stage} wrote {c['written']}")
        reasons = refusals[stage]
        if sum(reasons.values()) != c["quarantined"]:
            problems.append(f"{workspace.quarantine_file(stage)} and {workspace.EXPORT_QUARANTINE} hold "
                            f"{sum(reasons.values())} refusals by {stage}, it quarantined {c['quarantined']}")
        problems += _compare(f"{stage} quarantine reason", reasons, r["by_reason"])
        if field := EXPORTERS[stage].category_field:
            problems += _compare(f"{stage} rows in category", _tally(ctx, [path], field), r["by_category"])
    return problems


def nothing_lost(ctx: Context) -> list[str]:
    """Every record of every source file is in the evidence (once, or once per part), joined
    into evidence, or in materialize's quarantine — exactly one of these (by its source file
    and offset)."""
    m = ctx.receipts.get("materialize")
    if m is None:
        return ["no materialize receipt"]
    # one byte per source record: how it is accounted for; a record split in parts (the chosen
    # and rejected answers of a pair) keeps one bit per part, other part names a set
    seen: dict[str, bytearray] = {}
    other_parts: dict[tuple[str, int], set[str]] = {}
    digests = rc.Digests()
    for i in m["inputs"]:
        p = ctx.path(i["path"])
        lines = digests.of(p, i["path"])["rows"] if p.is_file() else 0
        seen[i["path"]] = bytearray(max(lines, i["rows"]) + 1)
    whole_file: set[str] = set()
    problems = Problems()
    PRIMARY, QUARANTINED, JOINED, PARTS = 1, 2, 3, 16
    PART_BITS = {"chosen": 1, "rejected": 2}
    name = {PRIMARY: "evidence", QUARANTINED: "quarantine", JOINED: "joined into evidence"}

    def add_part(src: str, off: int, part: str) -> bool:
        """Record one more part of a split record; False if it was there already."""
        if part in PART_BITS:
            bit = PART_BITS[part]
            if seen[src][off] & bit:
                return False
            seen[src][off] |= bit
            return True
        known = other_parts.setdefault((src, off), set())
        if part in known:
            return False
        known.add(part)
        return True

    def mark(prov: dict[str, Any], where: str, how: int) -> None:
        src, off, part = prov["source_file"], prov["line_offset"], prov.get("part")
        if src not in seen:
            problems.add(f"{where}: points at {src}, which is not an input of the run")
        elif off is None:
            whole_file.add(src)
        elif off >= len(seen[src]) and off > 64 * len(seen[src]) + 4096:
            problems.add(f"{where}: {src} has no record {off}")  # far past any line the file can have
        elif off >= len(seen[src]) or seen[src][off] == 0:
            if off >= len(seen[src]):  # a CSV record spans lines; a gzip's lines are not its bytes' lines
                seen[src].extend(bytes(off + 1 - len(seen[src])))
            if how == PRIMARY and part is not None:
                seen[src][off] = PARTS
                add_part(src, off, part)
            else:
                seen[src][off] = how
        elif how == JOINED and seen[src][off] == JOINED:
            pass  # a record may be joined into several evidence records (a trace into its calls)
        elif how == PRIMARY and seen[src][off] & PARTS and part is not None and add_part(src, off, part):
            pass  # another part of a split record
        else:
            was = seen[src][off]
            problems.add(f"{where}: {src}:{off} is accounted for twice "
                         f"({name[PRIMARY] if was & PARTS else name[was]} and {name[how]})")

    for rel in ctx.files("data/evidence"):
        for line in ctx.rows(rel):
            if line.obj is None:
                problems.add(f"{rel}:{line.offset}: unreadable ({line.reason})")
                continue
            prov = line.obj["provenance"]
            mark(prov, f"{rel}:{line.offset}", PRIMARY)
            for ref in prov.get("joined") or ():
                mark(ref, f"{rel}:{line.offset} (joined)", JOINED)
    rel = workspace.quarantine_file("materialize")
    for line in ctx.rows(rel):
        if line.obj is None:
            problems.add(f"{rel}:{line.offset}: unreadable ({line.reason})")
        else:
            mark(line.obj["provenance"], f"{rel}:{line.offset}", QUARANTINED)
    for i in m["inputs"]:
        n = sum(1 for b in seen[i["path"]] if b)
        if i["path"] not in whole_file and n != i["rows"]:
            problems.add(f"{i['path']}: {i['rows']} records read, {n} found in evidence, joined or quarantine")
    return problems.done()


def _check_provenance(ctx: Context, rel: str, lines: Lines, problems: Problems,
                      provs: Callable[[dict[str, Any]], list[dict[str, Any]]], expect_id: bool) -> int:
    """Check the provenances of every row of `rel`. References are checked as they come while
    they move forward through their file; one that goes back (a joined record, evidence that
    a join wrote in key order) is kept and checked at the end, in file order — so each file
    is read once, and only out-of-order references are held in memory."""
    n = 0
    last: dict[str, int] = {}
    later: list[tuple[str, int, str, dict[str, Any], dict[str, Any]]] = []

    def check(prov: dict[str, Any], row: dict[str, Any], where: str) -> None:
        up = lines.at(prov["source_file"], prov["line_offset"], prov.get("record"))
        if up is None:
            problems.add(f"{where}: no such record")
        elif line_sig(up) != prov["sig_hash"]:
            problems.add(f"{where}: sig_hash differs (the record changed after this row was written)")
        elif expect_id and (up.obj or {}).get("id") != "ev-" + row["id"].split("-", 1)[1]:
            problems.add(f"{where}: the line there is {(up.obj or {}).get('id')}, not this row's")

    for line in ctx.rows(rel):
        if line.obj is None:
            problems.add(f"{rel}:{line.offset}: unreadable ({line.reason})")
            continue
        for prov in provs(line.obj):
            n += 1
            src, off = prov["source_file"], prov["line_offset"]
            where = f"{rel}:{line.offset} → {src}:{off}" + (f" {prov['record']}" if prov.get("record") else "")
            if off < last.get(src, -1):
                later.append((src, off, where, prov, line.obj if expect_id else {}))
                continue
            last[src] = off
            check(prov, line.obj, where)
    later.sort(key=lambda t: (t[0], t[1]))
    for _, _, where, prov, row in later:
        check(prov, row, where)
    return n


def evidence_provenance(ctx: Context) -> list[str]:
    """Every evidence row's provenance names its source record — and every record joined into
    it —, whose hash recomputes."""
    problems, lines = Problems(), Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    for rel in ctx.files("data/evidence"):
        _check_provenance(ctx, rel, lines, problems,
                          lambda o: [o["provenance"], *(o["provenance"].get("joined") or ())], expect_id=False)
    return problems.done()


def scored_provenance(ctx: Context) -> list[str]:
    """Every scored run points at its evidence line (same id), whose hash recomputes."""
    problems, lines = Problems(), Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    for rel in ctx.files("data/scored-runs"):
        _check_provenance(ctx, rel, lines, problems, lambda o: [o["provenance"]], expect_id=True)
    return problems.done()


def export_provenance(ctx: Context) -> list[str]:
    """Every export row (both answers of a pair) points at its scored run, whose hash recomputes."""
    problems, lines = Problems(), Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    for x in EXPORTERS.values():
        if not x.pairs:  # a pair's two sides are checked below
            _check_provenance(ctx, x.path, lines, problems, lambda o: [o["provenance"]], expect_id=True)
    sides = _pair_sides(ctx)
    for i, p in _pairs(ctx):
        for side in ("chosen", "rejected"):
            prov = p.get("provenance" if side == "chosen" else "rejected_provenance") or {}
            where = f"{EXPORT_FILES['export-preference']}:{i} ({side}) → " \
                    f"{prov.get('source_file')}:{prov.get('line_offset')}"
            state = sides.state_of(i, side)
            if state == _MISSING:
                problems.add(f"{where}: no such line")
            elif state == _SIG_DIFFERS:
                problems.add(f"{where}: sig_hash differs (the line changed after this row was written)")
    return problems.done()


_MISSING, _SIG_DIFFERS, _FOUND = 0, 1, 2


class _PairSides:
    """What the scored run behind each side of each preference pair says — whether the line is
    there, whether its hash is the one the pair recorded, its category, score and task — in
    flat arrays indexed by (pair line, side): at 10^6 rows a dict of the scored runs themselves
    held most of the audit's memory."""

    def __init__(self, ctx: Context):
        from array import array

        refs: list[tuple[int, int, int]] = []  # (file, line, slot), sorted to read each file forward
        files: dict[str, int] = {}
        records: dict[int, str] = {}
        # what the pair recorded as the line's sig_hash, 32 bytes a slot; a slot whose recorded
        # value is not 64 hex digits stays unset, and its line cannot match
        expected, recorded = bytearray(), bytearray()
        n = 0
        for i, p in _pairs(ctx):
            n = i + 1
            recorded.extend(bytes(2 * n - len(recorded)))  # unreadable pair lines leave their slots unset
            expected.extend(bytes(64 * n - len(expected)))
            for s, key in enumerate(("provenance", "rejected_provenance")):
                prov, slot = p.get(key) or {}, 2 * i + s
                if isinstance(prov.get("source_file"), str) and isinstance(prov.get("line_offset"), int):
                    refs.append((files.setdefault(prov["source_file"], len(files)), prov["line_offset"], slot))
                    if prov.get("record") is not None:
                        records[slot] = prov["record"]
                sig = prov.get("sig_hash")
                if isinstance(sig, str) and len(sig) == 64:
                    try:
                        expected[slot * 32:(slot + 1) * 32] = bytes.fromhex(sig)
                        recorded[slot] = 1
                    except ValueError:
                        pass
        self.state = bytearray(2 * n)  # _MISSING unless found
        self.category = array("H", bytes(4 * n))  # index into self.categories; 0: none
        self.categories: list[Any] = [None]
        self.score = array("d", bytes(16 * n))
        self.odd_score: dict[int, Any] = {}  # a score that is missing (None) or not a number
        self.task = array("Q", bytes(16 * n))  # see _task_code
        names = sorted(files, key=files.get)
        lines = Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
        refs.sort()
        for f, offset, slot in refs:
            up = lines.at(names[f], offset, records.get(slot))
            if up is None:
                continue
            same = recorded[slot] and bytes.fromhex(line_sig(up)) == expected[slot * 32:(slot + 1) * 32]
            self.state[slot] = _FOUND if same else _SIG_DIFFERS
            row = up.obj if isinstance(up.obj, dict) else {}
            if (cat := row.get("category")) not in self.categories:
                self.categories.append(cat)
            self.category[slot] = self.categories.index(cat)
            score = row.get("score")
            if isinstance(score, int | float) and not isinstance(score, bool):
                self.score[slot] = score
            else:
                self.odd_score[slot] = score
            self.task[slot] = _task_code(row["task_key"]) if "task_key" in row else 0

    def state_of(self, i: int, side: str) -> int:
        return self.state[2 * i + (side == "rejected")]

    def scored(self, i: int, side: str) -> tuple[Any, Any, int] | None:
        """(category, score, task code) of the scored run, or None when there is none; the
        score as a float, or as found when it is missing (None) or not a number."""
        slot = 2 * i + (side == "rejected")
        if self.state[slot] == _MISSING:
            return None
        score = self.odd_score[slot] if slot in self.odd_score else self.score[slot]
        return self.categories[self.category[slot]], score, self.task[slot]


def _task_code(task_key: Any) -> int:
    """A task_key as 8 bytes of the sha256 of its JSON (so 1 and "1" differ); never 0, which
    stands for a scored run without one."""
    return int.from_bytes(hashlib.sha256(orjson.dumps(task_key)).digest()[:8], "little") or 1


def _pair_sides(ctx: Context) -> _PairSides:
    """Built once per audit, for export_provenance and preference_chosen_outranks."""
    if getattr(ctx, "_pair_sides", None) is None:
        ctx._pair_sides = _PairSides(ctx)
    return ctx._pair_sides


def _scored(ctx: Context, lines: Lines, prov: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(prov, dict) or not isinstance(prov.get("source_file"), str) \
            or not isinstance(prov.get("line_offset"), int):
        return {}
    up = lines.at(prov["source_file"], prov["line_offset"], prov.get("record"))
    return up.obj if up is not None and up.obj is not None else {}


def sft_never_rejected_or_review(ctx: Context) -> list[str]:
    """No SFT row is (or points at a scored run that is) rejected or needs_human_review."""
    problems, lines = Problems(), Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    rel = EXPORT_FILES["export-sft"]
    for line in ctx.rows(rel):
        row = line.obj or {}
        cat = _scored(ctx, lines, row.get("provenance", {})).get("category") if row else None
        if row.get("quality_score") in ("rejected", "needs_human_review") or cat in ("rejected", "needs_human_review"):
            problems.add(f"{rel}:{line.offset} ({row.get('id')}): its scored run is {cat}")
        elif cat != row.get("quality_score"):
            problems.add(f"{rel}:{line.offset} ({row.get('id')}): quality_score {row.get('quality_score')} but "
                         f"its scored run is {cat}")
    return problems.done()


def rag_categories(ctx: Context) -> list[str]:
    problems, lines = Problems(), Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    allowed = set(ctx.cfg.export.rag_categories)
    rel = EXPORT_FILES["export-rag"]
    for line in ctx.rows(rel):
        row = line.obj or {}
        cat = _scored(ctx, lines, row.get("provenance", {})).get("category")
        if cat not in allowed or row.get("category") != cat:
            problems.add(f"{rel}:{line.offset} ({row.get('id')}): category {row.get('category')}, scored {cat}; "
                         f"RAG takes {sorted(allowed)}")
    return problems.done()


def _pairs(ctx: Context) -> Iterator[tuple[int, dict[str, Any]]]:
    for line in ctx.rows(EXPORT_FILES["export-preference"]):
        if line.obj is not None:
            yield line.offset, line.obj


def preference_no_self_pairs(ctx: Context) -> list[str]:
    return [f"pair {p['id']} (line {i}): chosen and rejected are the same row"
            for i, p in _pairs(ctx)
            if p["chosen_id"] == p["rejected_id"]
            or (p["provenance"]["source_file"], p["provenance"]["line_offset"])
            == (p["rejected_provenance"]["source_file"], p["rejected_provenance"]["line_offset"])]


def preference_no_identical_texts(ctx: Context) -> list[str]:
    return [f"pair {p['id']} (line {i}): chosen and rejected say the same thing"
            for i, p in _pairs(ctx) if normalize_text(p["chosen"]) == normalize_text(p["rejected"])]


def preference_chosen_outranks(ctx: Context) -> list[str]:
    """Chosen is accepted or partially accepted, rejected is rejected, the chosen score is
    strictly higher, and both answer the same task — as their scored runs say."""
    problems = Problems()
    sides = _pair_sides(ctx)
    for i, p in _pairs(ctx):
        c, r = sides.scored(i, "chosen"), sides.scored(i, "rejected")
        c_cat, r_cat = c[0] if c else None, r[0] if r else None
        if c_cat not in ("accepted", "partially_accepted") or r_cat != "rejected":
            problems.add(f"pair {p['id']} (line {i}): chosen is {c_cat}, rejected is {r_cat}")
        elif any(type(x) is not float for x in (c[1], r[1])):
            problems.add(f"pair {p['id']} (line {i}): a scored run's score is not a number ({c[1]!r}, {r[1]!r})")
        elif not c[1] > r[1] or not p["chosen_score"] > p["rejected_score"]:
            problems.add(f"pair {p['id']} (line {i}): chosen score {c[1]} is not above {r[1]}")
        elif not c[2] == r[2] == _task_code(p["task_key"]):
            problems.add(f"pair {p['id']} (line {i}): chosen and rejected answer different tasks")
    return problems.done()


def preference_pair_limit(ctx: Context) -> list[str]:
    limit = ctx.cfg.export.max_pairs_per_task
    per_task = Counter(p["task_key"] for _, p in _pairs(ctx))
    return [f"task {k}: {n} pairs, more than export.max_pairs_per_task = {limit}"
            for k, n in sorted(per_task.items()) if n > limit]


def no_duplicate_answers(ctx: Context) -> list[str]:
    """RAG and SFT hold each (task, answer) once (when export.dedup is on)."""
    if not ctx.cfg.export.dedup:
        return []
    from refinery.normalize import answer_text

    problems = Problems()
    for stage in (stage for stage, x in EXPORTERS.items() if x.dedup):
        seen: dict[bytes, int] = {}
        lines = Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
        for line in ctx.rows(EXPORT_FILES[stage]):
            row = line.obj or {}
            task = row.get("task_key") or _scored(ctx, lines, row.get("provenance") or {}).get("task_key")
            answer = normalize_text(answer_text(row))  # the key export's dedup used
            key = hashlib.sha256(f"{task}\x1f{answer}".encode()).digest()[:16]
            if key in seen:
                problems.add(f"{EXPORT_FILES[stage]}:{line.offset} repeats the answer of line {seen[key]} "
                             "for the same task")
            seen.setdefault(key, line.offset)
    return problems.done()


def near_duplicates_named(ctx: Context) -> list[str]:
    """Each row RAG or SFT refused as a near-duplicate names a row the export kept, and is near
    it: the similarity recomputed from the two rows' texts is at or over the threshold. The
    refusals' signatures wait in a file (templated traces refuse hundreds of thousands), each
    kept row is signed once."""
    if not (ctx.cfg.export.dedup and ctx.cfg.export.near_duplicates):
        return []
    import tempfile
    from array import array

    import numpy as np

    from refinery.export import _redact_evidence
    from refinery.neardup import RECORD, Signer

    problems = Problems()
    lines = Lines(ctx.ws, ctx.max_line_bytes, ctx.cfg.materialize.max_document_bytes)
    signer, threshold = Signer(), ctx.cfg.export.near_duplicate_threshold
    for stage, x in EXPORTERS.items():
        if not x.dedup:
            continue
        qrel, rel = workspace.quarantine_file(stage), EXPORT_FILES[stage]
        names = re.compile(rf"near-duplicate of ({x.id_prefix}-[0-9a-f]{{16}})")
        with tempfile.TemporaryFile() as spill:
            # a record per refusal: its line's offset and its signature (neardup.RECORD's layout)
            wanted: dict[str, array[int]] = {}  # a kept row's id → its refusals' records
            refusals = 0
            for line in ctx.rows(qrel):
                rec = line.obj or {}
                if rec.get("reason") != "near_duplicate":
                    continue
                named = names.match(rec.get("detail") or "")
                sr = _scored(ctx, lines, rec.get("provenance") or {})
                ev = _scored(ctx, lines, sr.get("provenance") or {})
                if named is None or not ev or not isinstance(ev.get("prompt"), str):
                    problems.add(f"{qrel}:{line.offset}: a near_duplicate refusal that names no kept row, or whose "
                                 "scored run and evidence do not resolve")
                    continue
                if ctx.cfg.export.sensitive == "redact":  # as the export compared it
                    ev = _redact_evidence(ev, list(ctx.cfg.export.allow_sensitive))[0]
                signed = signer.record(ev["id"], ev["prompt"], answer_text(ev))
                spill.write(line.offset.to_bytes(8, "little") + signed[8:])
                wanted.setdefault(named[1], array("q")).append(refusals)
                refusals += 1
            spill.flush()

            def refusal(k: int) -> tuple[int, Any]:
                rec = np.frombuffer(os.pread(spill.fileno(), RECORD.itemsize, k * RECORD.itemsize), RECORD)[0]
                return int(rec["id"]), rec["sig"]

            for line in ctx.rows(rel):
                row = line.obj or {}
                if (refs := wanted.pop(row.get("id"), None)) is None:
                    continue
                kept_id = "ev-" + row["id"].split("-", 1)[1]
                kept = np.frombuffer(signer.record(kept_id, row.get(x.prompt_field) or "", answer_text(row))[8:], "<u4")
                for k in refs:
                    offset, refused = refusal(k)
                    if (similar := np.count_nonzero(kept == refused) / len(kept)) < threshold:
                        problems.add(f"{qrel}:{offset}: refused as a near-duplicate of {row['id']} "
                                     f"({rel}:{line.offset}), but their estimated similarity is {similar:.3f}, "
                                     f"under {threshold}")
            for kept_id, refs in sorted(wanted.items()):
                problems.add(f"{qrel}:{refusal(refs[0])[0]}: refused as a near-duplicate of {kept_id}, which is not in "
                             f"{rel}")
    return problems.done()


#: Fields refinery writes itself — ids, hashes, provenance, categories —, at the top of a row or
#: in a converted row's `meta`: not scanned (a sha256 is not a key, and cannot carry one).
REFINERY_FIELDS = frozenset({"schema_version", "id", "provenance", "rejected_provenance", "task_key", "chosen_id",
                             "rejected_id", "category", "quality_score", "score", "source", "stage", "reason",
                             "raw_length", "raw_sha256"})


#: The kept row a near-duplicate refusal names is an id refinery made (16 hex digits of a sha256),
#: which one time in ~2,000 is all decimal digits — a card number to the Luhn check, a phone
#: number to the engine (seen at 10^6 rows): masked in the refusal's detail before the scans.
_ROW_MASK = "<row id>"


def scanned_fields(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (field, value) pairs of an output row that came from the traces."""
    out = []
    for k, v in row.items():
        if k in REFINERY_FIELDS:
            continue
        if k == "detail" and row.get("reason") == "near_duplicate" and isinstance(v, str) \
                and (named := NEAR_DETAIL.fullmatch(v)):
            v = v[:named.start("row")] + _ROW_MASK + v[named.end("row"):]
        if k == "meta" and isinstance(v, dict):
            out += [(f"meta.{mk}", mv) for mk, mv in v.items() if mk not in REFINERY_FIELDS]
        else:
            out.append((k, v))
    return out


def no_secrets_in_exports(ctx: Context) -> list[str]:
    """No export row — nor what `convert` made of one, nor a quarantine record — carries an API
    key, token, private key, password, email, phone number, card number, IBAN, SSN or private
    note (kinds in export.allow_sensitive excepted). Two passes read every row: the engine that
    guarded the export, and an independent second pass (refinery.sensitive.check) with its own
    rules, decoders and entropy test; a finding of either fails the check, counted per kind.
    The rows are shared out over worker processes (materialize.workers) by their prompt — one
    share of every file per process, so the RAG, SFT and preference rows of a task, which share
    their texts, are read by the same process and each of its distinct strings scanned once —,
    and the findings come back in file and line order."""
    from refinery.parallel import map_files

    allow = tuple(ctx.cfg.export.allow_sensitive)
    rels = ctx.files("exports")
    size = sum(ctx.path(rel).stat().st_size for rel in rels)
    workers = ctx.cfg.materialize.workers or os.cpu_count() or 1
    shards = workers if size >= SECRETS_PARALLEL_MIN_BYTES else 1
    paths = [str(ctx.path(rel)) for rel in rels]
    together = [i for i, rel in enumerate(rels) if rel in {x.path for x in EXPORTERS.values() if not x.grouped}]
    found = map_files(_secret_share, [(paths, ctx.max_line_bytes, allow, i, shards, together) for i in range(shards)],
                      [size // shards] * shards, workers=workers, parallel_min_bytes=SECRETS_PARALLEL_MIN_BYTES)
    problems = Problems()
    tally: Counter[tuple[str, str]] = Counter()
    for f, rel in enumerate(rels):
        rows = sorted((row for share in found for row in share[f]), key=lambda r: r[0])
        for offset, rid, findings in rows:
            for kind, where, by, rule in findings:
                tally[kind, by] += 1
                problems.add(f"{rel}:{offset} ({rid}): {kind} in {where} (found by the {by}, {rule})")
    if tally:
        kinds = sorted({k for k, _ in tally})
        per_kind = ", ".join(f"{k} {tally[k, 'engine'] + tally[k, 'second pass']} (engine {tally[k, 'engine']}, "
                             f"second pass only {tally[k, 'second pass']})" for k in kinds)
        return [f"findings by kind: {per_kind}", *problems.done()]
    return problems.done()


SECRETS_PARALLEL_MIN_BYTES = 4 << 20  # below this the exports are scanned in-process


RowFindings = tuple[int, Any, list[tuple[str, str, str, str]]]


def _secret_share(paths: list[str], max_line_bytes: int, allow: tuple[str, ...], shard: int, shards: int,
                  together: list[int]) -> list[list[RowFindings]]:
    """(line, id, [(kind, where, by, rule)]) for each row with a finding, per file, of the rows
    whose prompt hashes to `shard` modulo `shards`: one process reads its share of every file, so
    the RAG, SFT and preference rows of a task — which share their texts — meet the same memo of
    scanned strings. The files in `together` (exports written in scored-run order) are read side
    by side in that order, so the rows of one scored run come one after another and the memo
    serves them however large the files (it is cleared when full)."""
    import heapq

    out: list[list[RowFindings]] = [[] for _ in paths]

    def rows(i: int) -> Iterator[tuple[tuple[str, int], int, int, dict[str, Any]]]:
        for line in read_jsonl(paths[i], max_line_bytes):
            row = line.obj if isinstance(line.obj, dict) else {}
            key = row.get("prompt") or row.get("instruction") or row.get("id")
            if shards > 1 and zlib.crc32(str(key).encode()) % shards != shard:
                continue
            prov = row.get("provenance") if isinstance(row.get("provenance"), dict) else {}
            at = (str(prov.get("source_file")), prov["line_offset"] if type(prov.get("line_offset")) is int else -1)
            yield at, i, line.offset, row

    streams = [*[heapq.merge(*(rows(i) for i in together), key=lambda r: r[0])],
               *(rows(i) for i in range(len(paths)) if i not in together)]
    for stream in streams:
        for _, i, offset, row in stream:
            if found := _row_findings(row, allow):
                out[i].append((offset, row.get("id"), found))
    return out


def _row_findings(row: dict[str, Any], allow: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """[(kind, where, by, rule)] of one row: the engine's findings, then the second pass's."""
    from refinery.sensitive import scan
    from refinery.sensitive.check import second_pass

    fields = scanned_fields(row)
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for f in scan(fields, allow):
        found.setdefault((f.kind, f.where), ("engine", f.rule))
    for f in second_pass(fields, allow):
        found.setdefault((f.kind, f.where), ("second pass", f.rule))
    return [(k, w, by, rule) for (k, w), (by, rule) in found.items()]


def export_quarantine_holds_no_text(ctx: Context) -> list[str]:
    """The exports' quarantine records name the row and the reason, never copy its text, not
    even a redacted preview (a refused secret must not reappear in quarantine)."""
    problems = Problems()
    for rel in [*map(workspace.quarantine_file, EXPORT_FILES), workspace.EXPORT_QUARANTINE]:
        for line in ctx.rows(rel):
            obj = line.obj
            if obj is None or any(obj.get(k) is not None for k in ("preview", "raw_length", "raw_sha256")):
                problems.add(f"{rel}:{line.offset}: carries the row's text")
    return problems.done()


def unique_ids(ctx: Context) -> list[str]:
    """Ids are unique within evidence, scored runs, each export and the quarantine. Memory does
    not grow with the outputs: each group's ids go to hash buckets on disk (16-byte digest, file,
    line; UNIQUE_ID_BUCKET_BYTES of output per bucket) and each bucket is checked on its own;
    the first MAX_PROBLEMS repeats in file order are reported, the rest counted."""
    import heapq
    import struct
    import tempfile

    record = struct.Struct("<16sIQ")  # the id's digest, the file's index in its group, the line
    groups = {"evidence": ctx.files("data/evidence"), "scored runs": ctx.files("data/scored-runs"),
              **{stage: [rel] for stage, rel in EXPORT_FILES.items()},
              "quarantine": ctx.files("exports/quarantine")}
    kept: list[tuple[int, int, int, int, int]] = []  # max-heap (negated) of the earliest repeats
    repeats = 0
    for g, rels in enumerate(groups.values()):
        size = sum(ctx.path(rel).stat().st_size for rel in rels if ctx.path(rel).is_file())
        buckets = min(1 + size // UNIQUE_ID_BUCKET_BYTES, UNIQUE_ID_MAX_BUCKETS)  # all open at once
        ctx.ws.reports.mkdir(parents=True, exist_ok=True)  # on the workspace's disk: /tmp may be memory
        with tempfile.TemporaryDirectory(prefix=".audit-ids-", dir=ctx.ws.reports) as tmp:
            spills = [open(Path(tmp) / str(b), "w+b") for b in range(buckets)]
            try:
                for f, rel in enumerate(rels):
                    for line in ctx.rows(rel):
                        key = hashlib.sha256(str((line.obj or {}).get("id")).encode()).digest()[:16]
                        spills[int.from_bytes(key[:4], "little") % buckets].write(record.pack(key, f, line.offset))
                for spill in spills:
                    spill.seek(0)
                    first: dict[bytes, tuple[int, int]] = {}
                    for key, f, offset in record.iter_unpack(spill.read()):
                        if key not in first:  # a bucket is in file order: the first is the earliest
                            first[key] = (f, offset)
                            continue
                        repeats += 1
                        item = (-g, -f, -offset, *first[key])
                        if len(kept) < MAX_PROBLEMS:
                            heapq.heappush(kept, item)
                        elif item[:3] > kept[0][:3]:  # earlier than the latest one kept
                            heapq.heapreplace(kept, item)
            finally:
                for spill in spills:
                    spill.close()
    names, rels_of = list(groups), list(groups.values())
    ids = _ids_at(ctx, {(rels_of[-g][-f], -off) for g, f, off, *_ in kept})
    problems = Problems()
    for g, f, off, f0, o0 in sorted(((-g, -f, -o, f0, o0) for g, f, o, f0, o0 in kept)):
        rel = rels_of[g][f]
        problems.add(f"{names[g]}: id {ids.get((rel, off))} at {rel}:{off} is also at {rels_of[g][f0]}:{o0}")
    problems.extra += repeats - len(kept)
    return problems.done()


UNIQUE_ID_BUCKET_BYTES = 64 << 20  # output bytes per id bucket: ~10^5 rows, a few MiB of dict
UNIQUE_ID_MAX_BUCKETS = 256  # beyond 16 GiB of outputs the buckets grow instead


def _ids_at(ctx: Context, where: set[tuple[str, int]]) -> dict[tuple[str, int], Any]:
    """The ids at a few (file, line) places, each file read once."""
    out = {}
    for rel in sorted({rel for rel, _ in where}):
        lines = {off for r, off in where if r == rel}
        for line in ctx.rows(rel):
            if line.offset in lines:
                out[rel, line.offset] = (line.obj or {}).get("id")
                lines.discard(line.offset)
                if not lines:
                    break
    return out


def schemas_validate(ctx: Context) -> list[str]:
    """Every output row and every report validates against its JSON Schema in schemas/.

    schemas/ is first checked to be exactly what the record models generate; rows are then
    validated with those models in strict mode (no coercion: ~100x faster than a JSON Schema
    validator, which matters at 10^6 rows), and a row the model rejects is reported with the
    JSON Schema's own message. The first row of every file, the first SCHEMA_CROSS_CHECK_ROWS
    rows of each schema and every report also go through the JSON Schema validator itself, as a
    cross-check of the two (per file, it cost ~1.7 ms a row: 35 s over 282 files at 10^5).
    """
    import jsonschema
    from pydantic import ValidationError

    from refinery.models import SCHEMA_MODELS
    from refinery.schemas import load_schema, stale_schemas

    problems = Problems()
    for name in stale_schemas():
        problems.add(f"schemas/{name} is not what the models generate: run `make schemas`")
    validators: dict[str, Any] = {}

    def schema_error(name: str, obj: Any) -> str | None:
        if name not in validators:
            validators[name] = jsonschema.Draft202012Validator(load_schema(name))
        err = next(validators[name].iter_errors(obj), None)
        if err is None:
            return None
        return f"{'/'.join(str(p) for p in err.absolute_path) or '(row)'}: {err.message[:120]}"

    plan = [("evidence_record", ctx.files("data/evidence")), ("scored_run", ctx.files("data/scored-runs")),
            *((x.schema, [x.path]) for x in EXPORTERS.values()),
            ("quarantine_record", ctx.files("exports/quarantine"))]
    for name, rels in plan:
        model = SCHEMA_MODELS[name]
        validate = model.model_validate_json
        budget = SCHEMA_CROSS_CHECK_ROWS
        for rel in rels:
            if not ctx.path(rel).is_file():
                continue  # receipts_match_files names what is missing
            with open(ctx.path(rel), "rb") as f:
                for offset, raw in enumerate(f):
                    try:
                        validate(raw, strict=True)  # strict JSON mode: no coercion, enums as strings
                        err = None
                        if offset == 0 or budget > 0:
                            budget -= 1
                            err = schema_error(name, orjson.loads(raw))
                    except ValidationError as e:
                        try:
                            err = schema_error(name, orjson.loads(raw)) or str(e).splitlines()[2].strip()[:120]
                        except orjson.JSONDecodeError:
                            err = "not JSON"
                    if err:
                        problems.add(f"{rel}:{offset}: {name} schema: {err}")
    if ctx.summary:
        run_dir = ctx.ws.reports / ctx.summary["run_id"]
        docs = [("run_summary", run_dir / "summary.json"), ("drift_report", run_dir / "drift.json"),
                *(("stage_receipt", rc.receipt_path(run_dir, s)) for s in ctx.receipts)]
        for name, p in docs:
            if p.is_file() and (err := schema_error(name, orjson.loads(p.read_bytes()))):
                problems.add(f"{ctx.ws.rel(p)}: {name} schema: {err}")
    return problems.done()


#: The on-disk invariants, in the order they are numbered and reported.
INVARIANTS: list[tuple[str, str, Callable[[Context], list[str]]]] = [
    ("latest_run_complete", "the published run (reports/distillation/published.json) is complete, with a "
     "receipt for every stage", latest_run_complete),
    ("receipt_hashes", "every receipt_hash, the summary's and the drift report's hashes and the overall hash "
     "recompute", receipt_hashes),
    ("receipt_chain", "each stage read exactly what the stage before it wrote", receipt_chain),
    ("receipts_match_files", "every recorded output is on disk with its sha256 and rows", receipts_match_files),
    ("sources_match_receipt", "the sources on disk are the ones the run read (sha256)", sources_match_receipt),
    ("no_unrecorded_outputs", "every file in the output trees is in a receipt", no_unrecorded_outputs),
    ("accounting_materialize", "source rows = evidence + quarantined", accounting_materialize),
    ("accounting_score", "evidence rows = scored + quarantined", accounting_score),
    ("accounting_exports", "scored rows = written + quarantined, for each export", accounting_exports),
    ("nothing_lost", "every source line is in evidence or quarantine exactly once", nothing_lost),
    ("evidence_provenance", "every evidence row resolves to its source line; sig_hash recomputes",
     evidence_provenance),
    ("scored_provenance", "every scored run resolves to its evidence line; sig_hash recomputes", scored_provenance),
    ("export_provenance", "every export row resolves to its scored run; sig_hash recomputes", export_provenance),
    ("sft_never_rejected_or_review", "no rejected or needs_human_review row in SFT", sft_never_rejected_or_review),
    ("rag_categories", "RAG holds only the categories export.rag_categories allows", rag_categories),
    ("preference_no_self_pairs", "no preference pair pairs a row with itself", preference_no_self_pairs),
    ("preference_no_identical_texts", "no preference pair has identical chosen and rejected texts",
     preference_no_identical_texts),
    ("preference_chosen_outranks", "chosen is accepted/partial, scored strictly higher, same task",
     preference_chosen_outranks),
    ("preference_pair_limit", "at most export.max_pairs_per_task pairs per task", preference_pair_limit),
    ("no_duplicate_answers", "RAG and SFT hold each (task, answer) once", no_duplicate_answers),
    ("near_duplicates_named", "each near-duplicate RAG or SFT refused names a row kept, and is near it",
     near_duplicates_named),
    ("no_secrets_in_exports", "no secret or personal data in any export, converted format or quarantine record "
     "(the engine and an independent second pass)", no_secrets_in_exports),
    ("export_quarantine_holds_no_text", "export quarantine records never copy the refused text",
     export_quarantine_holds_no_text),
    ("unique_ids", "ids are unique within evidence, scored runs, each export and quarantine", unique_ids),
    ("schemas", "every output row and report validates against schemas/", schemas_validate),
]


def run_checks(ctx: Context, checks: list[tuple[str, str, Callable[[Context], list[str]]]],
               first_number: int = 1) -> list[Check]:
    out = []
    for n, (key, title, fn) in enumerate(checks, first_number):
        t0 = time.perf_counter()
        try:
            problems = fn(ctx)
        except Exception as e:  # a check that crashes fails; it never hides the others
            problems = [f"the check itself failed: {type(e).__name__}: {e}"]
        out.append(Check(n, key, title, not problems, problems, seconds=round(time.perf_counter() - t0, 3)))
    return out
