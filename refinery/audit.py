"""`refinery audit-full`: re-verify everything on disk, re-run the pipeline to prove determinism,
and track drift in an append-only baseline ledger.

    reports/distillation/audit-full-report.md   the checks table and the drift table
    data/_kb/audit_baselines.jsonl              one BaselineRow appended per passing audit

The checks are the on-disk invariants (refinery.invariants: receipts against the files' real
sha256, provenance of every row, accounting, no leaks, schemas, ...) plus a determinism re-run:
the sources, config and transforms are copied into a temporary workspace, run-all runs there,
and its receipt hashes must equal the audited run's. Exit 0 only when every required check holds.

The audited run is the one whose outputs are published (reports/distillation/published.json
names it; refinery.runs.published_run): the report and the output say which and why, and a
pointer to a run folder that is gone fails the audit rather than letting it judge an older run.

The ledger is append-only: each row carries the hash of the one before it (`prev_hash`) and its
own (`row_hash`), so an edited, deleted or reordered row breaks the chain, and the audit
refuses to run until the ledger is restored. The last row's seq and hash are also kept outside
the ledger (the head), so rows cut off its end are caught; a ledger whose head is missing or
damaged is accepted as it stands only by `audit-full --reanchor`, and the row that audit
appends says so. Drift is the move of each tracked metric against the ledger's last row; a
move of more than `DRIFT_WARN_PCT` % is flagged `warn`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery import invariants as inv
from refinery.canonical import sig_hash
from refinery.config import Config
from refinery.errors import CheckFailed, RefineryError
from refinery.invariants import Check, Context
from refinery.transform import now_utc
from refinery.workspace import Workspace

LEDGER = "audit_baselines.jsonl"
REPORT = "audit-full-report.md"
#: The ledger's last row as of the last audit, kept outside it: cutting rows off the end (or
#: deleting the file, or re-hashing the whole chain) is caught against it.
HEAD = "audit-ledger-head.json"
DRIFT_WARN_PCT = 20.0


class LedgerTampered(CheckFailed):
    """The baseline ledger's existing rows were changed, or its end cannot be vouched for (no
    head): the audit refuses to run (exit 1). The message carries the fix."""

    def report(self) -> str:
        return f"AUDIT REFUSED: {self}."


class AuditInputError(RefineryError):
    """The audit cannot run as asked: its ledger head is damaged, or --reanchor was given where
    there is nothing to re-anchor (exit 2). The message carries the fix."""


@dataclass
class AuditResult:
    checks: list[Check]
    metrics: dict[str, float]
    drift: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    """the last ledger row drift was measured against (None: the first audit)"""
    run_id: str | None = None
    """the run audited"""
    why: str = ""
    """why that run"""
    appended: dict[str, Any] | None = None
    report: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "why": self.why,
                "checks": [c.to_json() for c in self.checks], "metrics": self.metrics,
                "drift": self.drift, "baseline_seq": self.baseline["seq"] if self.baseline else None,
                "appended": self.appended, "report": self.report, "notes": self.notes}


# --- the ledger ----------------------------------------------------------------------------


def ledger_path(ws: Workspace) -> Path:
    return ws.kb / LEDGER


def row_hash(row: dict[str, Any]) -> str:
    return sig_hash({k: v for k, v in row.items() if k != "row_hash"})


def head_path(ws: Workspace) -> Path:
    return ws.reports / HEAD


REANCHOR = "refinery audit-full --reanchor"
RESTORE = "The ledger is append-only: restore it from your backup or version control and run again"


def read_ledger(ws: Workspace, *, reanchor: bool = False) -> list[dict[str, Any]]:
    """The ledger's rows, each checked against the chain and the last against the recorded
    head. Raises LedgerTampered naming the line, or AuditInputError for a damaged head.
    `reanchor` accepts the ledger as it stands when its head is missing or damaged (and only
    then: see `reanchor_reason`)."""
    rows = _read_chain(ws)
    ledger, head = ws.rel(ledger_path(ws)), ws.rel(head_path(ws))
    try:
        want = read_head(ws)
    except AuditInputError:
        if reanchor:
            return rows
        raise
    last = rows[-1] if rows else None
    if want is None:
        if last is not None and not reanchor:
            raise LedgerTampered(
                f"{head} is missing, but {ledger} holds {len(rows)} row{'s' if len(rows) > 1 else ''}: nothing "
                f"vouches that row {last['seq']} is where the last audit left the ledger's end (rows cut off the "
                f"end look just like this). Restore {head} from your backup; or, if you know why it is gone "
                f"(reports/ was cleaned), run `{REANCHOR}` to accept the ledger as it stands — the row that audit "
                "appends records the re-anchoring")
        return rows
    if len(rows) >= 2 and (rows[-2]["seq"], rows[-2]["row_hash"]) == (want["seq"], want["row_hash"]):
        # The last audit appended its row (a checked link of the chain) and was stopped — killed,
        # or the disk filled — before it moved the head on: finish that step, as a journal would.
        _write_head(ws, last)
        return rows
    if last is None or (last["seq"], last["row_hash"]) != (want["seq"], want["row_hash"]):
        have = f"ends at row {last['seq']} ({last['row_hash'][:12]}…)" if last else "is empty or missing"
        raise LedgerTampered(
            f"{ledger}: the last audit left row {want['seq']} ({want['row_hash'][:12]}…) at its end, but it "
            f"{have}: rows were removed or rewritten (head recorded in {head}). {RESTORE} (if those rows are "
            f"lost for good, delete {head} and run `{REANCHOR}`; the re-anchoring is recorded in the ledger)")
    return rows


def read_head(ws: Workspace) -> dict[str, Any] | None:
    """The recorded head ({seq, row_hash}), or None when there is none. Raises AuditInputError
    naming the file and what is wrong with it when it is not a head."""
    from refinery.models import LedgerHead
    from refinery.receipts import ReportUnreadable, read_record

    path = head_path(ws)
    try:
        return read_record(path, LedgerHead)
    except ReportUnreadable as e:
        raise AuditInputError(
            f"{ws.rel(path)} is damaged ({e}): it should hold the ledger's last row as "
            f'{{"seq": N, "row_hash": "<sha256>"}}. Restore it from your backup, or run `{REANCHOR}` to accept '
            f"{ws.rel(ledger_path(ws))} as it stands and write a new head — the row that audit appends records "
            "the re-anchoring") from None


def reanchor_reason(ws: Workspace, rows: list[dict[str, Any]]) -> str:
    """Why --reanchor is needed here (it goes into the row the audit appends). AuditInputError
    when it is not: a head that is there and sound leaves nothing to re-anchor, and a ledger
    without rows and without a head is simply new (its first audit anchors it)."""
    head = ws.rel(head_path(ws))
    try:
        sound = read_head(ws) is not None
    except AuditInputError:
        return f"{head} was damaged; the ledger was accepted as it stood " + (
            f"at row {rows[-1]['seq']}" if rows else "(empty)")
    if sound:
        raise AuditInputError(f"nothing to re-anchor: {head} matches the ledger's last row; run `refinery "
                              "audit-full` without --reanchor")
    if not rows:
        raise AuditInputError(f"nothing to re-anchor: {ws.rel(ledger_path(ws))} has no rows yet (the first audit "
                              "anchors it); run `refinery audit-full` without --reanchor")
    return f"{head} was missing; the ledger was accepted as it stood at row {rows[-1]['seq']}"


def _read_chain(ws: Workspace) -> list[dict[str, Any]]:
    from refinery.models import BaselineRow

    path = ledger_path(ws)
    if not path.exists():
        return []
    rel, rows, prev = ws.rel(path), [], None
    for n, raw in enumerate(path.read_bytes().splitlines()):
        where = f"{rel}:{n + 1}"
        try:
            BaselineRow.model_validate_json(raw)
            row = orjson.loads(raw)  # hashed as written: a schema 1 row has no `reanchored`
        except ValueError as e:
            raise LedgerTampered(f"{where}: not a baseline row ({str(e).splitlines()[0]}). {RESTORE}") from None
        if row["seq"] != n:
            raise LedgerTampered(f"{where}: seq {row['seq']}, expected {n} (a row was removed or moved). {RESTORE}")
        if row["prev_hash"] != prev:
            raise LedgerTampered(f"{where}: prev_hash does not match the row before it (a row before it was "
                                 f"edited, removed or moved). {RESTORE}")
        if row_hash(row) != row["row_hash"]:
            raise LedgerTampered(f"{where}: row_hash does not match the row's content (the row was edited). "
                                 f"{RESTORE}")
        rows.append(row)
        prev = row["row_hash"]
    return rows


def append_ledger(ws: Workspace, rows: list[dict[str, Any]], run_id: str | None,
                  metrics: dict[str, float], reanchored: str | None = None) -> dict[str, Any]:
    """Append one row (and record it as the head); the file is rewritten whole through a temp
    file, so a kill leaves the old ledger or the new one, never a torn last line."""
    from refinery.jsonl import atomic_write, dumps_line
    from refinery.models import BaselineRow

    row = {"seq": len(rows), "recorded_at": now_utc(),
           "run_id": run_id, "metrics": metrics, "reanchored": reanchored,
           "prev_hash": rows[-1]["row_hash"] if rows else None, "row_hash": "0" * 64}
    row = BaselineRow.model_validate(row).model_dump(mode="json")  # hash what is written (metrics as floats)
    row["row_hash"] = row_hash(row)
    path = ledger_path(ws)
    old = path.read_bytes() if path.exists() else b""
    with atomic_write(path) as f:
        f.write(old)
        f.write(dumps_line(row))
    _write_head(ws, row)
    return row


def _write_head(ws: Workspace, row: dict[str, Any]) -> None:
    from refinery.jsonl import atomic_write
    from refinery.models import LedgerHead

    head = LedgerHead.model_validate({"seq": row["seq"], "row_hash": row["row_hash"]}).model_dump(mode="json")
    with atomic_write(head_path(ws)) as f:
        f.write(orjson.dumps(head) + b"\n")


# --- metrics and drift ---------------------------------------------------------------------


def tracked_metrics(ctx: Context) -> dict[str, float]:
    """Record counts, category mix, export sizes and quarantine totals by reason."""
    r = ctx.receipts
    out: dict[str, float] = {}
    if m := r.get("materialize"):
        out.update({"source_rows": m["counts"]["rows_in"], "evidence_rows": m["counts"]["rows_out"]})
    if s := r.get("score"):
        total = s["counts"]["rows_out"]
        out["scored_rows"] = total
        for cat, n in s["by_category"].items():
            out[f"category_share_pct.{cat}"] = round(100 * n / total, 2) if total else 0.0
    for stage, rel in inv.EXPORT_FILES.items():
        if e := r.get(stage):
            name = stage.removeprefix("export-")
            out[f"export_rows.{name}"] = e["counts"]["written"]
            p = ctx.path(rel)
            out[f"export_bytes.{name}"] = p.stat().st_size if p.is_file() else 0
    reasons: dict[str, int] = {}
    for rec in r.values():
        for reason, n in rec["by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    out["quarantined_total"] = sum(reasons.values())
    out.update({f"quarantined.{k}": v for k, v in sorted(reasons.items())})
    return out


def drift_rows(metrics: dict[str, float], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each metric against the baseline: a move of more than DRIFT_WARN_PCT % is `warn`."""
    prev = baseline["metrics"] if baseline else None
    rows = []
    for name in sorted(metrics.keys() | (prev or {}).keys()):
        value = metrics.get(name, 0)
        before = None if prev is None else prev.get(name)
        if before is None:
            change, flag = None, "new" if prev is not None else "first"
        elif before == 0:
            change, flag = (0.0, "ok") if value == 0 else (None, "warn")
        else:
            exact = 100 * (value - before) / abs(before)
            change, flag = round(exact, 2), "warn" if abs(exact) > DRIFT_WARN_PCT else "ok"
        rows.append({"name": name, "value": value, "baseline": before, "change_pct": change, "flag": flag})
    return rows


