"""`refinery receipts`, `runs`, `acceptance`, `audit-full` and `trace`: checking what is on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import (
    ConfigOpt, JsonOpt, ReportOpt, WorkspaceOpt, _err, _load, _print_json, _write_report, app,
)
from refinery.errors import EXIT_CHECK_FAILED


RunIdOpt = Annotated[str | None, typer.Option(
    "--run-id", help="A run id from `refinery runs` (a unique prefix will do). Default: the newest run.")]


@app.command()
def receipts(
    workspace: WorkspaceOpt = Path("."),
    run_id: RunIdOpt = None,
    files: Annotated[bool, typer.Option(
        "--files/--no-files", help="Re-hash every output file the run recorded and compare it with its receipt "
                                   "(for the run whose outputs are on disk; --no-files skips it and says so).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Show a run's stage receipts (inputs, outputs, counts, hashes), its summary and its
    drift against the previous complete run. Re-checks the hashes of each receipt, the summary
    and the drift report, the chain between stages and — for the run whose outputs are on disk
    — every output file's sha256 and rows against its receipt: exit 1 if any does not hold, 2 if
    there is no such run. (audit-full checks much more: provenance, accounting, leaks, a
    determinism re-run.)"""
    from refinery.receipts import check_chain, check_hashes
    from refinery.runs import check_reports, check_run_files, load_run, resolve_run
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    ws.try_recover()
    rid = resolve_run(ws, run_id)
    summary, stage_receipts, drift = load_run(ws, rid)
    problems = check_hashes(stage_receipts) + check_chain(stage_receipts)
    problems += check_reports(ws, summary, stage_receipts, drift)
    if files:
        file_problems, files_note = check_run_files(ws, rid, stage_receipts)
        problems += file_problems
    else:
        files_note = "files: not checked (--no-files): the outputs on disk were not compared with the receipts"
    if as_json:
        _print_json({"summary": summary, "receipts": stage_receipts, "drift": drift,
                     "checks": {"ok": not problems, "problems": problems, "files": files_note}})
    else:
        from refinery import console

        console.receipts_view(summary, stage_receipts, drift, problems, files_note)
    if problems:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def report(workspace: WorkspaceOpt = Path("."), run_id: RunIdOpt = None) -> None:
    """Write one self-contained page of what a run did — rows through the stages and quarantine
    by reason, categories per source, the rules that fired most, drift and the trend over runs,
    the audit ledger, what the exports are made of, and the adapters and replay A/B when there
    are — as reports/distillation/<run_id>/report.html, and print its path. It opens from disk
    (no server, nothing fetched); every number links to the jq command that proves it (listed at
    the end; run them in the workspace folder). run-all, audit-full and train eval write it too."""
    from refinery.report import build
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    ws.try_recover()
    typer.echo(build(ws, run_id))


