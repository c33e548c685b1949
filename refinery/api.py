"""refinery as a library: what the commands do, for scripts and tests, without the CLI.

    from refinery import api

    outcome = api.run_all("path/to/workspace")          # materialize → score → exports, recorded
    print(outcome.summary["overall_hash"], outcome.exit_code)
    result = api.audit("path/to/workspace", rerun=False)
    assert result.ok, [c.problems for c in result.checks if not c.ok]

Every function takes the workspace folder (holding data/_kb/ and, if present, refinery.toml)
and returns the result object the command prints. Errors a user can meet are raised as
refinery.errors.RefineryError (a CheckFailed where a check failed); the CLI maps them to its
exit codes, a script catches that one class. Nothing here prints: pass `log` for run-all's
notes (which stages were reused and why).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refinery.errors import RefineryError

if TYPE_CHECKING:
    from refinery.audit import AuditResult
    from refinery.config import Config
    from refinery.invariants import Check
    from refinery.review import Imported, Queue
    from refinery.runs import Progress, RunOutcome
    from refinery.trace import Trace
    from refinery.workspace import Workspace

__all__ = ["open_workspace", "source_folder", "run_all", "audit", "acceptance", "trace", "convert", "review_export",
           "review_import"]


def open_workspace(workspace: str | Path = ".", config: str | Path | None = None,
                   overrides: dict[str, dict[str, Any]] | None = None) -> tuple[Workspace, Config]:
    """The workspace and its configuration (`config`, else <workspace>/refinery.toml if present,
    else the defaults; `overrides` as {section: {key: value}}, None values ignored)."""
    from refinery.config import load_config
    from refinery.workspace import Workspace

    if not Path(workspace).is_dir():
        raise RefineryError(f"workspace {workspace} does not exist")
    ws = Workspace.at(workspace)
    return ws, load_config(ws.root, Path(config) if config is not None else None, overrides)


def source_folder(ws: Workspace) -> Path:
    """data/_kb/, the folder a run reads; a RefineryError when it is not there."""
    if not ws.kb.is_dir():
        raise RefineryError(f"no source folder {ws.kb} — put your trace files there, or run `refinery sample`")
    return ws.kb


def run_all(workspace: str | Path = ".", *, config: str | Path | None = None, force: bool = False,
            include_partial: bool | None = None, workers: int | None = None, executor: str | None = None,
            ray_address: str | None = None, log: Callable[[str], None] = lambda msg: None,
            progress: Progress | None = None) -> RunOutcome:
    """One recorded run (refinery.runs): stages whose inputs, settings and code are unchanged are
    reused unless `force`. `outcome.exit_code` is 2 when a source file could not be read.
    `executor`: "local" or "ray" (refinery.executors), over refinery.toml's [executor]."""
    from refinery.runs import _no_progress
    from refinery.runs import run_all as do_run_all

    ws, cfg = open_workspace(workspace, config, {"materialize": {"workers": workers},
                                                 "executor": {"kind": executor, "ray_address": ray_address}})
    source_folder(ws)
    return do_run_all(ws, cfg, include_partial=include_partial, force=force, progress=progress or _no_progress,
                      log=log)


def audit(workspace: str | Path = ".", *, config: str | Path | None = None, rerun: bool = True,
          reanchor: bool = False) -> AuditResult:
    """audit-full: every invariant on the published run, the determinism re-run (unless not
    `rerun`), drift against the baseline ledger; writes its report and, when it passes, the
    ledger row. `result.ok` is the verdict."""
    from refinery.audit import run_audit

    ws, cfg = open_workspace(workspace, config)
    return run_audit(ws, cfg, rerun=rerun, config_path=Path(config) if config is not None else None,
                     reanchor=reanchor)


def acceptance(fixture: str | Path | None = None, *, keep: str | Path | None = None) -> list[Check]:
    """The acceptance gate over its fixture (refinery's own by default): every invariant, run twice."""
    from refinery.acceptance import FIXTURE, run_gate

    return run_gate(Path(fixture) if fixture is not None else FIXTURE, keep=Path(keep) if keep is not None else None)


def trace(workspace: str | Path, row_id: str) -> Trace:
    """Walk an export row, scored run or evidence record back to its source line, re-hashing each hop."""
    from refinery.trace import trace as do_trace

    ws, _ = open_workspace(workspace)
    return do_trace(ws, row_id)


def review_export(workspace: str | Path = ".", *, config: str | Path | None = None) -> Queue:
    """The review queue of the published run: reports/review/queue.jsonl and queue.csv."""
    from refinery.review import export_queue

    ws, cfg = open_workspace(workspace, config)
    ws.try_recover()
    return export_queue(ws, cfg)


def review_import(workspace: str | Path, decisions: str | Path, *, config: str | Path | None = None,
                  reviewer: str | None = None, decided_at: str | None = None) -> Imported:
    """Append the decisions of a filled-in review queue to the human_reviews stream (the next
    run_all applies them); `result.refused` are the lines it could not take, with why."""
    from refinery.review import import_decisions

    ws, cfg = open_workspace(workspace, config)
    ws.try_recover()
    return import_decisions(ws, cfg, Path(decisions), reviewer=reviewer, decided_at=decided_at)


def convert(src: str | Path, dest: str | Path, to: str) -> int:
    """Write an SFT or preference export in a trainer's format (refinery.formats.FORMATS); the rows written."""
    from refinery.formats import convert as do_convert

    if not Path(src).is_file():
        raise RefineryError(f"{src} does not exist; run `refinery export-all` first")
    return do_convert(Path(src), Path(dest), to)