# --- the determinism re-run ----------------------------------------------------------------


def determinism_rerun(ctx: Context) -> list[str]:
    """Copy the sources, the config and the workspace's transforms into a temporary workspace,
    run-all there (a fresh process, its own hash seed), and compare every receipt hash with
    the audited run's."""
    return Rerun(ctx).problems()


class Rerun:
    """`determinism_rerun`, started when made: the audit's other checks run while it does.
    `problems()` waits for it (raising what stopped it from starting, as a check that crashed);
    `cancel()` stops it. Either removes the temporary workspace."""

    def __init__(self, ctx: Context):
        self.ctx, self.started, self.tmp, self.t0 = ctx, None, None, time.perf_counter()
        self.error: Exception | None = None
        if ctx.receipts:
            self.tmp = Path(tempfile.mkdtemp(prefix="refinery-audit-rerun-"))
            try:
                self.started = _start_rerun(ctx, self.tmp)
            except BaseException as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if not isinstance(e, Exception):
                    raise
                self.error = e

    def problems(self) -> list[str]:
        if self.error is not None:
            raise self.error
        if self.started is None:
            return ["no run to compare with"]
        try:
            return _compare_rerun(self.ctx, self.started)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def cancel(self) -> None:
        if self.started is not None:
            self.started.cancel()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _start_rerun(ctx: Context, tmp: Path) -> Any:
    from refinery.discovery import BUILTIN_DIR
    from refinery.runs import start_run_all_in_subprocess

    # transforms_dirs may climb out of the workspace (../shared): nest the twin deep enough
    # that the same relative paths still land inside the temporary folder
    rel_dirs = [d for d in ctx.cfg.materialize.transforms_dirs if not Path(d).is_absolute()]
    depth = max((Path(d).parts.count("..") for d in rel_dirs), default=0)
    root = tmp.joinpath(*["w"] * (depth + 1))
    shutil.copytree(ctx.ws.kb, root / "data" / "_kb", ignore=shutil.ignore_patterns(LEDGER))
    config = ctx.config_path or ctx.ws.root / "refinery.toml"
    if config.is_file():
        shutil.copy(config, root / "refinery.toml")
    for d in ["transforms", *rel_dirs]:
        src, dest = (ctx.ws.root / d).resolve(), Path(os.path.normpath(root / d))
        if src.is_dir() and src != BUILTIN_DIR.resolve() and not dest.exists():  # built-ins load anyway
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return start_run_all_in_subprocess(root, hash_seed=os.getpid() % 4093 + 1,
                                       include_partial=(ctx.summary or {}).get("include_partial"))


