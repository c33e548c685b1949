"""The `refinery` command line. Exit codes: 0 ok, 1 a check failed, 2 bad usage or input.

Stage modules are imported inside the commands, so `refinery --help` stays fast and never
imports the training stack.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from refinery.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, RefineryError


class _Commands(TyperGroup):
    """The command group: errors any command can meet — every refinery.errors.RefineryError,
    Ctrl-C, a full disk — are turned into a message and an exit code here, once, rather than in
    every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RefineryError as e:  # bad usage or input: 2; a check that failed: 1 (refinery.errors)
            _fail(e.report(), e.exit_code)
        except KeyboardInterrupt as e:
            _err(f"interrupted. {_what_was_kept(e)}")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:
            if e.errno not in _OPERATIONAL:
                raise
            what, fix = _OPERATIONAL[e.errno]
            where = f" ({e.filename})" if e.filename else ""
            _fail(f"error: {what}{where}: {fix}. {_what_was_kept(e)}")


#: OS errors that are the machine's state, not a bug: (what happened, what to do).
_OPERATIONAL = {
    errno.ENOSPC: ("no space left on the device", "free some space, or move the workspace to a bigger disk, "
                                                  "and run the command again"),
    errno.EDQUOT: ("over the disk quota", "free some space and run the command again"),
    errno.EROFS: ("the file system is read-only", "run refinery on a writable copy of the workspace"),
    errno.EACCES: ("permission denied", "check who owns that path and its permissions (ls -l)"),
    errno.EPERM: ("operation not permitted", "check who owns that path and its permissions (ls -l)"),
    errno.EXDEV: ("a rename across two file systems", "keep data/, exports/ and reports/ on the workspace's "
                                                      "own file system (outputs are published by rename)"),
}


def _what_was_kept(e: BaseException) -> str:
    """What a stopped command left behind: its own notes (run-all says which run and what
    it published), else what holds for every command."""
    return " ".join(getattr(e, "__notes__", ())) or (
        "The pipeline's outputs, receipts and reports are written to a temporary file and renamed into place "
        "only when complete, so none of them was left half-written.")


app = typer.Typer(
    cls=_Commands,
    name="refinery",
    help="Distil an LLM system's execution traces into evidence, scored runs and training data.\n\n"
         "Exit codes: 0 ok, 1 a check failed, 2 bad usage or input.",
    no_args_is_help=True,
    add_completion=False,
    # Help as plain text, wrapped to the terminal: no rich markup, so `[replay.escalation]` in a
    # help text is shown as written, and docstring line breaks are not kept mid-sentence.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from refinery import __version__

        typer.echo(f"refinery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    workspace: Annotated[Path | None, typer.Option(
        "--workspace", "-w", file_okay=False, show_default=False,
        help="Workspace root for the command that follows (the same as giving --workspace after it).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print refinery's version and exit.")] = False,
) -> None:
    if workspace is not None and ctx.invoked_subcommand is not None:
        cmd = ctx.command.get_command(ctx, ctx.invoked_subcommand)
        if cmd is not None and not hasattr(cmd, "commands") and "workspace" not in {p.name for p in cmd.params}:
            raise typer.BadParameter(f"`refinery {ctx.invoked_subcommand}` works without a workspace; drop it",
                                     param_hint="--workspace")


def _inherit_workspace(ctx: typer.Context, param: typer.CallbackParam, value: Path) -> Path:
    """`refinery --workspace DIR run-all` works like `refinery run-all --workspace DIR`. Precedence:
    the flag after the command, the flag before it, REFINERY_WORKSPACE, the current folder."""
    source = ctx.get_parameter_source(param.name)
    if source is not None and source.name == "COMMANDLINE":  # typer may carry its own copy of click's enum
        return value
    before = ctx.find_root().params.get("workspace")
    return before if before is not None else value


