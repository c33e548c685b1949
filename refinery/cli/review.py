"""`refinery review …`: the human review queue — the scored runs the rules left to a person."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import JsonOpt, WorkspaceOpt, _print_json, app

review_app = typer.Typer(
    help="The human review queue: every scored run the rules left to a person (needs_human_review), "
         "to read and decide.",
    no_args_is_help=True, rich_markup_mode=None)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Write the review queue of the scored runs on disk: reports/review/queue.jsonl (one row per
    needs_human_review scored run: prompt, answer, tool calls, score, the rules that fired and
    what each means, provenance pointing at its scored-run line) and reports/review/queue.csv
    (the same rows for a spreadsheet, with empty columns to decide in: decision = accept, reject
    or correct, corrected_answer, reviewer, note). Secrets and personal data in the text read
    [REDACTED:<kind>]. Exit 2 when there are no scored runs (run `refinery run-all` first)."""
    from refinery.review import export_queue
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    ws.try_recover()
    q = export_queue(ws)
    if as_json:
        _print_json(q.to_json())
        return
    top = ", ".join(f"{s} {n:,}" for s, n in sorted(q.by_source.items(), key=lambda kv: -kv[1])[:5])
    typer.echo(f"{q.rows:,} scored runs to review ({top}{', …' if len(q.by_source) > 5 else ''}); "
               f"{q.redacted:,} with text redacted")
    typer.echo(f"queue: {ws.rel(q.jsonl)} and {ws.rel(q.csv)} (fill in decision, corrected_answer, reviewer, note)")