def _compare_rerun(ctx: Context, started: Any) -> list[str]:
    try:
        doc = started.result()
    except RuntimeError as e:
        return [f"the re-run failed: {e}"]
    if doc["summary"]["code_version"] != ctx.summary["code_version"]:
        return [f"the code changed since run {ctx.summary['run_id']} ({ctx.summary['code_version']} → "
                f"{doc['summary']['code_version']}): run `refinery run-all`, then audit"]
    problems = [f"{stage}: the re-run gives receipt_hash {doc['receipts'][stage]['receipt_hash'][:12]}…, "
                f"run {ctx.summary['run_id']} recorded {r['receipt_hash'][:12]}…"
                + _first_difference(doc["receipts"][stage], r)
                for stage, r in ctx.receipts.items()
                if doc["receipts"].get(stage, {}).get("receipt_hash") != r["receipt_hash"]]
    if not problems and doc["summary"]["overall_hash"] != ctx.summary.get("overall_hash"):
        problems.append("the re-run's overall hash differs")
    return problems


def _first_difference(now: dict[str, Any], then: dict[str, Any]) -> str:
    """Where two receipts of one stage part: which input, setting or output."""
    for side in ("inputs", "outputs"):
        a = {f["path"]: f["sha256"] for f in now.get(side, [])}
        b = {f["path"]: f["sha256"] for f in then.get(side, [])}
        diff = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
        if diff:
            return f" (first different {side[:-1]}: {diff[0]})"
    for key in ("config_hash", "policy_hash", "counts", "by_reason", "by_category"):
        if now.get(key) != then.get(key):
            return f" ({key} differs)"
    return ""


