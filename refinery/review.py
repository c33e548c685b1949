"""`refinery review export`: the human review queue — every scored run the rules left to a person.

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
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery import sensitive
from refinery.jsonl import atomic_write, dumps_line
from refinery.policy import RULES
from refinery.workspace import Workspace

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

    def to_json(self) -> dict[str, Any]:
        return {"queue": str(self.jsonl), "csv": str(self.csv), "rows": self.rows, "by_source": self.by_source,
                "by_rule": self.by_rule, "redacted_rows": self.redacted}


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


def export_queue(ws: Workspace) -> Queue:
    """Write the review queue of the scored runs on disk (JSONL and CSV, each atomically).
    Raises StaleInputError when there are no scored runs or they do not match the evidence."""
    from refinery.export import pairs
    from refinery.score import read_manifest

    manifest = read_manifest(ws)
    out = ws.root / QUEUE_DIR
    q = Queue(out / "queue.jsonl", out / "queue.csv")
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
