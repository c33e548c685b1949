"""`refinery review …`: the human review queue — the scored runs the rules left to a person."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import ConfigOpt, JsonOpt, WorkspaceOpt, _err, _print_json, command_group

review_app = command_group(
    "review", "The human review queue: every scored run the rules left to a person (needs_human_review), "
              "to read and decide. `review export` writes it, a person fills in decisions, `review import` "
              "takes them, and the next `run-all` applies them.")


@review_app.command("export")
def review_export(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Write the review queue of the scored runs on disk: reports/review/queue.jsonl (one row per
    needs_human_review scored run: prompt, answer, tool calls, score, the rules that fired and
    what each means, provenance pointing at its scored-run line) and reports/review/queue.csv
    (the same rows for a spreadsheet, with empty columns to decide in: decision = accept, reject
    or correct, corrected_answer, reviewer, note). Rows decided since the run (imported, waiting
    for the next run-all) are left out. A queue.csv holding decisions not imported yet is never
    written over (exit 2: import it first). Secrets and personal data in the text read
    [REDACTED:<kind>]. Exit 2 when there are no scored runs (run `refinery run-all` first)."""
    from refinery.api import review_export as do_export

    q = do_export(workspace, config=config)
    if as_json:
        _print_json(q.to_json())
        return
    top = ", ".join(f"{s} {n:,}" for s, n in sorted(q.by_source.items(), key=lambda kv: -kv[1])[:5])
    typer.echo(f"{q.rows:,} scored runs to review ({top}{', …' if len(q.by_source) > 5 else ''}); "
               f"{q.redacted:,} with text redacted")
    if q.pending:
        typer.echo(f"{q.pending:,} more decided since the run, left out (the next `refinery run-all` applies them)")
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    typer.echo(f"queue: {ws.rel(q.jsonl)} and {ws.rel(q.csv)} (fill in decision, corrected_answer, reviewer, note; "
               "then `refinery review import <file>`)")


@review_app.command("import")
def review_import(
    decisions: Annotated[Path, typer.Argument(
        metavar="FILE", help="The filled-in queue: queue.csv (or a copy), or JSONL rows with review_id and decision.",
        dir_okay=False)],
    workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None,
    reviewer: Annotated[str | None, typer.Option(help="Who decided, for rows whose reviewer cell is empty.")] = None,
    decided_at: Annotated[str | None, typer.Option(
        "--decided-at", help="When, for rows without a decided_at cell (ISO 8601; default: now).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Take a person's decisions on the review queue: each row with a decision — accept, reject,
    or correct with a corrected_answer — and a reviewer is appended to the human_reviews source
    stream (data/_kb/human_reviews.jsonl) with what was reviewed and where it came from. The next
    `refinery run-all` moves those rows out of needs_human_review (accept → accepted, reject and
    correct → rejected) and makes each corrected answer a new accepted answer to the same prompt,
    paired over the original in the preference export. Rows left without a decision wait for a
    later import; a decision already imported is not taken twice. A line that cannot be taken
    (unknown id, a row not awaiting review, a row decided twice or differently in the file or
    before, a missing reviewer or corrected answer) is named with its line number and changes
    nothing; every line's outcome is in reports/review/import.jsonl. Exit 2 when any line was
    refused (the others are imported), or the file cannot be read."""
    from refinery.api import review_import as do_import
    from refinery.review import counted

    result = do_import(workspace, decisions, config=config, reviewer=reviewer, decided_at=decided_at)
    if as_json:
        _print_json(result.to_json())
    else:
        from refinery.review import PROBLEMS
        from refinery.workspace import Workspace

        ws = Workspace.at(workspace)
        kinds = ", ".join(f"{d} {n:,}" for d, n in result.by_decision().items())
        typer.echo(f"{counted(result.count('imported'), 'decision')} imported{f' ({kinds})' if kinds else ''} into "
                   f"{ws.rel(result.stream)}; {counted(result.count('undecided'), 'row')} undecided; "
                   f"{result.count('already_imported'):,} already imported")
        for e in result.refused:
            row = f" (row {e.row})" if e.row != e.line else ""
            _err(f"{result.file}:{e.line}{row}: {e.review_id or '-'}: {e.outcome}: {e.detail} — {PROBLEMS[e.outcome]}")
        if result.refused:
            _err(f"{counted(len(result.refused), 'line')} refused; each line's outcome: {ws.rel(result.log)}")
        if result.count("imported"):
            typer.echo("run `refinery run-all` to apply them")
    if result.refused:
        raise typer.Exit(2)