AUDIT_ONLY = [("determinism_rerun", "a re-run in a temporary workspace gives the same receipt hashes",
               determinism_rerun)]



# --- the audit -----------------------------------------------------------------------------


def run_audit(ws: Workspace, cfg: Config, *, rerun: bool = True, config_path: Path | None = None,
              reanchor: bool = False) -> AuditResult:
    """Verify the workspace; write the report; append a baseline row if every required check
    holds. Raises (before checking anything) LedgerTampered when the ledger was changed or its
    head is missing, AuditInputError when the head is damaged or `reanchor` has nothing to do.
    `reanchor`: accept a ledger whose head is missing or damaged as it stands; the row this
    audit appends (if it passes) records that."""
    from refinery.jsonl import atomic_write

    if reanchor and not rerun:
        raise AuditInputError("--reanchor needs the determinism re-run: only a full, passing audit appends the "
                              "row that records the re-anchoring; drop --no-rerun")
    with ws.lock():  # no run may change the workspace while it is being verified
        try:
            ledger = read_ledger(ws, reanchor=reanchor)
        except (LedgerTampered, AuditInputError) as e:
            with atomic_write(ws.reports / REPORT) as f:  # never leave an older PASS report standing
                f.write(f"# refinery audit-full\n\n- result: **REFUSED** — {_md(str(e))}\n".encode())
            raise
        reason = reanchor_reason(ws, ledger) if reanchor else None  # a usage error: the report stays as it is
        return _audit(ws, cfg, rerun, config_path, ledger, reason)


