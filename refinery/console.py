"""Human-readable results of the stages: rich tables on stdout (`--json` bypasses all this)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from refinery.exporters import BY_NAME

CATEGORIES = ("accepted", "partially_accepted", "rejected", "needs_human_review")
#: ANSI escape sequences: CSI (colours, cursor moves) and OSC (titles, links).
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class _WithoutAnsi:
    """A text stream that drops ANSI escape sequences on their way to `stream`."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ANSI.sub("", text))
        return len(text)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def plain_unless_terminal(stream: TextIO) -> TextIO:
    """`stream` itself on a terminal; else a view of it without ANSI escape sequences — for
    third-party output that forces colour (mlx-lm's training progress), so that a log file or a
    pipe gets text, not raw codes."""
    isatty = getattr(stream, "isatty", None)
    return stream if isatty is not None and isatty() else _WithoutAnsi(stream)  # type: ignore[return-value]


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
        unit = BY_NAME[name].unit
        written = f"{e['rows']:,} {unit} ({e['rows_out']:,} rows)" if unit != "rows" else f"{e['rows']:,}"
        t.add_row(name, f"{e['rows_in']:,}", written, f"{e['quarantined']:,}", e["path"])
    console.print(t)
    reasons = sorted({r for e in result.exports.values() for r in e["by_reason"]})
    if reasons:
        rt = _table("quarantined by the exports, by reason", "reason", *result.exports)
        for r in reasons:
            rt.add_row(r, *(f"{e['by_reason'].get(r, 0):,}" for e in result.exports.values()))
        console.print(rt)
    console.print("quarantine: exports/quarantine/export.jsonl (on reading; a record names each export that "
                  "refused the row) and export-<name>.jsonl (while merging)   stats: <export>.stats.json")


def _stage_table(title: str, receipts: dict[str, dict[str, Any]], *, hashes: bool = False) -> Table:
    extra = ["files in→out", "reused", "receipt_hash"] if hashes else ["seconds", "reused"]
    t = _table(title, "stage", "rows in", "rows out", "joined", "quarantined", *extra)
    t.columns[0].no_wrap = t.columns[-1].no_wrap = True
    for stage, r in receipts.items():
        c = r["counts"]
        unit = BY_NAME[stage.removeprefix("export-")].unit if stage.startswith("export-") else "rows"
        out = f"{c['written']:,} {unit}" if unit != "rows" else f"{c.get('written', c['rows_out']):,}"
        joined = f"{c['joined']:,}" if c.get("joined") else "·"  # records merged into another's evidence
        row = [stage, f"{c['rows_in']:,}", out, joined, f"{c['quarantined']:,}"]
        if hashes:
            row += [f"{len(r['inputs'])}→{len(r['outputs'])}", "yes" if r["reused_from"] else "·",
                    r["receipt_hash"][:10]]
        else:
            row += [f"{r['timings']['seconds']:.2f}", "yes" if r["reused_from"] else "·"]
        t.add_row(*row)
    return t


def _drift_line(drift: dict[str, Any] | None) -> str:
    if drift is None:
        return "drift: not computed (the run did not finish)"
    if drift["previous_run_id"] is None:
        return f"drift: {drift['note']}"
    moved = Counter(m["severity"] for m in drift["metrics"])
    judged = ""
    if drift.get("warn_pct") is not None:  # reports written before the thresholds were recorded lack them
        judged = (f"; a change of {drift['warn_pct']:g} % is a warning, {drift['alert_pct']:g} % an alert: "
                  "drift.warn_pct / drift.alert_pct")
    return (f"drift against run {drift['previous_run_id']}: {drift['severity']} "
            f"({moved['alert']} alert, {moved['warn']} warn, {moved['ok']} ok{judged})")


#: rows of run-all's categories-per-source table: past this, the largest sources and one row for the rest
SOURCES_SHOWN = 25


