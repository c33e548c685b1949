"""SFT: accepted answers (with --include-partial, also partially accepted) as instruction /
response rows. Three defences keep a rejected or needs_human_review row out: the category
filter (`admits`), a check as each row is built (`candidate`), and a re-read of the written
file against the scored runs before anything is published (`verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refinery.exporters._base import Candidate, LeakError, Settings, plain_call, plain_message
from refinery.exporters._rows import RowExporter
from refinery.jsonl import LineCursor, read_jsonl

#: Categories that must never reach SFT, whatever the config says (defence 2 of 3).
SFT_NEVER = frozenset({"rejected", "needs_human_review"})


def sft_categories(include_partial: bool) -> set[str]:
    return {"accepted", "partially_accepted"} if include_partial else {"accepted"}


class Sft(RowExporter):
    name = "sft"
    path = "exports/sft/instruction_response.jsonl"
    schema = "sft_sample"
    order = 20
    id_prefix = "sft"
    summary = ("Export accepted answers (--include-partial: also partially accepted) as SFT rows: "
               "exports/sft/instruction_response.jsonl. The written file is re-read and checked; on a "
               "forbidden row nothing is published and the exit code is 1.")
    category_field = "quality_score"
    prompt_field = "instruction"
    partial_option = True

    def admits(self, category: str, s: Settings) -> bool:
        return category in sft_categories(s.include_partial) and category not in SFT_NEVER

    def candidate(self, c: Candidate, s: Settings) -> bytes:
        if c.sr["category"] in SFT_NEVER:  # defence 2: never, whatever admits and the config say
            raise LeakError(f"{c.prov['source_file']}:{c.prov['line_offset']}: a {c.sr['category']} row was about "
                            "to be written to SFT")
        return super().candidate(c, s)

    def row(self, c: Candidate) -> dict[str, Any]:
        ev, sr = c.ev, c.sr
        msgs = ev["messages"]
        return {
            "schema_version": 1, "id": "sft-" + sr["id"][3:], "instruction": ev["prompt"], "input": "",
            "messages": [plain_message(m) for m in msgs] if msgs else None, "response": ev["response"] or "",
            "tool_calls": [plain_call(x) for x in ev["tool_calls"]], "quality_score": sr["category"],
            "score": sr["score"], "source": ev["source"], "provenance": c.prov,
        }

    def verify(self, path: Path, ws: Any, s: Settings) -> None:
        """Defence 3: re-read what was written, against the scored runs."""
        verify_sft(path, ws, sft_categories(s.include_partial))


def verify_sft(path: Path, ws: Any, allowed: set[str]) -> int:
    """Re-read an SFT file: every row's quality_score is allowed, never on the never-list, and
    agrees with the category of the scored run its provenance points at. Raises LeakError."""
    current: tuple[str, LineCursor] | None = None
    rows = 0
    for line in read_jsonl(path):
        if line.obj is None:
            raise LeakError(f"{path.name}:{line.offset}: unreadable row ({line.reason})")
        row = line.obj
        rows += 1
        q = row.get("quality_score")
        if q in SFT_NEVER or q not in allowed:
            raise LeakError(f"{path.name}:{line.offset}: quality_score {q!r} must never be in SFT (allowed: "
                            f"{', '.join(sorted(allowed))})")
        p = row["provenance"]
        if current is None or current[0] != p["source_file"]:
            current = (p["source_file"], LineCursor(read_jsonl(ws.out / p["source_file"])))
        last = current[1].at(p["line_offset"])
        if last is None or last.obj is None:
            raise LeakError(f"{path.name}:{line.offset}: its scored run {p['source_file']}:{p['line_offset']} "
                            "is missing")
        if last.obj["category"] != q or last.obj["category"] in SFT_NEVER:
            raise LeakError(f"{path.name}:{line.offset}: labelled {q!r} but its scored run is "
                            f"{last.obj['category']!r}")
    return rows


EXPORTER = Sft()