def _audit(ws: Workspace, cfg: Config, rerun: bool, config_path: Path | None,
           ledger: list[dict[str, Any]], reanchored: str | None = None) -> AuditResult:
    ctx = Context(ws, cfg, config_path)
    baseline = ledger[-1] if ledger else None
    run_id = ctx.summary["run_id"] if ctx.summary else None
    if ctx.summary is None:  # no run to audit: every other check (and the drift) would only say so again
        checks = inv.run_checks(ctx, inv.INVARIANTS[:1])
        checks += [Check(n, key, title, False, ["not checked: there is no run to audit (check 1 says why)"])
                   for n, (key, title, _) in enumerate([*inv.INVARIANTS[1:], *AUDIT_ONLY], 2)]
        result = AuditResult(checks, {}, [], baseline, None, ctx.why, notes=["drift not measured: no run to audit"])
    else:
        # the re-run is a run-all of its own, in a subprocess: it goes on while the other
        # checks do (most of them read in one process), and is waited for at the end
        started = Rerun(ctx) if rerun else None
        try:
            checks = inv.run_checks(ctx, inv.INVARIANTS)
        except BaseException:
            if started is not None:
                started.cancel()
            raise
        if started is not None:
            key, title, _ = AUDIT_ONLY[0]
            checks += inv.run_checks(ctx, [(key, title, lambda ctx: started.problems())], len(checks) + 1)
            checks[-1].seconds = round(time.perf_counter() - started.t0, 3)  # it ran beside the others
        if not rerun:
            checks.append(Check(len(checks) + 1, "determinism_rerun", AUDIT_ONLY[0][1], True,
                                ["skipped (--no-rerun)"], required=False))
        metrics = tracked_metrics(ctx)
        result = AuditResult(checks, metrics, drift_rows(metrics, baseline), baseline, run_id, ctx.why)
    if not result.ok:
        result.notes.append("baseline not updated: a required check failed")
        if reanchored:
            result.notes.append("not re-anchored: only a passing audit appends the row that records it; fix what "
                                f"failed and run `{REANCHOR}` again")
    elif not rerun:
        result.notes.append("baseline not updated: the determinism re-run was skipped (--no-rerun)")
    else:
        result.appended = append_ledger(ws, ledger, run_id, metrics, reanchored)
        if reanchored:
            result.notes.append(f"re-anchored: {reanchored} (recorded in row {result.appended['seq']})")
    report = ws.reports / REPORT
    _write_report(report, result, ctx, ws)
    result.report = ws.rel(report)
    return result


def _write_report(path: Path, res: AuditResult, ctx: Context, ws: Workspace) -> None:
    from refinery.jsonl import atomic_write

    run = f"`{res.run_id}`" if res.run_id else "none"
    base = f"row {res.baseline['seq']} of {ws.rel(ledger_path(ws))}" if res.baseline else "none yet (first audit)"
    failed = [c for c in res.checks if not c.ok]
    lines = [
        "# refinery audit-full", "",
        f"- run audited: {run} — {_md(res.why)}",
        f"- result: **{'PASS' if res.ok else 'FAIL'}** — {len(res.checks) - len(failed)} of {len(res.checks)} "
        "checks hold",
        f"- baseline: {base}",
        f"- appended: {'row ' + str(res.appended['seq']) if res.appended else 'nothing'}", "",
        "## Checks", "", "| # | check | result | seconds | detail |", "|---|---|---|---|---|",
    ]
    for c in res.checks:
        detail = "; ".join(c.problems[:3]) + (f" (+{len(c.problems) - 3} more)" if len(c.problems) > 3 else "")
        mark = ("SKIP" if c.problems else "PASS") if c.ok else ("FAIL" if c.required else "WARN")
        lines.append(f"| {c.number} | `{c.key}` — {c.title} | {mark} | {c.seconds:.2f} | {_md(detail)} |")
    lines += ["", "## Drift against the last baseline", "",
              f"More than {DRIFT_WARN_PCT:g} % either way is flagged `warn`; `new` is a metric the baseline "
              "does not have.", "", "| metric | baseline | now | change % | flag |", "|---|---|---|---|---|"]
    for d in res.drift:
        change = "·" if d["change_pct"] is None else f"{d['change_pct']:+.1f}"
        base = "·" if d["baseline"] is None else f"{d['baseline']:g}"
        lines.append(f"| {d['name']} | {base} | {d['value']:g} | {change} | {d['flag']} |")
    lines += ["", *(f"- {n}" for n in res.notes)]
    with atomic_write(path) as f:
        f.write(("\n".join(lines).rstrip() + "\n").encode())


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
