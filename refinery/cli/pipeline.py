"""`refinery materialize`, `score`, `policy`, the exports and `run-all`: the pipeline's stages."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import (
    ConfigOpt, JsonOpt, ReportOpt, WorkersOpt, WorkspaceOpt, _err, _fail, _load, _print_json, _progress, _write_report,
    app,
)
from refinery.exporters import BY_NAME, EXPORTERS, NAMES


def _do_materialize(ws, cfg, validate: bool):
    from refinery.materialize import run

    sources = _sources_to_read(ws, cfg)
    with _progress() as progress:
        task = progress.add_task("materialize", total=sum(s.size for s in sources))
        return run(ws, cfg, validate=validate, on_file_done=lambda r, size: progress.advance(task, size))


def _nothing_to_read(ws, files, ignored) -> None:
    if not files:
        also = f" ({len(ignored)} file(s) there are ignored: materialize.ignore)" if ignored else ""
        _err(f"warning: {ws.kb} holds no source files{also}, so there is nothing to read. Put your trace files "
             "there (JSONL, CSV, JSON, inspect .eval, or gzip of those; any names, subfolders allowed), or "
             f"write the sample there with `refinery sample --out {ws.kb}`")


def _sources_to_read(ws, cfg):
    """Before a run: the source files, with what is wrong said first — no data/_kb/ (exit 2),
    nothing in it, refinery.toml tables that match no file (so a misspelt name is seen)."""
    from refinery.api import source_folder
    from refinery.discovery import Registry, TransformLoadError
    from refinery.sources import list_sources

    source_folder(ws)
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

    if any(BY_NAME[e].partial_option for e in exports):
        def command(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None,
                    include_partial: IncludePartialOpt = None, workers: WorkersOpt = None,
                    as_json: JsonOpt = False) -> None:
            export(workspace, config, include_partial, workers, as_json)
    else:  # --include-partial only changes SFT: not offered where it would do nothing
        def command(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, workers: WorkersOpt = None,
                    as_json: JsonOpt = False) -> None:
            export(workspace, config, None, workers, as_json)
    return command


for _x in EXPORTERS:
    app.command(f"export-{_x.name}", help=_x.summary + " Refused rows go to exports/quarantine/ with a reason: "
                "export.jsonl (refused on reading: a category it does not take, a missing text, a secret; one "
                f"record names every export that refused the row) and export-{_x.name}.jsonl (refused while "
                "merging); composition stats go next to the export.")(_export_command((_x.name,)))
app.command("export-all", help=f"Write every export ({', '.join(NAMES)}) in one pass over the scored runs "
             f"(see {', '.join(f'export-{e}' for e in NAMES)}).")(_export_command(NAMES))


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
    report: ReportOpt = None,
    executor: Annotated[str | None, typer.Option(
        "--executor", metavar="local|ray",
        help="Where the per-partition work runs: this machine's process pool (local, the default) or Ray "
             "tasks (ray: needs `pip install 'refinery[ray]'`). The outputs and receipt hashes are the same. "
             "Default: [executor] kind in refinery.toml.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", metavar="ADDR",
        help="With --executor ray: a running cluster's address (ray://head:10001); without it, a Ray "
             "instance is started on this machine for the run. The workspace must be on a filesystem "
             "every node mounts at the same path.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the pipeline on the workspace as one recorded run: materialize → score →
    export-all, with a receipt per stage in reports/distillation/<run_id>/, a summary and
    drift against the previous complete run. A stage whose inputs, settings and code are
    unchanged since the last successful run is reused, not recomputed (--force: recompute).
    The outputs are published together at the end: a failed or killed run changes nothing.
    Then it writes the run's page, reports/distillation/<run_id>/report.html (`refinery
    report`), unless every stage was reused or --no-report.
    Exit 2 if a source file could not be read, 1 if a check failed (a transform bug, an SFT
    leak, a broken receipt chain), else 0."""
    from refinery import api

    if executor is not None and executor not in ("local", "ray"):
        _fail(f"--executor {executor!r}: choose local or ray")
    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers}})
    _sources_to_read(ws, cfg)
    outcome = api.run_all(workspace, config=config, include_partial=include_partial, force=force, workers=workers,
                          executor=executor, ray_address=ray_address, progress=_stage_progress,
                          log=lambda msg: typer.echo(msg, err=True))
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
    if outcome.summary["status"] == "complete":
        if not any(r["reused_from"] is None for r in outcome.receipts.values()):
            _err("nothing was recomputed: `refinery report` writes this run's page")
        else:
            _write_report(ws, outcome.run_id, report)
    raise typer.Exit(outcome.exit_code)