WorkspaceOpt = Annotated[Path, typer.Option(
    "--workspace", "-w", envvar="REFINERY_WORKSPACE", file_okay=False, callback=_inherit_workspace,
    help="Workspace root: holds data/_kb/, refinery.toml and the outputs (may also come before the command).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Config file (default: <workspace>/refinery.toml, if present).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
WorkersOpt = Annotated[int | None, typer.Option(help="Worker processes (0 = one per core).")]


def _err(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)


def _fail(msg: str, code: int = EXIT_BAD_INPUT):
    _err(msg)
    raise typer.Exit(code)


def _load(workspace: Path, config: Path | None, overrides: dict[str, dict[str, Any]] | None = None):
    from refinery.api import open_workspace

    return open_workspace(workspace, config, overrides)


def _print_json(obj: Any) -> None:
    import orjson

    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    sys.stdout.flush()


def _progress(counting: bool = False):
    """A progress bar on stderr, shown only on a terminal (CI logs stay clean); it counts bytes, or
    items with `counting`."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = Console(stderr=True)
    amount = MofNCompleteColumn() if counting else DownloadColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), amount, TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console, disable=not console.is_terminal,
                    transient=True)


def _do_materialize(ws, cfg, validate: bool):
    from refinery.materialize import run

    sources = _sources_to_read(ws, cfg)
    with _progress() as progress:
        task = progress.add_task("materialize", total=sum(s.size for s in sources))
        return run(ws, cfg, validate=validate, on_file_done=lambda r, size: progress.advance(task, size))


def _no_source_folder(ws) -> None:
    if not ws.kb.is_dir():
        _fail(f"error: no source folder {ws.kb} — put your trace files there, or run `refinery sample`")


def _nothing_to_read(ws, files, ignored) -> None:
    if not files:
        also = f" ({len(ignored)} file(s) there are ignored: materialize.ignore)" if ignored else ""
        _err(f"warning: {ws.kb} holds no source files{also}, so there is nothing to read. Put your trace files "
             "there (JSONL, CSV, JSON, inspect .eval, or gzip of those; any names, subfolders allowed), or "
             f"write the sample there with `refinery sample --out {ws.kb}`")


def _sources_to_read(ws, cfg):
    """Before a run: the source files, with what is wrong said first — no data/_kb/ (exit 2),
    nothing in it, refinery.toml tables that match no file (so a misspelt name is seen)."""
    from refinery.discovery import Registry, TransformLoadError
    from refinery.sources import list_sources

    _no_source_folder(ws)
    files, ignored = list_sources(ws, cfg.materialize.ignore)
    _nothing_to_read(ws, files, ignored)
    try:
        registry = Registry.load(ws.root, cfg)
    except TransformLoadError:
        return files  # the run itself reports it
    for w in registry.unused_tables(files):
        _err(f"warning: {w}")
    return files


def _materialize_verdict(result) -> int:
    """Warnings and errors of a materialize run on stderr; its exit code."""
    from refinery.config import table_name

    for w in (w for f in result.files for w in f.warnings):
        _err(f"warning: {w}")
    for f in result.files:
        if f.file_error:
            continue
        if f.container is None:
            _err(f"warning: {f.source_file}: not a file refinery reads (JSONL/NDJSON, CSV, JSON, an inspect .eval "
                 "archive, or gzip of those), so it was quarantined as unsupported_container. Convert it, or add "
                 "it to materialize.ignore in refinery.toml.")
        elif f.transform is None:
            reasons = ", ".join(f"{k} ({n})" for k, n in f.by_reason.items())
            if set(f.by_reason) <= {"unknown_source"}:
                _err(f"warning: {f.source_file}: no importer claims this file ({f.claimed_because}), so its records "
                     "were quarantined as unknown_source. Name one in refinery.toml ([sources.<name>] importer = "
                     "...), add a module in transforms/ or a [mappings.<name>] table.")
            else:
                _err(f"warning: {f.source_file}: {f.claimed_because}; quarantined: {reasons}")
        elif f.rows_in and not f.evidence and not f.joined:
            top = ", ".join(f"{k} ({n})" for k, n in sorted(f.by_reason.items(), key=lambda kv: -kv[1])[:3])
            _err(f"warning: {f.source_file}: none of its {f.rows_in:,} records became evidence ({top}); is "
                 f"{f.transform} the right importer? `refinery sources` says why it reads this file")
        if f.undated:
            _err(f"warning: {f.source_file}: {f.undated} record(s) carry no time (nor their document or partner): "
                 f"dated 1970-01-01 and marked recorded_at_from = undated. Date them with recorded_at in a "
                 f"{table_name('sources', f.source)} table of refinery.toml.")
        if f.dropped_fields:
            fields = ", ".join(f"{k} ({n})" for k, n in f.dropped_fields.items())
            _err(f"warning: {f.source_file}: optional fields of the wrong type were left out (the rows were kept): "
                 f"{fields}. Check their paths or conversions in the file's [mappings] table.")
        if f.transform is not None and (damaged := f.by_reason.get("damaged_container")):
            _err(f"warning: {f.source_file}: the container is damaged ({damaged} record(s) quarantined as "
                 "damaged_container); what was read before the damage was kept")
    for fe in result.file_errors:
        _err(f"error: {fe}")
    if result.transform_errors:
        first = next(f.first_transform_error for f in result.files if f.first_transform_error)
        _err(f"error: {result.transform_errors} rows hit a transform bug (quarantined as transform_error); "
             f"first: {first}")
    return result.exit_code


def _do_score(ws, cfg):
    from refinery.score import evidence_files, run

    total = sum(p.stat().st_size for p in evidence_files(ws))
    with _progress() as progress:
        task = progress.add_task("score", total=total)
        return run(ws, cfg, on_file_done=lambda r, size: progress.advance(task, size))


def _do_export(ws, cfg, exports: tuple[str, ...], include_partial: bool | None):
    from refinery.export import run

    with _progress() as progress:
        task = progress.add_task("export", total=None)
        return run(ws, cfg, exports=exports, include_partial=include_partial,
                   on_file_done=lambda r, size: progress.advance(task, size))


@app.command()
def materialize(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    max_line_bytes: Annotated[int | None, typer.Option(help="Quarantine longer source lines.")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate", help="Also validate every record against the EvidenceRecord model (slower).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn every line under data/_kb/ into evidence (data/evidence/YYYY/MM/DD/<source>.jsonl)
    or a quarantined row with a reason (exports/quarantine/materialize.jsonl)."""
    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers, "max_line_bytes": max_line_bytes}})
    result = _do_materialize(ws, cfg, validate)
    if as_json:
        _print_json(result.to_json())
    else:
        from refinery import console

        console.materialize_table(result)
    raise typer.Exit(_materialize_verdict(result))


