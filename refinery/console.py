"""Human-readable results of the stages: rich tables on stdout (`--json` bypasses all this)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

CATEGORIES = ("accepted", "partially_accepted", "rejected", "needs_human_review")


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _reasons_table(title: str, by_reason: dict[str, int]) -> Table:
    t = _table(title, "reason", "rows")
    for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(reason, f"{n:,}")
    return t


def materialize_table(result: Any, console: Console | None = None) -> None:
    console = console or Console()
    table = _table(f"materialize — {result.seconds:.2f}s", "stream (data/_kb/)", "transform", "rows in",
                   "evidence", "quarantined")
    table.columns[1].justify = "left"
    for f in result.files:
        table.add_row(f.source_file.removeprefix("data/_kb/"), f.transform or "(none)", f"{f.rows_in:,}",
                      f"{f.evidence:,}", f"{f.quarantined:,}" if not f.file_error else "unreadable")
    table.add_row("total", "", f"{result.rows_in:,}", f"{result.evidence:,}", f"{result.quarantined:,}",
                  style="bold")
    console.print(table)
    if result.by_reason:
        console.print(_reasons_table("quarantined, by reason", result.by_reason))
    console.print("evidence: data/evidence/YYYY/MM/DD/<stream>.jsonl   "
                  "quarantine: exports/quarantine/materialize.jsonl")


def _category_table(result: Any) -> Table:
    by_source: dict[str, Counter[str]] = {}
    for f in result.files:
        src = f.evidence_file.rsplit("/", 1)[-1].removesuffix(".jsonl")
        by_source.setdefault(src, Counter()).update(f.by_category)
    t = _table(f"score — policy {result.policy_version} — {result.seconds:.2f}s", "source", "accepted",
               "partially", "rejected", "review")
    for src in sorted(by_source):
        t.add_row(src, *(f"{by_source[src][c]:,}" for c in CATEGORIES))
    t.add_row("total", *(f"{result.by_category[c]:,}" for c in CATEGORIES), style="bold")
    return t


def score_table(result: Any, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_category_table(result))
    rules = result.to_json()["by_rule"]
    if rules:
        t = _table("rules fired", "rule", "rows")
        for rule, n in sorted(rules.items(), key=lambda kv: (-kv[1], kv[0])):
            t.add_row(rule, f"{n:,}")
        console.print(t)
    if result.quarantined:
        console.print(f"[red]{result.quarantined} evidence lines could not be scored[/red] "
                      "(exports/quarantine/score.jsonl)")
    console.print(f"scored runs: data/scored-runs/YYYY/MM/DD/<stream>.jsonl   policy hash {result.policy_hash[:16]}…")


def export_table(result: Any, console: Console | None = None) -> None:
    console = console or Console()
    t = _table(f"exports — {result.seconds:.2f}s", "export", "rows in", "written", "quarantined", "file")
    for name, e in result.exports.items():
        written = f"{e['rows']:,} pairs ({e['rows_out']:,} rows)" if name == "preference" else f"{e['rows']:,}"
        t.add_row(name, f"{e['rows_in']:,}", written, f"{e['quarantined']:,}", e["path"])
    console.print(t)
    reasons = sorted({r for e in result.exports.values() for r in e["by_reason"]})
    if reasons:
        rt = _table("quarantined by the exports, by reason", "reason", *result.exports)
        for r in reasons:
            rt.add_row(r, *(f"{e['by_reason'].get(r, 0):,}" for e in result.exports.values()))
        console.print(rt)
    console.print("quarantine: exports/quarantine/export-<name>.jsonl   stats: <export>.stats.json")


def run_all_summary(m: Any, s: Any, e: Any, console: Console | None = None) -> None:
    console = console or Console()
    t = _table("run-all", "stage", "rows in", "rows out", "quarantined", "seconds")
    t.add_row("materialize", f"{m.rows_in:,}", f"{m.evidence:,}", f"{m.quarantined:,}", f"{m.seconds:.2f}")
    t.add_row("score", f"{s.rows_in:,}", f"{s.scored:,}", f"{s.quarantined:,}", f"{s.seconds:.2f}")
    for name, x in e.exports.items():
        out = f"{x['rows']:,} pairs" if name == "preference" else f"{x['rows']:,}"
        t.add_row(f"export-{name}", f"{x['rows_in']:,}", out, f"{x['quarantined']:,}", "")
    console.print(t)
    console.print(_category_table(s))
    reasons = {"materialize": m.by_reason, "score": s.to_json()["by_reason"],
               **{f"export-{k}": v["by_reason"] for k, v in e.exports.items()}}
    names = sorted({r for v in reasons.values() for r in v})
    if names:
        rt = _table("quarantine, by reason", "reason", *(k.removeprefix("export-") for k in reasons))
        for r in names:
            rt.add_row(r, *(f"{v.get(r, 0):,}" if v.get(r) else "·" for v in reasons.values()))
        console.print(rt)
    console.print(f"total {m.seconds + s.seconds + e.seconds:.2f}s — exports/ holds rag/, sft/, preference/ "
                  "and quarantine/; `refinery trace <id>` follows any row back to its source line")
