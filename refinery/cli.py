"""The `refinery` command line. Exit codes: 0 ok, 1 a check failed, 2 bad usage or input.

Stage modules are imported inside the commands, so `refinery --help` stays fast and never
imports the training stack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

app = typer.Typer(
    name="refinery",
    help="Distil an LLM system's execution traces into evidence, scored runs and training data.\n\n"
         "Exit codes: 0 ok, 1 a check failed, 2 bad usage or input.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

WorkspaceOpt = Annotated[Path, typer.Option(
    "--workspace", "-w", envvar="REFINERY_WORKSPACE", file_okay=False,
    help="Workspace root: holds data/_kb/, refinery.toml and the outputs.")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Config file (default: <workspace>/refinery.toml, if present).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]


def _err(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)


def _fail(msg: str, code: int = EXIT_BAD_INPUT):
    _err(msg)
    raise typer.Exit(code)


def _load(workspace: Path, config: Path | None, overrides: dict[str, dict[str, Any]] | None = None):
    from refinery.config import ConfigError, load_config
    from refinery.workspace import Workspace

    if not workspace.is_dir():
        _fail(f"workspace {workspace} does not exist")
    ws = Workspace.at(workspace)
    try:
        cfg = load_config(ws.root, config, overrides)
    except ConfigError as e:
        _fail(f"error: {e}")
    return ws, cfg


def _print_json(obj: Any) -> None:
    import orjson

    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    sys.stdout.flush()


def _progress():
    """A progress bar on stderr, shown only on a terminal (CI logs stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


def _run_materialize(ws, cfg, validate: bool, as_json: bool) -> int:
    from refinery.discovery import TransformLoadError
    from refinery.materialize import run
    from refinery.sources import list_sources
    from refinery.workspace import WorkspaceBusy

    sources, _ = list_sources(ws, cfg.materialize.ignore)
    if not ws.kb.is_dir():
        _fail(f"error: no source folder {ws.kb} — put JSONL/CSV streams there, or run `refinery sample`")
    total = sum(s.size for s in sources)
    with _progress() as progress:
        task = progress.add_task("materialize", total=total)
        try:
            result = run(ws, cfg, validate=validate,
                         on_file_done=lambda r, size: progress.advance(task, size))
        except (TransformLoadError, WorkspaceBusy) as e:
            _fail(f"error: {e}")
    if as_json:
        _print_json(result.to_json())
    else:
        _materialize_table(result)
    for w in (w for f in result.files for w in f.warnings):
        _err(f"warning: {w}")
    unknown = [f.source_file for f in result.files if f.transform is None and not f.file_error]
    for u in unknown:
        _err(f"warning: {u}: no transform claims this file, so its rows were quarantined as "
             "unknown_source. Add a module in transforms/ or a [mappings.<name>] table in refinery.toml.")
    for fe in result.file_errors:
        _err(f"error: {fe}")
    if result.transform_errors:
        first = next(f.first_transform_error for f in result.files if f.first_transform_error)
        _err(f"error: {result.transform_errors} rows hit a transform bug (quarantined as transform_error); "
             f"first: {first}")
    if result.file_errors:
        return EXIT_BAD_INPUT
    if result.transform_errors:
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _materialize_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"materialize — {result.seconds:.2f}s", title_justify="left")
    table.add_column("stream (data/_kb/)")
    table.add_column("transform")
    for col in ("rows in", "evidence", "quarantined"):
        table.add_column(col, justify="right")
    for f in result.files:
        table.add_row(f.source_file.removeprefix("data/_kb/"), f.transform or "(none)", f"{f.rows_in:,}",
                      f"{f.evidence:,}",
                      f"{f.quarantined:,}" if not f.file_error else "unreadable")
    table.add_row("total", "", f"{result.rows_in:,}", f"{result.evidence:,}", f"{result.quarantined:,}",
                  style="bold")
    console.print(table)
    if result.by_reason:
        reasons = Table(title="quarantined, by reason", title_justify="left")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, n in sorted(result.by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            reasons.add_row(reason, f"{n:,}")
        console.print(reasons)
    console.print("evidence: data/evidence/YYYY/MM/DD/<stream>.jsonl   "
                  "quarantine: exports/quarantine/materialize.jsonl")


@app.command()
def materialize(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0 = one per core).")] = None,
    max_line_bytes: Annotated[int | None, typer.Option(help="Quarantine longer source lines.")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate", help="Also validate every record against the EvidenceRecord model (slower).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn every line under data/_kb/ into evidence (data/evidence/YYYY/MM/DD/<source>.jsonl)
    or a quarantined row with a reason (exports/quarantine/materialize.jsonl)."""
    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers, "max_line_bytes": max_line_bytes}})
    raise typer.Exit(_run_materialize(ws, cfg, validate, as_json))


@app.command("run-all")
def run_all(
    workspace: WorkspaceOpt = Path("."),
    config: ConfigOpt = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0 = one per core).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the pipeline on the workspace: materialize (later stages build on it)."""
    ws, cfg = _load(workspace, config, {"materialize": {"workers": workers}})
    raise typer.Exit(_run_materialize(ws, cfg, False, as_json))


@app.command()
def sources(workspace: WorkspaceOpt = Path("."), config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the source files under data/_kb/ and the transform that claims each."""
    from refinery.discovery import Registry, TransformLoadError
    from refinery.sources import list_sources

    ws, cfg = _load(workspace, config)
    try:
        registry = Registry.load(ws.root, cfg)
        files, ignored = list_sources(ws, cfg.materialize.ignore)
        rows = [{"file": s.ws_rel, "source": s.source, "format": s.format, "bytes": s.size,
                 "transform": (t.spec.name if (t := registry.resolve(s.kb_rel)) else None)} for s in files]
    except TransformLoadError as e:
        _fail(f"error: {e}")
    transforms = [{"name": t.spec.name, "patterns": list(t.spec.patterns), "format": t.spec.format,
                   "kind": t.spec.kind, "origin": t.origin} for t in registry.all()]
    if as_json:
        _print_json({"sources": rows, "ignored": ignored, "transforms": transforms})
        return
    for r in rows:
        typer.echo(f"{r['file']:<45} {r['format']:<6} {r['bytes']:>10,} B  → {r['transform'] or '(unclaimed)'}")
    for i in ignored:
        typer.echo(f"{'data/_kb/' + i:<45} (ignored: not a source stream)")


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Folder to write the streams into.")] = Path("data/_kb"),
    rows: Annotated[int, typer.Option(min=0, help="Total rows over all streams.")] = 1500,
    seed: Annotated[int, typer.Option(help="Same seed → same bytes.")] = 7,
) -> None:
    """Generate realistic sample source streams (with real-world defects) deterministically."""
    from refinery.sample import generate

    written = generate(rows, seed, out, on_family=lambda f, n: typer.echo(f"{out / f}: {n} lines", err=True))
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


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `refinery ... | head` is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
