"""`refinery convert`, `sources`, `sample` and `schemas`: formats in and out, and the sample data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refinery.cli.common import ConfigOpt, JsonOpt, WorkspaceOpt, _err, _fail, _load, _print_json, app
from refinery.cli.pipeline import _nothing_to_read
from refinery.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED


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
    from refinery.api import source_folder
    from refinery.materialize import claims_for

    ws, cfg = _load(workspace, config)
    source_folder(ws)
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
