"""The command line's shared parts: the command group (which maps errors to exit codes), the
options every command takes, and the helpers commands use to load a workspace and print."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from refinery.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, RefineryError


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


def command_group(name: str, help: str) -> typer.Typer:
    """A group of commands under `refinery <name> …`, its help shown as the app's is."""
    group = typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(group, name=name)
    return group

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




ReportOpt = Annotated[bool | None, typer.Option(
    "--report/--no-report", help="Write the run's page, reports/distillation/<run_id>/report.html, at the end "
                                 "(default: yes, unless REFINERY_REPORT=0).")]


def _write_report(ws: Any, run_id: str | None, wanted: bool | None) -> None:
    """Write a run's page and say where (on stderr); a page that cannot be drawn is a warning,
    never the command's failure."""
    import os

    if wanted is False or (wanted is None and os.environ.get("REFINERY_REPORT") == "0"):
        return
    from refinery.report import build

    try:
        _err(f"report page: {build(ws, run_id)}")
    except Exception as e:  # the page is an extra: the command's outcome stands
        _err(f"warning: no report page: {type(e).__name__}: {e}")