def run_all_summary(outcome: Any, console: Console | None = None) -> None:
    console = console or Console()
    rs = outcome.receipts
    console.print(_stage_table(f"run-all — run {outcome.run_id}", rs))
    if score := rs.get("score"):
        t = _table("score — categories per source", "source", "accepted", "partially", "rejected", "review")
        sources = score["by_source"]
        shown = set(sources)
        if len(sources) > SOURCES_SHOWN:  # a source per file: thousands of rows would bury the rest
            shown = set(sorted(sources, key=lambda src: (-sum(sources[src].values()), src))[:SOURCES_SHOWN - 1])
        for src, cats in sources.items():
            if src in shown:
                t.add_row(src, *(f"{cats.get(c, 0):,}" for c in CATEGORIES))
        if rest := [cats for src, cats in sources.items() if src not in shown]:
            t.add_row(f"{len(rest):,} other sources",
                      *(f"{sum(other.get(c, 0) for other in rest):,}" for c in CATEGORIES), style="dim")
        t.add_row("total", *(f"{score['by_category'].get(c, 0):,}" for c in CATEGORIES), style="bold")
        console.print(t)
        if rest:
            console.print(f"(the {SOURCES_SHOWN - 1} largest sources shown; `refinery receipts --json` lists all "
                          f"{len(sources):,})")
    reasons = {stage.removeprefix("export-"): r["by_reason"] for stage, r in rs.items()}
    names = sorted({r for v in reasons.values() for r in v})
    if names:
        rt = _table("quarantine, by reason", "reason", *reasons)
        for r in names:
            rt.add_row(r, *(f"{v.get(r, 0):,}" if v.get(r) else "·" for v in reasons.values()))
        console.print(rt)
    console.print(_drift_line(outcome.drift))
    reused = sorted({r["reused_from"] for r in rs.values() if r["reused_from"]})
    if reused:
        console.print(f"reused: unchanged stages kept the outputs of run {', '.join(reused)} (--force recomputes)")
    console.print(f"total {outcome.seconds:.2f}s — exports/ holds rag/, sft/, preference/ and quarantine/; "
                  f"`refinery receipts` shows this run's receipts, `refinery trace <id>` follows any row "
                  "back to its source line")


def receipts_view(summary: dict[str, Any], receipts: dict[str, dict[str, Any]], drift: dict[str, Any] | None,
                  problems: list[str], files_note: str, console: Console | None = None) -> None:
    console = console or Console()
    status = summary["status"] + (f", exit {summary['exit_code']}" if summary.get("exit_code") is not None else "")
    console.print(f"run {summary['run_id']} — {status} — code {summary['code_version']} — "
                  f"started {summary['started_at']}")
    if summary.get("error"):
        console.print(f"[red]error: {summary['error']}[/red]")
    console.print(_stage_table("receipts", receipts, hashes=True))
    if summary.get("overall_hash"):
        console.print(f"overall hash {summary['overall_hash']}")
    if summary.get("totals"):
        console.print("totals: " + ", ".join(f"{k} {v:,}" for k, v in summary["totals"].items()))
    if problems:
        for p in problems:
            console.print(f"[red]CHECK FAILED[/red] {p}")
    else:
        console.print("checks: every receipt_hash matches its receipt; each stage read exactly what the "
                      "stage before it wrote")
    console.print(files_note)
    console.print(_drift_line(drift))
    if drift and drift["previous_run_id"] is not None:
        order = {"alert": 0, "warn": 1, "ok": 2}
        t = _table("drift", "metric", "previous", "value", "change %", "severity")
        for m in sorted(drift["metrics"], key=lambda m: (order[m["severity"]], m["name"])):
            change = "new" if m["change_pct"] is None else f"{m['change_pct']:+.1f}"
            t.add_row(m["name"], _num(m["previous"]), _num(m["value"]), change, m["severity"])
        console.print(t)


def _num(v: float | None) -> str:
    if v is None:
        return "·"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.2f}"


def runs_table(runs: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not runs:
        console.print("no runs recorded yet; `refinery run-all` records one")
        return
    t = _table("runs (oldest first)", "run id", "status", "exit", "reused", "overall hash", "drift")
    for r in runs:
        stages = r.get("stages", [])
        reused = f"{sum(s['reused'] for s in stages)}/{len(stages)}" if stages else "·"
        exit_code = "·" if r.get("exit_code") is None else str(r["exit_code"])
        t.add_row(r["run_id"], r["status"], exit_code, reused, (r.get("overall_hash") or "·")[:12],
                  r.get("drift_severity") or "·")
    console.print(t)
