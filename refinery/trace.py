"""`refinery trace <id>`: walk a row back to its source line, re-checking every hash.

    export row ──provenance──▶ scored-run line ──provenance──▶ evidence line ──provenance──▶ source record

At each hop the line named by the provenance is read again and its sig_hash recomputed (the
canonical JSON of the parsed row; the raw bytes for a line that never parsed). A source record
inside a JSON document or archive is found by its `record` locator (`$.samples[3]`, ...); the
records joined into the evidence (a Batch request, a trace's scores, ...) are checked too, as
hops of their own. The first hop whose hash differs — or whose line is gone — is the one
reported as broken. A preference pair has two chains, one per answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery.canonical import sig_hash
from refinery.errors import RefineryError
from refinery.jsonl import Line, LineCursor, read_jsonl
from refinery.sources import SourceRecords
from refinery.exporters import EXPORTERS
from refinery.workspace import Workspace, inside


class NotFound(RefineryError, LookupError):
    pass


@dataclass
class Hop:
    file: str
    line: int | None
    id: str | None
    expected_sig: str | None
    actual_sig: str | None = None
    ok: bool = False
    problem: str | None = None
    preview: str | None = None
    record: str | None = None
    """where the record sits in its document or archive (source records only)"""
    joined: bool = False
    """a record joined into the evidence, not the evidence's own"""


@dataclass
class Chain:
    label: str
    hops: list[Hop] = field(default_factory=list)
    counts: bool = True
    """False: shown, not part of the verdict (the row a decision was made on may have moved since)"""

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hops)

    @property
    def broken(self) -> Hop | None:
        return next((h for h in self.hops if not h.ok), None)


@dataclass
class Trace:
    id: str
    found_in: str
    line: int
    chains: list[Chain]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains if c.counts)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "found_in": self.found_in, "line": self.line, "ok": self.ok,
                "chains": [{"label": c.label, "ok": c.ok, "counts": c.counts, "hops": [asdict(h) for h in c.hops]}
                           for c in self.chains]}


def _candidates(ws: Workspace, row_id: str) -> list[Path]:
    """Files that can hold `row_id`, from its prefix (an export's — rag-, sft-, pp- —, ev-, q-)."""
    prefix = row_id.split("-", 1)[0]
    files = {
        **{x.id_prefix: [ws.out / x.path] for x in EXPORTERS},
        "q": sorted(ws.quarantine.glob("*.jsonl")),
        "ev": sorted(ws.scored_runs.rglob("*.jsonl")) + sorted(ws.evidence.rglob("*.jsonl")),
    }.get(prefix)
    if files is None:
        raise NotFound(f"{row_id!r} is not an id refinery writes (ids start with "
                       f"{', '.join(x.id_prefix + '-' for x in EXPORTERS)}, ev- or q-)")
    return [f for f in files if f.exists()]


def find_row(ws: Workspace, row_id: str) -> tuple[Path, int, dict[str, Any]]:
    needle = b'"id":"' + row_id.encode() + b'"'
    for path in _candidates(ws, row_id):
        with open(path, "rb") as f:
            for offset, raw in enumerate(f):
                if needle in raw:
                    obj = orjson.loads(raw)
                    if obj.get("id") == row_id:
                        return path, offset, obj
    raise NotFound(f"no row with id {row_id!r} in exports/, data/scored-runs/ or data/evidence/")


def _read_line(ws: Workspace, sources: SourceRecords, rel: str, offset: int,
               record: str | None = None) -> Line | None:
    path = ws.root / rel
    if not inside(rel) or not path.is_file():  # provenance names a file of the workspace, never one outside
        return None
    if rel.startswith("data/_kb/"):
        return sources.at(rel, offset, record)
    return LineCursor(read_jsonl(path)).at(offset)


def _sources(ws: Workspace) -> SourceRecords:
    """The workspace's source records, read with its configured limits."""
    from refinery.config import ConfigError, load_config

    try:
        m = load_config(ws.root).materialize
        return SourceRecords(ws.root, m.max_line_bytes, m.max_document_bytes)
    except ConfigError:
        return SourceRecords(ws.root)


