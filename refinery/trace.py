"""`refinery trace <id>`: walk a row back to its source line, re-checking every hash.

    export row ──provenance──▶ scored-run line ──provenance──▶ evidence line ──provenance──▶ source line

At each hop the line named by the provenance is read again and its sig_hash recomputed (the
canonical JSON of the parsed row; the raw bytes for a line that never parsed). The first hop
whose hash differs — or whose line is gone — is the one reported as broken. A preference
pair has two chains, one per answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery.canonical import sig_hash
from refinery.jsonl import DEFAULT_MAX_LINE_BYTES, Line, LineCursor, read_jsonl
from refinery.sources import FORMATS, SourceFile, read_rows
from refinery.workspace import Workspace


class NotFound(LookupError):
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


@dataclass
class Chain:
    label: str
    hops: list[Hop] = field(default_factory=list)

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
        return all(c.ok for c in self.chains)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "found_in": self.found_in, "line": self.line, "ok": self.ok,
                "chains": [{"label": c.label, "ok": c.ok, "hops": [asdict(h) for h in c.hops]} for c in self.chains]}


def _candidates(ws: Workspace, row_id: str) -> list[Path]:
    """Files that can hold `row_id`, from its prefix (rag-, sft-, pp-, ev-, q-)."""
    prefix = row_id.split("-", 1)[0]
    ex = ws.exports
    files = {
        "rag": [ex / "rag" / "playbooks.jsonl"],
        "sft": [ex / "sft" / "instruction_response.jsonl"],
        "pp": [ex / "preference" / "chosen_rejected.jsonl"],
        "q": sorted(ws.quarantine.glob("*.jsonl")),
        "ev": sorted(ws.scored_runs.rglob("*.jsonl")) + sorted(ws.evidence.rglob("*.jsonl")),
    }.get(prefix)
    if files is None:
        raise NotFound(f"{row_id!r} is not an id refinery writes (ids start with rag-, sft-, pp-, ev- or q-)")
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


def _read_line(ws: Workspace, rel: str, offset: int) -> Line | None:
    path = ws.root / rel
    if not path.is_file():
        return None
    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "csv" and rel.startswith("data/_kb/"):
        src = SourceFile(path, rel.removeprefix("data/_kb/"), rel, "csv", path.stat().st_size)
        lines = read_rows(src, DEFAULT_MAX_LINE_BYTES)
    else:
        lines = read_jsonl(path)
    return LineCursor(lines).at(offset)


def follow(ws: Workspace, prov: dict[str, Any], label: str, start: Hop) -> Chain:
    """Follow `prov` hop by hop until a source line (a file under data/_kb/) or a broken hop."""
    chain = Chain(label, [start])
    for _ in range(4):  # export → scored run → evidence → source: never more
        rel, offset, expected = prov["source_file"], prov["line_offset"], prov["sig_hash"]
        hop = Hop(rel, offset, None, expected)
        chain.hops.append(hop)
        if offset is None:
            hop.problem = "whole-file record: no line to check"
            hop.ok = expected is None
            return chain
        line = _read_line(ws, rel, offset)
        if line is None:
            hop.problem = f"{rel} has no line {offset}" if (ws.root / rel).exists() else f"{rel} does not exist"
            return chain
        if line.obj is not None:
            hop.actual_sig = sig_hash(line.obj)
            hop.id = line.obj.get("id") if isinstance(line.obj.get("id"), str) else None
            hop.preview = orjson.dumps(line.obj).decode()[:160]
        else:
            hop.actual_sig = hashlib.sha256(line.raw or b"").hexdigest()
            hop.preview = (line.raw or b"").decode("utf-8", "backslashreplace")[:160]
        hop.ok = hop.actual_sig == expected
        if not hop.ok:
            hop.problem = "sig_hash differs: the line was changed after the row downstream was written"
            return chain
        if rel.startswith("data/_kb/") or line.obj is None or "provenance" not in line.obj:
            return chain
        prov = line.obj["provenance"]
    return chain


def trace(ws: Workspace, row_id: str) -> Trace:
    path, offset, row = find_row(ws, row_id)
    rel = ws.rel(path)
    start = Hop(rel, offset, row_id, None, None, True, None, orjson.dumps(row).decode()[:160])
    chains = []
    if "rejected_provenance" in row:
        chains.append(follow(ws, row["provenance"], "chosen", start))
        chains.append(follow(ws, row["rejected_provenance"], "rejected", start))
    else:
        chains.append(follow(ws, row["provenance"], "row", start))
    return Trace(row_id, rel, offset, chains)