@app.command()
def runs(workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """List the recorded runs, oldest first: status (complete, incomplete = killed or still
    running, failed = stopped by an error, nothing published), exit code, stages reused,
    overall hash and drift severity."""
    from refinery.runs import drift_severity, list_runs
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    ws.try_recover()  # a run killed while publishing: complete it, so what is listed is true
    rows = list_runs(ws)
    for r in rows:
        r["drift_severity"] = drift_severity(ws, r["run_id"])
    if as_json:
        _print_json(rows)
        return
    from refinery import console

    console.runs_table(rows)


@app.command()
def acceptance(
    fixture: Annotated[Path | None, typer.Option(
        file_okay=False, help="The fixture folder (kb/, refinery.toml, transforms/, expected.json). "
                              "Default: tests/fixtures/acceptance.")] = None,
    keep: Annotated[Path | None, typer.Option(
        file_okay=False, help="Run in this folder (run-a/, run-b/) and leave it, instead of a temporary one.")] = None,
    write_expected: Annotated[bool, typer.Option(
        "--write-expected", help="Pin what the fixture gives now into its expected.json (after a deliberate "
                                 "change to the fixture or the policy; review the diff).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The acceptance gate: run the pipeline twice on a hand-made fixture (every stream family,
    every defect kind, every scorer rule) in temporary workspaces and check every numbered
    invariant — accounting, determinism, no leaks into SFT, clean preference pairs,
    provenance, the receipt chain, no secrets, the pinned counts, the schemas. Prints PASS or
    FAIL for each; exit 1 if any fails."""
    from refinery.acceptance import FIXTURE, run_gate

    checks = run_gate(fixture or FIXTURE, keep=keep, write_expected=write_expected)
    failed = [c for c in checks if not c.ok]
    if as_json:
        _print_json({"ok": not failed, "checks": [c.to_json() for c in checks]})
    else:
        _print_checks(checks)
        typer.echo(f"acceptance: {len(checks) - len(failed)} of {len(checks)} invariants hold"
                   + (f"; FAILED: {', '.join(c.key for c in failed)}" if failed else ""))
    if failed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _print_checks(checks) -> None:
    for c in checks:
        mark = ("SKIP" if c.problems else "PASS") if c.ok else ("FAIL" if c.required else "WARN")
        typer.echo(f"{c.number:>3} {mark}  {c.key} — {c.title}")
        for p in c.problems:
            typer.echo(f"          {p}")


@app.command("audit-full")
def audit_full(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    rerun: Annotated[bool, typer.Option(
        "--rerun/--no-rerun", help="Re-run the pipeline in a temporary workspace to check determinism "
                                   "(the slow part; --no-rerun skips it and says so).")] = True,
    reanchor: Annotated[bool, typer.Option(
        "--reanchor", help="The ledger's head (reports/distillation/audit-ledger-head.json) is missing or "
                           "damaged and you know why: accept data/_kb/audit_baselines.jsonl as it stands. "
                           "Takes effect only if the audit passes; the row it appends records the "
                           "re-anchoring.")] = False,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-verify the workspace on disk: receipts, summary and drift report against their
    hashes and every file's real sha256, the receipt chain, provenance of every row,
    accounting, no leaks, schemas, a determinism re-run in a temporary workspace; then drift of
    the tracked metrics against the last row of data/_kb/audit_baselines.jsonl, the last passing
    audit (a move over 20 % is flagged warn; run-all's drift.json compares with the previous run
    instead, warning at drift.warn_pct, 10 %, and alerting at drift.alert_pct, 25 %). The run
    audited is the one whose outputs are published (reports/distillation/published.json names
    it); it says which and why. Writes
    reports/distillation/audit-full-report.md and, when every required check holds, appends a
    row to the ledger, and writes the audited run's page again with the ledger in it
    (reports/distillation/<run_id>/report.html; --no-report: not). Refuses to run if the
    ledger's rows were changed or its head is missing (exit 1; --reanchor accepts a ledger
    without a head). Exit 0 only when every required
    check holds, 1 when one fails, 2 on a damaged head or a needless --reanchor."""
    from refinery import api

    _, cfg = _load(workspace, config)  # for the drift thresholds it explains
    res = api.audit(workspace, config=config, rerun=rerun, reanchor=reanchor)
    if as_json:
        _print_json(res.to_json())
    else:
        typer.echo(f"auditing run {res.run_id}: {res.why}" if res.run_id else f"auditing no run: {res.why}")
        _print_checks(res.checks)
        from refinery.audit import DRIFT_WARN_PCT
        from refinery.drift import thresholds_note

        flagged = [d for d in res.drift if d["flag"] == "warn"]
        if res.baseline is None:
            typer.echo("drift: first audit, no baseline to compare with")
        elif res.drift:
            typer.echo(f"drift against baseline row {res.baseline['seq']}: {len(flagged)} of {len(res.drift)} "
                       f"metrics moved more than {DRIFT_WARN_PCT:g} % since the last passing audit")
            typer.echo(f"  note: {thresholds_note(cfg.drift)}")
            for d in flagged:
                change = "from 0" if d["change_pct"] is None else f"{d['change_pct']:+.1f} %"
                typer.echo(f"  warn  {d['name']}: {d['baseline']:g} → {d['value']:g} ({change})")
        for n in res.notes:
            typer.echo(n)
        if res.appended:
            typer.echo(f"baseline row {res.appended['seq']} appended to data/_kb/audit_baselines.jsonl")
        passed = sum(c.ok for c in res.checks)
        typer.echo(f"audit-full: {'PASS' if res.ok else 'FAIL'} — {passed} of {len(res.checks)} checks hold; "
                   f"report: {res.report}")
    if res.run_id is not None:
        from refinery.workspace import Workspace

        _write_report(Workspace.at(workspace), res.run_id, report)
    if not res.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def trace(
    row_id: Annotated[str, typer.Argument(metavar="ID", help="An id from any export, scored run, evidence "
                                          "or quarantine file (rag-…, sft-…, pp-…, ev-…, q-…).")],
    workspace: WorkspaceOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Walk a row back to its source line: export → scored run → evidence → data/_kb/,
    recomputing each sig_hash; for a person's decision (human_reviews), on to the row it was
    made on, as it was then. Exit 0 when every hop checks, 1 naming the hop that does not,
    2 when the id is not found."""
    from refinery.trace import trace as do_trace
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    t = do_trace(ws, row_id)
    if as_json:
        _print_json(t.to_json())
    else:
        for c in t.chains:
            if len(t.chains) > 1:
                typer.echo(f"[{c.label}]" + ("" if c.counts else " (where it was when decided; not part of the check)"))
            for i, h in enumerate(c.hops):
                where = (f"{h.file} {h.record}" if h.record else f"{h.file}:{h.line}") if h.line is not None \
                    else h.file
                where += "  (joined)" if h.joined else ""
                mark = "ok " if h.ok else "BAD"
                what = "found" if i == 0 else f"sig_hash {h.expected_sig[:12] if h.expected_sig else None}…"
                typer.echo(f"  {mark} {i}. {where}  {h.id or ''}  {what}")
                if h.problem:
                    typer.echo(f"        {h.problem}")
                    if h.expected_sig and h.actual_sig:
                        typer.echo(f"        expected {h.expected_sig}\n        found    {h.actual_sig}")
            last = next((h for h in reversed(c.hops) if not h.joined), c.hops[-1])
            if c.ok and last.preview:
                typer.echo(f"  source record: {last.preview}")
    if not t.ok:
        for c in t.chains:
            if c.counts and (b := c.broken) is not None:
                at = f"{b.file} {b.record}" if b.record else f"{b.file}:{b.line}"
                _err(f"trace {row_id}: broken at {at} ({b.problem})")
        raise typer.Exit(EXIT_CHECK_FAILED)