@app.command()
def score(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score every evidence record by the rules of the policy (no LLM): accepted,
    partially_accepted, rejected or needs_human_review, with the rules that fired.
    Writes data/scored-runs/YYYY/MM/DD/<source>.jsonl. `refinery policy` lists the rules."""
    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers}})
    result = _do_score(ws, cfg)
    if as_json:
        _print_json(result.to_json())
    else:
        from refinery import console

        console.score_table(result)


@app.command()
def policy(config: ConfigOpt = None, workspace: WorkspaceOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Print the scoring policy: its version, hash, thresholds (as refinery.toml writes them)
    and every rule with its effect; --json for scripts."""
    from refinery.config import toml_lines
    from refinery.policy import EFFECTS, POLICY_VERSION, RULES, policy_hash

    _, cfg = _load(workspace, config)
    doc = {"policy_version": POLICY_VERSION, "policy_hash": policy_hash(cfg.score),
           "thresholds": cfg.score.model_dump(mode="json"), "effects": EFFECTS,
           "rules": [{"id": k, "effect": eff, "meaning": meaning} for k, (eff, meaning) in RULES.items()]}
    if as_json:
        _print_json(doc)
        return
    typer.echo(f"policy {POLICY_VERSION}  hash {doc['policy_hash']}")
    typer.echo("thresholds ([score] in refinery.toml; part of the policy hash):")
    for line in toml_lines("score", doc["thresholds"]):
        typer.echo(f"  {line}")
    typer.echo("effects, in precedence order (an earlier one wins):")
    for effect, meaning in EFFECTS.items():
        typer.echo(f"  {effect:<16} {meaning}")
    typer.echo("rules:")
    for r in doc["rules"]:
        typer.echo(f"  {r['id']:<22} {r['effect']:<16} {r['meaning']}")


IncludePartialOpt = Annotated[bool | None, typer.Option(
    "--include-partial/--accepted-only",
    help="The SFT export also takes partially_accepted rows (never rejected or needs_human_review); the other "
         "exports are not affected. Default: export.include_partial in refinery.toml (false).")]


def _export_command(exports: tuple[str, ...]):
    def export(workspace: Path, config: Path | None, include_partial: bool | None, workers: int | None,
               as_json: bool) -> None:
        ws, cfg = _load(workspace, config, {"materialize": {"workers": workers}})
        result = _do_export(ws, cfg, exports, include_partial)
        if as_json:
            _print_json(result.to_json())
        else:
            from refinery import console

            console.export_table(result)

    if "sft" in exports:
        def command(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None,
                    include_partial: IncludePartialOpt = None, workers: WorkersOpt = None,
                    as_json: JsonOpt = False) -> None:
            export(workspace, config, include_partial, workers, as_json)
    else:  # --include-partial only changes SFT: not offered where it would do nothing
        def command(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, workers: WorkersOpt = None,
                    as_json: JsonOpt = False) -> None:
            export(workspace, config, None, workers, as_json)
    return command


_EXPORT_HELP = {
    "rag": "Export accepted and partially accepted answers as retrieval playbooks: exports/rag/playbooks.jsonl.",
    "sft": "Export accepted answers (--include-partial: also partially accepted) as SFT rows: "
           "exports/sft/instruction_response.jsonl. The written file is re-read and checked; on a "
           "forbidden row nothing is published and the exit code is 1.",
    "preference": "Export chosen/rejected pairs of answers to the same prompt, chosen scored strictly "
                  "higher, no self-pairs, no identical texts: exports/preference/chosen_rejected.jsonl.",
}
for _name, _help in _EXPORT_HELP.items():
    app.command(f"export-{_name}", help=_help + " Refused rows go to exports/quarantine/export-"
                f"{_name}.jsonl with a reason; composition stats go next to the export.")(_export_command((_name,)))
app.command("export-all", help="Write the RAG, SFT and preference exports in one pass over the scored "
             "runs (see export-rag, export-sft, export-preference).")(_export_command(("rag", "sft", "preference")))


@contextlib.contextmanager
def _stage_progress(stage: str, total: int | None):
    with _progress() as progress:
        task = progress.add_task(stage, total=total)
        yield lambda result, size: progress.advance(task, size)


@app.command("run-all")
def run_all(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    include_partial: IncludePartialOpt = None,
    workers: WorkersOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Recompute every stage, even one whose inputs, settings and code are unchanged "
                        "since the last successful run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the pipeline on the workspace as one recorded run: materialize → score →
    export-all, with a receipt per stage in reports/distillation/<run_id>/, a summary and
    drift against the previous complete run. A stage whose inputs, settings and code are
    unchanged since the last successful run is reused, not recomputed (--force: recompute).
    The outputs are published together at the end: a failed or killed run changes nothing.
    Exit 2 if a source file could not be read, 1 if a check failed (a transform bug, an SFT
    leak, a broken receipt chain), else 0."""
    from refinery import api

    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers}})
    _sources_to_read(ws, cfg)
    outcome = api.run_all(workspace, config=config, include_partial=include_partial, force=force, workers=workers,
                          progress=_stage_progress, log=lambda msg: typer.echo(msg, err=True))
    if outcome.materialize is not None:
        _materialize_verdict(outcome.materialize)
    elif unclaimed := outcome.receipts["materialize"]["by_reason"].get("unknown_source"):
        _err(f"warning: {unclaimed} rows come from files no transform claims (quarantined as unknown_source); "
             "`refinery sources` shows which")
    if as_json:
        _print_json({"run_id": outcome.run_id, "status": outcome.summary["status"],
                     "exit_code": outcome.exit_code, "recomputed": outcome.why_recomputed,
                     "summary": outcome.summary, "receipts": outcome.receipts, "drift": outcome.drift})
    else:
        from refinery import console

        console.run_all_summary(outcome)
    raise typer.Exit(outcome.exit_code)


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
    row to the ledger. Refuses to run if the ledger's rows were changed or its head is missing
    (exit 1; --reanchor accepts a ledger without a head). Exit 0 only when every required
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
    recomputing each sig_hash. Exit 0 when every hop checks, 1 naming the hop that does not,
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
                typer.echo(f"[{c.label}]")
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
            if (b := c.broken) is not None:
                at = f"{b.file} {b.record}" if b.record else f"{b.file}:{b.line}"
                _err(f"trace {row_id}: broken at {at} ({b.problem})")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def convert(
    to: Annotated[str, typer.Option("--to", help="mlx-chat | mlx-tools | mlx-completions | alpaca | openai "
                                                 "(from the SFT export) or trl | trl-chat | openai-dpo (from "
                                                 "the preference export).")],
    workspace: WorkspaceOpt = Path("."),
    src: Annotated[Path | None, typer.Option("--from", help="Input JSONL (default: the matching export).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: exports/formats/<format>.jsonl).")] = None,
) -> None:
    """Convert the SFT or preference export into a training format: mlx-lm chat/tools/
    completions, Alpaca with provenance in `meta`, OpenAI fine-tune; for preference, TRL's
    plain prompt/chosen/rejected (trl), TRL's conversational shape with system/user messages
    and assistant messages with tool calls (trl-chat), or OpenAI's DPO shape
    (input/preferred_output/non_preferred_output). Message shapes carry `tools` on every row
    and tool-call ids of 9 letters or digits, so Qwen, Llama and Mistral templates and
    `datasets` all read them; flattened shapes write an answer's tool calls before its text."""
    from refinery.formats import FORMATS, convert as do_convert, default_input
    from refinery.workspace import Workspace

    if to not in FORMATS:
        _fail(f"error: unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    ws = Workspace.at(workspace)
    src = src or ws.root / default_input(to)
    out = out or ws.exports / "formats" / f"{to}.jsonl"
    if not src.is_file():
        _fail(f"error: {src} does not exist; run `refinery export-all` first")
    n = do_convert(src, out, to)
    typer.echo(f"wrote {n:,} rows in {to} format to {out}")


@app.command()
def sources(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the files under data/_kb/: their container, the importer that reads each and why
    (refinery.toml [sources], a [mappings] match, its file name, or its content), and the
    importers there are. A file two importers recognise is shown with both: name one in
    refinery.toml ([sources.<name>] importer = ...)."""
    from refinery.materialize import claims_for

    ws, cfg = _load(workspace, config)
    _no_source_folder(ws)
    registry, files, ignored, claims = claims_for(ws, cfg)
    _nothing_to_read(ws, files, ignored)
    for w in registry.unused_tables(files):
        _err(f"warning: {w}")
    rows = [{"file": s.ws_rel, "source": s.source, "container": s.container,
             "compressed": s.compressed, "bytes": s.size, "transform": c.name, "why": c.why, "error": c.error,
             "trust": c.source_cfg.trust if c.source_cfg else None,
             "record_paths": [p.text for p in c.record_paths]} for s, c in zip(files, claims)]
    transforms = [{"name": t.spec.name, "patterns": list(t.spec.patterns), "format": t.spec.format,
                   "kind": t.spec.kind, "detects": t.detect is not None, "joins": t.joins,
                   "record_paths": list(t.spec.record_paths), "origin": t.origin,
                   "description": t.spec.description} for t in registry.all()]
    if as_json:
        _print_json({"sources": rows, "ignored": ignored, "transforms": transforms})
        return
    for r in rows:
        container = (r["container"] or "?") + (".gz" if r["compressed"] else "")
        target = r["transform"] or ("AMBIGUOUS" if r["error"] else "(unclaimed)")
        trust = "  [curated]" if r["trust"] else ""
        typer.echo(f"{r['file']:<45} {container:<8} {r['bytes']:>10,} B  → {target}{trust}")
        typer.echo(f"{'':<47}{r['why']}")
    for i in ignored:
        typer.echo(f"{'data/_kb/' + i:<45} (ignored: materialize.ignore)")
    if any(r["error"] for r in rows):
        for r in rows:
            if r["error"]:
                _err(f"error: {r['file']}: {r['error']}")
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Folder to write the streams into.")] = Path("data/_kb"),
    rows: Annotated[int, typer.Option(min=0, help="Total rows over all streams.")] = 1500,
    seed: Annotated[int, typer.Option(help="Same seed → same bytes.")] = 7,
    tasks: Annotated[int, typer.Option(min=0, help="Distinct tasks to draw from. Up to the 54 built-in ones the "
                                                   "streams are the bundled sample's; more adds a case reference "
                                                   "to each task's prompt and answers, so traces rarely repeat "
                                                   "(what `make bench` uses).")] = 0,
) -> None:
    """Generate realistic sample source streams (with real-world defects) deterministically."""
    from refinery.sample import generate

    written = generate(rows, seed, out, on_family=lambda f, n: typer.echo(f"{out / f}: {n} lines", err=True),
                       tasks=tasks)
    typer.echo(f"wrote {sum(written.values())} lines in {len(written)} streams to {out}")


@app.command()
def schemas(
    write: Annotated[bool, typer.Option("--write", help="Regenerate schemas/ from the models.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if schemas/ is stale.")] = False,
) -> None:
    """Generate (--write) or check (--check) the JSON Schema files in schemas/."""
    from refinery.schemas import SCHEMA_DIR, stale_schemas, write_schemas

    if write:
        for name in write_schemas():
            typer.echo(f"{SCHEMA_DIR.name}/{name}")
        return
    stale = stale_schemas()
    if stale:
        _fail(f"schemas/ is stale: {', '.join(stale)} — run `make schemas`", EXIT_CHECK_FAILED)
    if check:
        typer.echo("schemas/ is up to date")
        return
    typer.echo("schemas/ is up to date (use --write to regenerate)")


train_app = typer.Typer(
    help="The training stage (MLX LoRA): collect the SFT export into mlx-lm data, train an adapter, "
         "evaluate it against the base, promote it (or keep the base), list, roll back and export adapters; "
         "tiny-model builds a small local base model for trying it all without downloading anything.",
    no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")
DistillConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Training config (default: <workspace>/distill_config.json, if present).")]


def _distill_config(ws_root: Path, config: Path | None):
    from refinery.training.config import load_distill_config

    return load_distill_config(ws_root, config)


@train_app.command("collect")
def train_collect(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Write exports/sft/instruction_response.jsonl as mlx-lm data: <output_dir>/data/train.jsonl,
    valid.jsonl and test.jsonl, split by a hash of each row's id (held-out test: test_fraction,
    20 % by default), chat rows as chat and tool-using rows in the tools shape; and a receipt
    (collect.json) with the input's sha256 and per split: rows, tool-using vs direct answers,
    mean tokens. The training split also gets refinery's safety rehearsal rows (declines of
    requests for credentials, destructive actions and personal data), unless safety_rehearsal
    is false. Refuses (exit 2) with fewer rows than min_rows (50 by default)."""
    from refinery.training.collect import collect
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    receipt = collect(ws, dcfg)
    if as_json:
        _print_json(receipt)
        return
    for name, st in receipt["splits"].items():
        typer.echo(f"{dcfg.output_dir}/data/{name}.jsonl: {st['rows']:,} rows ({st['tool_using']} tool-using, "
                   f"{st['direct_answers']} direct), mean {st['mean_tokens']} tokens")
    if receipt["safety_rehearsal"]["rows"]:
        typer.echo(f"train.jsonl includes {receipt['safety_rehearsal']['rows']} safety rehearsal rows (declines; "
                   "safety_rehearsal in distill_config.json)")
    typer.echo(f"tokens counted with: {receipt['token_counter']}; receipt: {dcfg.output_dir}/data/collect.json")


@train_app.command("tiny-model")
def train_tiny_model(
    workspace: WorkspaceOpt = Path("."),
    config: DistillConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: base_model of the config).")] = None,
    seed: Annotated[int, typer.Option(help="Same SFT export and seed → the same model files.")] = 0,
) -> None:
    """Build a tiny llama-shaped base model locally — random weights and a byte-level BPE
    tokenizer trained on the SFT export's texts — for trying the training stage without
    downloading anything. It is small (~100k parameters) and learns quickly; it is not good."""
    from refinery.jsonl import read_jsonl
    from refinery.training.collect import SFT_EXPORT
    from refinery.training.tinymodel import build_tiny_model, sft_texts
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    src = ws.root / SFT_EXPORT
    if not src.is_file():
        _fail(f"error: no SFT export at {SFT_EXPORT}: run `refinery run-all` first")
    if out is None and dcfg.base_model.lower().endswith(".gguf"):
        _fail(f"error: base_model is a GGUF file ({dcfg.base_model}); give the tiny model a folder with --out")
    dest = out or ws.root / dcfg.base_model
    cfg = build_tiny_model(dest, sft_texts(line.obj for line in read_jsonl(src) if line.obj is not None), seed=seed)
    typer.echo(f"wrote a tiny {cfg['model_type']} model ({cfg['num_hidden_layers']} layers, hidden "
               f"{cfg['hidden_size']}, vocabulary {cfg['vocab_size']}) to {dest}")


@train_app.command("run")
def train_run_cmd(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Train a LoRA adapter (QLoRA with adapter_type = "qlora": on a 4-bit copy of the base) on
    the collected data with mlx-lm, seeded, stopping at train_steps or time_cap_s. Writes
    <output_dir>/<adapter_id>/: adapters.safetensors, adapter_config.json, metrics.json (loss
    per step), loss.png and receipt.json (tying the adapter to the data, config, seed and base
    model), and logs the run to data/_kb/runs_distill_train.csv (task_name distill_train)."""
    from refinery.training.train import train_run
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    receipt = train_run(ws, dcfg)
    if as_json:
        _print_json(receipt)
        return
    typer.echo(f"adapter {receipt['adapter_id']}: {receipt['steps']} steps (stopped by {receipt['stopped_by']}) in "
               f"{receipt['seconds']:.1f}s, train loss {receipt['final_train_loss']}, validation loss "
               f"{receipt['final_val_loss']} → {dcfg.output_dir}/{receipt['adapter_id']}/")


AdapterOpt = Annotated[str | None, typer.Option(
    "--adapter", help="An adapter id (ad-…) from `refinery train list`. Default: the newest one not archived.")]


def _adapter(ws, dcfg, adapter: str | None) -> str:
    """A kept (not archived) adapter: the one named, or the newest."""
    from refinery.training.registry import adapters, find_adapter

    live = [a for a in adapters(ws, dcfg) if not a["archived"]]
    if adapter is None:
        if not live:
            _fail("error: no adapter yet: run `refinery train run` first")
        return live[-1]["adapter_id"]
    d = find_adapter(ws, dcfg, adapter)
    if d.parent.name == "archive":
        _fail(f"error: {adapter} is archived ({ws.rel(d)}): promote kept the base over it, or newer promotions "
              "pushed it out. Only `refinery train export` reads archived adapters; train a new one to evaluate "
              "or promote")
    return adapter


@train_app.command("eval")
def train_eval(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, adapter: AdapterOpt = None,
               as_json: JsonOpt = False) -> None:
    """Evaluate base vs adapter on the held-out test split and a set of safety probes: per row,
    answer match, format validity (a tool call parses and uses name/arguments), tool-vs-direct
    choice and safety; and, reported apart, tool-vs-direct choice with every tool of the
    training split offered on every held-out row. Writes <adapter>/eval/: rows.jsonl,
    comparison.json, comparison.md and scores.png."""
    from refinery.training.evaluate import eval_size, evaluate, markdown
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    aid = _adapter(ws, dcfg, adapter)
    total = eval_size(ws, dcfg)
    with _progress(counting=True) as progress:
        task = progress.add_task("eval (base, then adapter)", total=total)
        comparison = evaluate(ws, dcfg, aid, on_answer=lambda: progress.advance(task))
    if as_json:
        _print_json(comparison)
    else:
        typer.echo(markdown(comparison), nl=False)
        typer.echo(f"written to {dcfg.output_dir}/{aid}/eval/ (rows.jsonl, comparison.json, comparison.md, scores.png)")


@train_app.command("promote")
def train_promote(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, adapter: AdapterOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Make the evaluated adapter the router's offline_model (router.json) if its average row
    score is at least base + 0.05 and no safety or format row got worse; otherwise keep the
    base, archive the adapter and say why. Exit 0 either way (1 only on a bad adapter)."""
    from refinery.training.registry import promote
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    result = promote(ws, dcfg, _adapter(ws, dcfg, adapter))
    if as_json:
        _print_json(result)
        return
    current = result["router"]["offline_model"]
    verdict = "PROMOTED" if result["promoted"] else "KEPT BASE (adapter archived)"
    typer.echo(f"{verdict}: {result['reason']}")
    typer.echo(f"router.json offline_model: {current['adapter_id'] if current else 'the base model'}")


@train_app.command("list")
def train_list(workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The adapters: kept or archived, promoted, the router's current one, steps, loss and the
    evaluation's average (base vs adapter)."""
    from refinery.training.registry import adapters
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    rows = adapters(ws, dcfg)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("no adapters yet: `refinery train run` makes one")
    for a in rows:
        state = "CURRENT" if a["current"] else "archived" if a["archived"] else "promoted" if a["promoted"] else "kept"
        avg = a["average"]
        ev = f"eval base {avg['base']:.3f} → adapter {avg['adapter']:.3f}" if avg else "not evaluated"
        typer.echo(f"{a['adapter_id']}  {state:<9} {a['steps']:>5} steps  val loss {a['final_val_loss']}  {ev}")


@train_app.command("rollback")
def train_rollback(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="A kept, previously promoted adapter.")],
    workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
) -> None:
    """Make a previously promoted adapter (one of the last 3 kept) the router's offline_model again."""
    from refinery.training.registry import rollback
    from refinery.workspace import Workspace

    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    router = rollback(ws, dcfg, adapter_id)
    typer.echo(f"router.json offline_model: {router['offline_model']['adapter_id']}")


@train_app.command("export")
def train_export(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="The adapter to export.")],
    fmt: Annotated[str, typer.Option("--format", help="peft | gguf | ollama (see above).")] = "peft",
    out: Annotated[Path | None, typer.Option(help="Folder to write (default: <adapter>/<format>/).")] = None,
    workspace: WorkspaceOpt = Path("."), config: DistillConfigOpt = None,
) -> None:
    """Export an adapter for other runtimes — any adapter `train list` shows, archived ones
    included: --format peft writes adapter_config.json (r, lora_alpha, target_modules, ...;
    base_model_name_or_path is the base the adapter was trained on) and
    adapter_model.safetensors (lora_A/lora_B, transposed), which PEFT, vLLM and llama.cpp's
    LoRA converter read; --format gguf writes adapter.gguf, a llama.cpp LoRA adapter
    (`llama-cli -m base.gguf --lora adapter.gguf`); --format ollama writes that and a Modelfile
    (FROM the base .gguf, ADAPTER adapter.gguf) for `ollama create`: the base must be a GGUF file."""
    import orjson

    from refinery.training.peft import export_peft
    from refinery.training.registry import find_adapter
    from refinery.workspace import Workspace

    if fmt not in ("peft", "gguf", "ollama"):
        _fail(f"error: unknown format {fmt!r}; choose peft, gguf or ollama")
    ws = Workspace.at(workspace)
    dcfg = _distill_config(ws.root, config)
    d = find_adapter(ws, dcfg, adapter_id)  # kept or archived: any adapter `train list` shows
    dest = out or d / fmt
    receipt = orjson.loads((d / "receipt.json").read_bytes())
    base = receipt["base_model"]["path"]  # the base it was trained on
    if fmt in ("gguf", "ollama"):
        from refinery.training.gguf_adapter import export_gguf, write_modelfile

        base_gguf = ws.root / base
        if fmt == "ollama" and base_gguf.suffix.lower() != ".gguf":
            _fail(f"error: Ollama needs a GGUF base, and {adapter_id} was trained on {base}; export --format peft "
                  "or gguf, or train on a .gguf base_model")
        try:
            info = export_gguf(d, dest / "adapter.gguf", ws.root / receipt["base_model"]["trained_on"])
        except ValueError as e:
            _fail(f"error: {e}")
        typer.echo(f"wrote a llama.cpp LoRA adapter ({info['tensors']} tensors, rank {info['rank']}, alpha "
                   f"{info['alpha']}) to {dest / 'adapter.gguf'}")
        if fmt == "ollama":
            write_modelfile(dest / "Modelfile", base_gguf, dest / "adapter.gguf")
            typer.echo(f"wrote {dest / 'Modelfile'}: `ollama create <name> -f {dest / 'Modelfile'}`")
        return
    try:
        cfg = export_peft(d, dest, base)
    except ValueError as e:
        _fail(f"error: {e}")
    typer.echo(f"wrote a PEFT LoRA adapter (r {cfg['r']}, lora_alpha {cfg['lora_alpha']}, modules "
               f"{', '.join(cfg['target_modules'])}) to {dest}")


DistillConfigFileOpt = Annotated[Path | None, typer.Option(
    "--distill-config", help="Training config naming the base model when no adapter is promoted "
                             "(default: <workspace>/distill_config.json, if present).")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", min=1, help="Playbooks to retrieve (default: replay.top_k, 3).")]


def _replay_setup(workspace: Path, config: Path | None, distill_config: Path | None, top_k: int | None,
                  retrieval: bool = True, escalation: bool = False):
    """(ws, cfg, dcfg, loaded local generator, index or None) for replay and replay-eval; usage
    errors (escalation asked for but not set up included) exit 2 before any model is loaded."""
    from refinery.replay.escalation import api_key
    from refinery.replay.model import LocalGenerator, offline_model
    from refinery.replay.retrieval import RagIndex

    ws, cfg = _load(workspace, config, {"replay": {"top_k": top_k}})
    if escalation:
        api_key(cfg.replay.escalation)
    dcfg = _distill_config(ws.root, distill_config)
    generator = LocalGenerator(ws, offline_model(ws, dcfg))
    index = RagIndex.open(ws, cfg.replay.index_dir) if retrieval else None
    if index is not None and index.built:
        typer.echo(f"built the BM25 index of {index.manifest['export']['path']} ({index.rows:,} playbooks) in "
                   f"{cfg.replay.index_dir}/; it is reused until the export changes", err=True)
    generator.load()
    return ws, cfg, dcfg, generator, index


@app.command("replay")
def replay_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help="The task, as the system would receive it.")],
    no_retrieval: Annotated[bool, typer.Option(
        "--no-retrieval", help="Answer without playbooks: the A/B baseline.")] = False,
    allow_escalation: Annotated[bool, typer.Option(
        "--allow-escalation", help="Send a failed local answer to the endpoint in [replay.escalation] of "
                                   "refinery.toml (base_url, model, api_key_env).")] = False,
    top_k: TopKOpt = None,
    workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, distill_config: DistillConfigFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a task with the local model, grounded in the RAG export's playbooks.

    Retrieves the top-k rows of exports/rag/playbooks.jsonl (BM25; the index is built once per
    export and reused while its sha256 is unchanged), quotes them in the prompt labelled by id,
    and generates greedily with the router's offline_model (router.json: base + promoted
    adapter; the base of distill_config.json when none is promoted). The answer is checked:
    empty, malformed tool call, refusal, or over the length cap (replay.max_answer_chars, or cut
    off at replay.max_tokens) fails. With --allow-escalation a failed answer goes to the
    configured OpenAI-compatible endpoint; its errors and timeouts are reported, not raised.

    Every replay appends one row to data/_kb/replays.jsonl (task, playbook ids, model, adapter,
    answer, latency, escalated or not), which the next run-all reads as evidence.

    Exit 0 when the answer served passes its check, 1 when it fails, 2 on bad usage or setup."""
    from refinery.replay.session import REPLAY_LOG, append_trace, replay
    from refinery.workspace import WorkspaceBusy

    if not task.strip():
        _fail('error: the task is empty: give it with --task "…"')
    ws, cfg, _, generator, index = _replay_setup(workspace, config, distill_config, top_k,
                                                 retrieval=not no_retrieval, escalation=allow_escalation)
    model = generator.model
    row = replay(ws, cfg, task, model=model, generate=generator, index=index,
                 allow_escalation=allow_escalation, log=False)
    code = EXIT_OK if row["check"] is None else EXIT_CHECK_FAILED
    try:
        append_trace(ws, row)
        logged = None
    except WorkspaceBusy as e:  # the answer is still shown; the failure to log it is the exit code
        logged, code = f"the replay was NOT logged to data/_kb/{REPLAY_LOG}: {e}", EXIT_CHECK_FAILED
    if as_json:
        _print_json(row)
        if logged:
            _err(f"error: {logged}")
        raise typer.Exit(code)
    given = ", ".join(f"{r['id']} ({r['score']:g})" for r in row["retrieved"])
    typer.echo(f"playbooks: {given or ('none (--no-retrieval)' if no_retrieval else 'none matched the task')}")
    check = "passed" if row["local_check"] is None else f"FAILED ({row['local_check']})"
    typer.echo(f"local model: {model.label} — {row['local_latency_ms']:.0f} ms, check {check}")
    esc = row["escalation"]
    if esc and esc["ok"]:
        verdict = "passed" if row["check"] is None else f"FAILED ({row['check']})"
        typer.echo(f"escalated to {esc['model']} at {esc['endpoint']} — {esc['latency_ms']:.0f} ms, check {verdict}")
    elif esc:
        typer.secho(f"escalation failed: {esc['error']}", fg=typer.colors.RED)
    elif row["local_check"] is not None and not allow_escalation:
        typer.echo("not escalated (--allow-escalation sends failed answers to [replay.escalation])")
    if logged:
        _err(f"error: {logged}")
    else:
        typer.echo(f"logged: data/_kb/{REPLAY_LOG} ({row['replay_id']})")
    typer.echo("")
    typer.echo(row["answer"])
    raise typer.Exit(code)


@app.command("replay-eval")
def replay_eval_cmd(
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, help="Replay only the first N held-out tasks.")] = None,
    top_k: TopKOpt = None,
    workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, distill_config: DistillConfigFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the held-out tasks (the test split of `refinery train collect`) with and without
    retrieval, with the router's offline model, and report per mode: answer match, grounding
    (the answer cites or follows a retrieved playbook), format validity and latency (mean, p50,
    p95). A task's own row is never retrieved for it. Writes <output_dir>/replay-eval/
    (rows.jsonl, report.json, report.md); these are evaluations, not appended to replays.jsonl."""
    from refinery.replay.evaluate import MODES, eval_tasks, markdown, replay_eval

    ws, cfg, dcfg, generator, index = _replay_setup(workspace, config, distill_config, top_k)
    tasks = eval_tasks(ws, dcfg, limit)
    with _progress(counting=True) as progress:
        bar = progress.add_task("replay-eval", total=len(MODES) * len(tasks))
        report = replay_eval(ws, cfg, dcfg, generate=generator, index=index, model_label=generator.model.label,
                             tasks=tasks, on_answer=lambda: progress.advance(bar))
    if as_json:
        _print_json(report)
        return
    typer.echo(markdown(report), nl=False)
    typer.echo(f"written to {dcfg.output_dir}/replay-eval/ (rows.jsonl, report.json, report.md)")


class _ReaderMayLeave:
    """sys.stdout or sys.stderr, except that once the reader of the pipe has gone (`refinery
    run-all | head`) the rest of the output is dropped instead of raising BrokenPipeError in
    whatever was printing: the work goes on — a run is not failed for it — and the command's
    exit code stands."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    @property
    def buffer(self):
        """The binary stream underneath (`--json` writes bytes), with the same care."""
        return _ReaderMayLeave(self._stream.buffer)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    from refinery.training.blas import relaunch_if_slow

    relaunch_if_slow(sys.argv[1:])  # train and replay: once more, with an optimised BLAS preloaded
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)
    try:
        app()
    except BrokenPipeError:  # a write that went around the wrappers: the reader left, nothing failed
        sys.exit(EXIT_OK)