def _check(ws: Workspace, sources: SourceRecords, hop: Hop) -> Line | None:
    """Read the record `hop` names and compare its hash; None when it is not there."""
    line = _read_line(ws, sources, hop.file, hop.line, hop.record)
    if line is None:
        where = f"record {hop.record}" if hop.record else f"line {hop.line}"
        hop.problem = f"{hop.file} has no {where}" if (ws.root / hop.file).exists() else f"{hop.file} does not exist"
        return None
    actual = None
    if line.obj is not None:
        try:
            actual = sig_hash(line.obj)
        except TypeError:  # nested too deep to write: refused by its raw bytes, as materialize does
            actual = None
    if actual is not None:
        hop.actual_sig = actual
        hop.id = line.obj.get("id") if isinstance(line.obj.get("id"), str) else None
        hop.preview = orjson.dumps(line.obj).decode()[:160]
    else:
        hop.actual_sig = hashlib.sha256(line.raw or b"").hexdigest()
        hop.preview = (line.raw or b"").decode("utf-8", "backslashreplace")[:160]
    hop.ok = hop.actual_sig == hop.expected_sig
    if not hop.ok:
        hop.problem = "sig_hash differs: the record was changed after the row downstream was written"
    return line


def follow(ws: Workspace, prov: dict[str, Any], label: str, start: Hop,
           sources: SourceRecords | None = None) -> Chain:
    """Follow `prov` hop by hop until a source record (a file under data/_kb/) or a broken hop."""
    sources = sources or _sources(ws)
    chain = Chain(label, [start])
    for _ in range(4):  # export → scored run → evidence → source: never more
        rel, offset, expected = prov["source_file"], prov["line_offset"], prov["sig_hash"]
        hop = Hop(rel, offset, None, expected, record=prov.get("record"))
        chain.hops.append(hop)
        if offset is None:
            hop.problem = "whole-file record: no line to check"
            hop.ok = expected is None
            return chain
        line = _check(ws, sources, hop)
        if line is None or not hop.ok:
            return chain
        if rel.startswith("data/_kb/") or line.obj is None or "provenance" not in line.obj:
            for ref in prov.get("joined") or ():
                extra = Hop(ref["source_file"], ref["line_offset"], None, ref["sig_hash"], record=ref.get("record"),
                            joined=True)
                chain.hops.append(extra)
                _check(ws, sources, extra)
            return chain
        prov = line.obj["provenance"]
    return chain


def trace(ws: Workspace, row_id: str) -> Trace:
    path, offset, row = find_row(ws, row_id)
    rel = ws.rel(path)
    start = Hop(rel, offset, row_id, None, None, True, None, orjson.dumps(row).decode()[:160])
    chains = []
    sources = _sources(ws)  # one reader (and one parse of each document) for every chain
    if "rejected_provenance" in row:
        chains.append(follow(ws, row["provenance"], "chosen", start, sources))
        chains.append(follow(ws, row["rejected_provenance"], "rejected", start, sources))
    else:
        chains.append(follow(ws, row["provenance"], "row", start, sources))
    streams: set[str] | None = None
    for chain in list(chains):  # a person's decision (refinery.decisions): on to the row decided on
        last = chain.hops[-1]
        if not (chain.ok and last.file.startswith("data/_kb/") and last.line is not None):
            continue
        if streams is None:
            from refinery.config import load_config
            from refinery.decisions import decision_files

            streams = {rel for _, rel in decision_files(ws, load_config(ws.root))}
        if last.file not in streams:
            continue
        line = _read_line(ws, sources, last.file, last.line, last.record)
        reviewed = line.obj.get("reviewed") if line is not None and isinstance(line.obj, dict) else None
        if isinstance(reviewed, dict) and isinstance(reviewed.get("source_file"), str) \
                and reviewed["source_file"].startswith("data/evidence/") and type(reviewed.get("line_offset")) is int \
                and isinstance(reviewed.get("sig_hash"), str):
            decided = follow(ws, reviewed, "decided on", Hop(last.file, last.line, None, last.expected_sig,
                                                             last.actual_sig, True, None, last.preview), sources)
            decided.counts = False  # where the row was when decided: a later run may have moved it
            if (broken := decided.broken) is not None:
                broken.problem = (f"{broken.problem} — the row decided on has moved or changed since; "
                                  f"`refinery trace {line.obj['review_id']}` finds it now")
            chains.append(decided)
    return Trace(row_id, rel, offset, chains)
