"""run-all as a recorded run: stages with receipts, reuse of unchanged stages, one publish.

    reports/distillation/<run_id>/summary.json            RunSummary (written first as incomplete)
    reports/distillation/<run_id>/receipts/<stage>.json   StageReceipt, as each stage finishes
    reports/distillation/<run_id>/drift.json              DriftReport against the last complete run
    reports/distillation/published.json                   PublishedRun: the run whose outputs are on disk

A run builds all of its outputs in a staging folder (`data/.run-<id>/`) and publishes them
together at the end, through a journal that the next holder of the workspace lock completes
if the process died part-way. So a run that is killed or fails leaves the previous complete
run's outputs as they were, and shows as incomplete (killed) or failed in `refinery runs`.
The same publish moves `published.json` into place, naming the run and its summary_hash: the
audit judges that run, and can tell when its folder is gone instead of judging an older one.

The summary's `summary_hash` covers it all but its timings, and it records its drift report's
`drift_hash`: an edited summary or drift report is caught like an edited receipt (`check_reports`).

Incremental: a stage whose inputs (by sha256), settings, code version and policy are those of
its receipt in the last successful run — and whose outputs are still on disk with the hashes
that receipt records — is not recomputed; its outputs are hard-linked into the new run and
its receipt is carried over (same receipt_hash, `reused_from` naming the run that computed it).

Single pass: when materialize runs, it also scores each evidence line and reads it for the
exports as it writes it (refinery.single_pass); score and export then take those parts instead
of reading the evidence again. Each stage still has its receipt, its reuse decision and its
outputs, byte for byte those of running the stages one by one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from refinery import decisions, drift, executors, receipts
from refinery.canonical import sig_hash
from refinery.config import Config
from refinery.errors import CheckFailed, RefineryError, exit_code
from refinery.jsonl import PUBLISH_JOURNAL, RUN_STAGING_PREFIX, publish_together
from refinery.receipts import EXPORT_STAGES, Digests
from refinery.single_pass import Plan
from refinery.stages import Stage, Step, walk
from refinery.transform import now_utc
from refinery.workspace import PUBLISHED, PUBLISHED_RUN, SUMMARY, Workspace, is_output_path

DRIFT = "drift.json"
#: In a run's staging: the single pass's parts (refinery.single_pass), until score and export take them.
SINGLE_PASS = "single-pass"
#: Fields a summary's hash leaves out: its timings (and the hash itself).
SUMMARY_UNHASHED = ("started_at", "finished_at", "summary_hash")

Progress = Callable[[str, int | None], contextlib.AbstractContextManager[Callable[[Any, int], None]]]


class ChainError(CheckFailed):
    """A stage's inputs are not the outputs of the stage before it. Nothing was published."""

    headline = "RECEIPT CHECK FAILED, nothing was published"


class RunNotFound(RefineryError, LookupError):
    pass


@dataclass
class RunOutcome:
    run_id: str
    summary: dict[str, Any]
    receipts: dict[str, dict[str, Any]]
    drift: dict[str, Any]
    materialize: Any = None
    """the MaterializeResult, when materialize ran (its warnings are the CLI's to print)"""
    why_recomputed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return self.summary["exit_code"]


def new_run_id() -> str:
    """Sortable by start time (to the millisecond), unique by a random suffix."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{os.urandom(2).hex()}"


# --- reading runs -------------------------------------------------------------------------


def list_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every recorded run's summary, oldest first. A run whose summary cannot be read is
    listed with status 'unreadable'; an incomplete one shows as 'running' while the process
    running it is alive and holds the workspace lock."""
    if not ws.reports.is_dir():
        return []
    runs = []
    for d in sorted(p for p in ws.reports.iterdir() if p.is_dir()):
        path = d / SUMMARY
        if not path.exists():
            continue
        try:
            doc = orjson.loads(path.read_bytes())
        except (orjson.JSONDecodeError, OSError):
            doc = None
        # a summary that is not an object naming this folder's run and a status cannot be listed as one
        if not isinstance(doc, dict) or doc.get("run_id") != d.name or not isinstance(doc.get("status"), str):
            doc = {"run_id": d.name, "status": "unreadable"}
        runs.append(doc)
    holder = ws.holder()
    for r in runs:
        if r["status"] == "incomplete" and holder is not None and holder[1] == r["run_id"]:
            r["status"] = "running"
    return runs


def resolve_run(ws: Workspace, run_id: str | None) -> str:
    """The run named by `run_id` (a unique prefix is enough), or the newest run."""
    ids = [r["run_id"] for r in list_runs(ws)]
    if not ids:
        raise RunNotFound(f"no runs recorded in {ws.rel(ws.reports)}/; run `refinery run-all` first")
    if run_id is None:
        return ids[-1]
    hits = [i for i in ids if i.startswith(run_id)]
    if len(hits) != 1:
        what = "no run" if not hits else f"{len(hits)} runs"
        raise RunNotFound(f"{what} matching {run_id!r}; `refinery runs` lists them")
    return hits[0]


def check_run_files(ws: Workspace, run_id: str, stage_receipts: dict[str, dict[str, Any]]) -> tuple[list[str], str]:
    """Re-hash the outputs a run's receipts record, when they are the outputs on disk: (the
    problems, a sentence saying what was checked — or why nothing was)."""
    try:
        pointer = read_published(ws)
    except receipts.ReportUnreadable as e:
        return [], f"files: not checked: {e}, so nothing says which run's outputs are on disk"
    if pointer is None:
        return [], (f"files: not checked: {ws.rel(published_path(ws))} is missing, so nothing says which run's "
                    "outputs are on disk")
    if run_id != pointer["run_id"]:
        return [], f"files: not checked: the outputs on disk are run {pointer['run_id']}'s, not this run's"
    problems = receipts.check_files(ws, stage_receipts)
    n = len(receipts.recorded_outputs(stage_receipts))
    if problems:
        return problems, (f"files: {len(problems)} of the {n} outputs on disk differ from what the receipts "
                          "record (edited, deleted, or rewritten by a single-stage command such as "
                          "`refinery export-sft`); `refinery run-all` records a run of what is there")
    return [], f"files: all {n} outputs on disk have the sha256 and rows their receipts record"


def load_run(ws: Workspace, run_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(summary, receipts by stage, drift report or None) of a recorded run. Raises
    ReportUnreadable naming a file that is not valid JSON."""
    d = ws.reports / run_id
    drift_path = d / DRIFT
    summary = receipts.read_json(d / SUMMARY)
    if not isinstance(summary, dict) or summary.get("run_id") != run_id:
        raise receipts.ReportUnreadable(f"{d / SUMMARY}: not the summary of run {run_id}; this report was damaged")
    return summary, receipts.read_receipts(d), receipts.read_json(drift_path) if drift_path.exists() else None


def drift_severity(ws: Workspace, run_id: str) -> str | None:
    """A run's drift severity for listings: None without a drift report, "damaged" when it does
    not read as one (`refinery receipts` names what is wrong with it)."""
    path = ws.reports / run_id / DRIFT
    if not path.exists():
        return None
    try:
        severity = receipts.read_json(path)["severity"]
    except (receipts.ReportUnreadable, OSError, KeyError, TypeError):
        return "damaged"
    return severity if isinstance(severity, str) and severity in drift.SEVERITY_ORDER else "damaged"


def summary_hash(summary: dict[str, Any]) -> str:
    return sig_hash({k: v for k, v in summary.items() if k not in SUMMARY_UNHASHED})


def published_path(ws: Workspace) -> Path:
    return ws.reports / PUBLISHED_RUN


def read_published(ws: Workspace) -> dict[str, Any] | None:
    """published.json (None when there is none). Raises ReportUnreadable when it is damaged."""
    from refinery.models import PublishedRun

    path = published_path(ws)
    try:
        return receipts.read_record(path, PublishedRun)
    except receipts.ReportUnreadable as e:
        raise receipts.ReportUnreadable(f"{ws.rel(path)}: not a published-run record ({e})") from None


def _names(ws: Workspace, run_id: str) -> bool:
    """Whether published.json names `run_id` (its publish put the outputs in place)."""
    try:
        pointer = read_published(ws)
    except receipts.ReportUnreadable:
        return False
    return pointer is not None and pointer["run_id"] == run_id


@dataclass
class Audited:
    """The run whose outputs are on disk (as far as the workspace can tell), and why it is that one."""

    summary: dict[str, Any] | None
    why: str
    problem: str | None = None
    """what makes the choice unsafe: the checks of `summary` would not be about the outputs on disk"""


def published_run(ws: Workspace, runs: list[dict[str, Any]]) -> Audited:
    """The run published.json names (the one whose outputs the last publish put in place) —
    never, silently, an older one: a missing or damaged pointer, a pointer to a run that is
    gone, not complete, or whose summary is not the one published, is a `problem`."""
    rel = ws.rel(published_path(ws))
    complete = next((r for r in reversed(runs) if r["status"] == "complete"), None)
    fallback = f"the newest complete run, for want of {rel}"
    try:
        pointer = read_published(ws)
    except receipts.ReportUnreadable as e:
        return Audited(complete, fallback, f"{e}: nothing says which run's outputs are on disk; "
                                           "run `refinery run-all` to publish a run")
    if pointer is None:
        if not runs:
            return Audited(None, "no run recorded")
        return Audited(complete, fallback, f"{rel} is missing: nothing says which run's outputs are on disk "
                                           "(it was deleted, or the runs predate it); run `refinery run-all` "
                                           "to publish a run")
    rid = pointer["run_id"]
    summary = next((r for r in runs if r["run_id"] == rid), None)
    run_dir = f"{ws.rel(ws.reports)}/{rid}"
    if summary is None:
        return Audited(None, f"{rel} names run {rid}, whose folder is gone",
                       f"{rel} names run {rid} as the one whose outputs are published, but {run_dir}/ is missing "
                       "(deleted?): no receipts describe the outputs on disk, and an older run's would not. "
                       "Restore the folder, or run `refinery run-all` to publish a new run")
    why = f"its outputs are the published ones ({rel} names it)"
    newer = [r for r in runs if r["run_id"] > rid]
    if newer:
        why += "; the newer " + ", ".join(f"{r['run_id']} ({r['status']})" for r in newer) + " published nothing"
    problem = None
    if summary["status"] == "unreadable":
        problem = f"{run_dir}/{SUMMARY} is damaged: not a run summary any more"
    elif summary["status"] != "complete":
        problem = f"{run_dir}/{SUMMARY} says run {rid} is {summary['status']}, yet {rel} names it as published"
    elif summary.get("summary_hash") != pointer["summary_hash"]:
        problem = (f"{run_dir}/{SUMMARY} is not the summary that was published: summary_hash "
                   f"{str(summary.get('summary_hash'))[:12]}…, {rel} recorded {pointer['summary_hash'][:12]}…")
    elif any(r["status"] == "complete" for r in newer):
        problem = f"run {newer[-1]['run_id']} is complete and newer, yet {rel} names {rid}"
    return Audited(summary, why, problem)


def check_reports(ws: Workspace, summary: dict[str, Any], stage_receipts: dict[str, dict[str, Any]],
                  drift_report: dict[str, Any] | None) -> list[str]:
    """Problems with a run's summary and drift report: edited after the run (their hashes do
    not recompute, or the summary does not record the drift report's), or saying other than the
    run's receipts do (totals, stages, the drift report's current values)."""
    d = f"{ws.rel(ws.reports)}/{summary['run_id']}"
    problems: list[str] = []
    if summary.get("schema_version") == 1:
        return problems  # written before summaries and drift reports were sealed: nothing to check them by
    if (want := summary_hash(summary)) != summary.get("summary_hash"):
        problems.append(f"{d}/{SUMMARY}: summary_hash {str(summary.get('summary_hash'))[:12]}… does not match its "
                        f"content ({want[:12]}…): it was edited after the run")
    if summary.get("status") != "complete":
        return problems
    refs = [(s, r["receipt_hash"]) for s, r in stage_receipts.items()]
    if [(s.get("stage"), s.get("receipt_hash")) for s in summary.get("stages", [])] != refs:
        problems.append(f"{d}/{SUMMARY}: its stages and receipt hashes are not those of the receipts")
    if sig_hash([{"stage": s, "receipt_hash": h} for s, h in refs]) != summary.get("overall_hash"):
        problems.append(f"{d}/{SUMMARY}: overall_hash does not match the receipts' hashes")
    got, want_totals = summary.get("totals") or {}, totals(stage_receipts)
    problems += [f"{d}/{SUMMARY}: totals.{k} is {got.get(k, '(absent)')}, the receipts say "
                 f"{want_totals.get(k, '(absent)')}"
                 for k in sorted(got.keys() | want_totals.keys()) if got.get(k) != want_totals.get(k)]
    if not isinstance(drift_report, dict):
        problems.append(f"{d}/{DRIFT} is missing" if drift_report is None else f"{d}/{DRIFT}: not a drift report")
        return problems
    if (want := drift.drift_hash(drift_report)) != drift_report.get("drift_hash"):
        problems.append(f"{d}/{DRIFT}: drift_hash {str(drift_report.get('drift_hash'))[:12]}… does not match its "
                        f"content ({want[:12]}…): it was edited after the run")
    elif drift_report["drift_hash"] != summary.get("drift_hash"):
        problems.append(f"{d}/{DRIFT}: drift_hash {drift_report['drift_hash'][:12]}… is not the one {SUMMARY} "
                        f"records ({str(summary.get('drift_hash'))[:12]}…)")
    if drift_report.get("run_id") != summary["run_id"]:
        problems.append(f"{d}/{DRIFT}: it is the drift report of run {drift_report.get('run_id')}")
    now = drift.metrics(stage_receipts)
    problems += [f"{d}/{DRIFT}: {m.get('name')} is {m.get('value')}, the receipts give {now[m.get('name')]}"
                 for m in drift_report.get("metrics", []) if m.get("name") in now and m.get("value") != now[m["name"]]]
    return problems


def _latest(ws: Workspace, *, clean: bool) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """The newest complete run (clean: that also exited 0) and its receipts."""
    for s in reversed(list_runs(ws)):
        if s["status"] == "complete" and (not clean or s.get("exit_code") == 0):
            try:
                return s["run_id"], receipts.read_receipts(ws.reports / s["run_id"])
            except (receipts.ReportUnreadable, OSError):
                continue  # a damaged report: look further back (and never reuse from it)
    return None


# --- one run ------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_progress(stage: str, total: int | None) -> Iterator[Callable[[Any, int], None]]:
    yield lambda result, size: None


class _Run:
    def __init__(self, ws: Workspace, cfg: Config, include_partial: bool | None, force: bool,
                 progress: Progress, log: Callable[[str], None], single_pass: bool = True):
        self.ws, self.cfg, self.include_partial, self.force = ws, cfg, include_partial, force
        self.progress, self.log = progress, log
        self.run_id = new_run_id()
        ws.note_lock(self.run_id)  # so `refinery runs` can tell this run is running, not killed
        self.dir = ws.reports / self.run_id
        self.staging = ws.root / "data" / f"{RUN_STAGING_PREFIX}{self.run_id}"
        self.staged = ws.staged(self.staging)
        # what one step hands the next: with the single pass, materialize scores and reads for
        # the exports as it writes, into the plan's folder (inside the staging: dropped with it)
        self.carry: dict[str, Any] = {"digest": lambda p: self.digests.of(p, self.staged.rel(p))["sha256"]}
        if single_pass:
            self.carry["plan"] = Plan.make(self.staging / SINGLE_PASS, cfg, include_partial,
                                           self.staged.rel(self.staged.evidence),
                                           self.staged.rel(self.staged.scored_runs), decisions.load(ws, cfg))
        self.code = receipts.code_version(ws, cfg)
        self.receipts: dict[str, dict[str, Any]] = {}
        self.why: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.previous = None if force else _latest(ws, clean=True)
        # a file the previous run recorded, still with its size, mtime and inode, is not re-read
        self.digests = Digests(receipts.fingerprinted(self.previous[1]) if self.previous else None)
        self.summary: dict[str, Any] = {
            "schema_version": 2, "run_id": self.run_id, "status": "incomplete", "exit_code": None, "error": None,
            "code_version": self.code, "config_hash": cfg.config_hash(), "include_partial": include_partial,
            "stages": [], "totals": {},
            "overall_hash": None, "drift_hash": None, "started_at": now_utc(), "finished_at": None}

    # the reuse decision -------------------------------------------------------------------

    def _reusable(self, stage: str, config_hash: str, policy_hash: str | None,
                  inputs: list[dict[str, Any]]) -> dict[str, Any] | None:
        why = self._why_not(stage, config_hash, policy_hash, inputs)
        if why:
            self.why[stage] = why
            if self.previous is not None and not self.force:
                self.log(f"{stage}: recomputing — {why}")
            return None
        return self.previous[1][stage]

    def _why_not(self, stage, config_hash, policy_hash, inputs) -> str | None:
        if self.force:
            return "--force"
        if self.previous is None:
            return "no earlier successful run"
        prev_id, prev = self.previous
        r = prev.get(stage)
        if r is None:
            return f"run {prev_id} has no {stage} receipt"
        if receipts.receipt_hash(r) != r["receipt_hash"]:
            return f"its receipt in run {prev_id} was edited"
        if bad := [o["path"] for o in r["outputs"] if not is_output_path(o["path"])]:
            # reuse links these files into the new run: never from or to anywhere else
            return f"its receipt in run {prev_id} names an output outside the published folders ({bad[0]!r})"
        if r["code_version"] != self.code:
            return f"code changed ({r['code_version']} → {self.code})"
        if r["config_hash"] != config_hash:
            return "its settings changed"
        if r["policy_hash"] != policy_hash:
            return "the scoring policy changed"
        if [(i["path"], i["sha256"]) for i in r["inputs"]] != [(i["path"], i["sha256"]) for i in inputs]:
            return "its inputs changed"
        if problem := receipts.verify_files(self.ws, r["outputs"], self.digests):
            return f"{problem} since run {prev_id}"
        return None

    def _reuse(self, stage: str, prev: dict[str, Any], started: str, t0: float) -> None:
        for o in prev["outputs"]:
            receipts.link_or_copy(self.ws.out / o["path"], self.staged.out / o["path"])
        source = prev["reused_from"] or self.previous[0]
        self.log(f"{stage}: reused the outputs of run {source} (inputs, settings and code unchanged)")
        doc = {k: v for k, v in prev.items() if k not in receipts.UNHASHED}
        self._record(stage, {**doc, "reused_from": source}, started, t0)

    def _record(self, stage: str, fields: dict[str, Any], started: str, t0: float) -> None:
        timings = {"started_at": started, "finished_at": now_utc(), "seconds": round(time.perf_counter() - t0, 3)}
        r = receipts.make_receipt(**{**fields, "run_id": self.run_id, "stage": stage, "timings": timings,
                                     "fingerprints": self._fingerprints(fields)})
        receipts.write_json(receipts.receipt_path(self.dir, stage), r)
        self.receipts[stage] = r

    def _fingerprints(self, fields: dict[str, Any]) -> dict[str, list[int]]:
        """(size, mtime_ns, inode) of each file the receipt names: an input as this run saw it
        when it found the recorded sha256 there; an output — which this run wrote or linked into
        its staging, under its lock — as it is now (not the published file of the same path and
        bytes the reuse check read: that one is replaced at the publish)."""
        out = {}
        for f in fields["inputs"]:
            if (fp := self.digests.fingerprint(f["path"], f["sha256"])) is not None:
                out[f["path"]] = fp
        for f in fields["outputs"]:
            if (p := self.staged.out / f["path"]).is_file():
                st = p.stat()
                out[f["path"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return out

    def _base(self, stage: str, config_hash: str, policy_hash: str | None, inputs, outputs) -> dict[str, Any]:
        return {"code_version": self.code, "config_hash": config_hash, "policy_hash": policy_hash,
                "inputs": inputs, "outputs": outputs}

    # the stages -----------------------------------------------------------------------------

    def step(self, step: Step, wanted: tuple[Stage, ...]) -> Any:
        """Reuse each of `wanted` (the stages `step` computes) whose inputs, settings and code are
        those of its receipt in the last successful run; compute the others in one go and record
        a receipt for each from its StageResult. Returns what the step's command shows (None
        when every stage was reused)."""
        started, t0 = now_utc(), time.perf_counter()
        files = step.inputs(self.staged, self.cfg)
        inputs = [self.digests.of(p, rel) for p, rel in files]
        hashes = {s.name: (s.config_hash(self.cfg, self.include_partial), s.policy(self.cfg)) for s in wanted}
        todo = []
        for s in wanted:
            if prev := self._reusable(s.name, *hashes[s.name], inputs):
                self._reuse(s.name, prev, started, t0)
            else:
                todo.append(s.name)
        if not todo:
            return None
        total = sum(p.stat().st_size for p, _ in files) if step.sized else None
        with self.progress(step.name, total) as advance:
            results, shown = step.run(self.staged, self.cfg, self.include_partial, tuple(todo), advance, self.carry)
        for r in results:
            chash, phash = hashes[r.stage]
            read = r.inputs if r.inputs is not None else inputs
            self._record(r.stage, {**self._base(r.stage, chash, phash, read, r.outputs), **r.receipt_fields()},
                         started, t0)
        return shown

    # the whole run --------------------------------------------------------------------------

    def write_summary(self, path: Path | None = None) -> dict[str, Any]:
        from refinery.models import RunSummary

        doc = RunSummary.model_validate({**self.summary, "summary_hash": "0" * 64}).model_dump(mode="json")
        doc["summary_hash"] = summary_hash(doc)
        receipts.write_json(path or self.dir / SUMMARY, doc)
        self.summary = doc
        return doc

    def execute(self) -> RunOutcome:
        self.write_summary()
        for tree in PUBLISHED:  # even an empty one is published, replacing the last run's
            (self.staging / tree).mkdir(parents=True, exist_ok=True)
        shown = {step.name: self.step(step, wanted) for step, wanted in walk()}
        shutil.rmtree(self.staging / SINGLE_PASS, ignore_errors=True)  # what the steps did not take
        m = shown["materialize"]
        self.receipts = {s: self.receipts[s] for s in receipts.STAGES}  # stage order, whatever was reused
        if self.digests.trusted:
            self.log(f"files not re-read, their size, mtime and inode as run {self.previous[0]} recorded them: "
                     f"{self.digests.trusted}; re-read: {self.digests.hashed} (audit-full re-reads them all)")
        if problems := receipts.check_chain(self.receipts):
            raise ChainError("the receipt chain is broken: " + "; ".join(problems))
        exit_code = m.exit_code if m is not None else 0
        stages = [{"stage": s, "receipt_hash": r["receipt_hash"], "reused": r["reused_from"] is not None}
                  for s, r in self.receipts.items()]
        prior = _latest(self.ws, clean=False)
        report = drift.compare(self.run_id, drift.metrics(self.receipts), prior[0] if prior else None,
                               drift.metrics(prior[1]) if prior else None, self.cfg.drift)
        receipts.write_json(self.dir / DRIFT, report)
        self.summary.update({
            "status": "complete", "exit_code": exit_code, "stages": stages, "totals": totals(self.receipts),
            "overall_hash": sig_hash([{"stage": s["stage"], "receipt_hash": s["receipt_hash"]} for s in stages]),
            "drift_hash": report["drift_hash"], "finished_at": now_utc()})
        from refinery.models import PublishedRun

        done = self.write_summary(self.staging / SUMMARY)
        receipts.write_json(self.staging / PUBLISHED_RUN, PublishedRun.model_validate(
            {"run_id": self.run_id, "summary_hash": done["summary_hash"]}).model_dump(mode="json"))
        staging = self.ws.rel(self.staging)
        moves = [(f"{staging}/{tree}", tree) for tree in PUBLISHED]
        moves.append((f"{staging}/{PUBLISHED_RUN}", self.ws.rel(published_path(self.ws))))
        # The summary saying "complete" is the last thing the publish moves into place.
        moves.append((f"{staging}/{SUMMARY}", self.ws.rel(self.dir / SUMMARY)))
        publish_together(self.ws.root, self.staging, moves)
        return RunOutcome(self.run_id, self.summary, self.receipts, report, m, self.why,
                          time.perf_counter() - self.t0)

    def fail(self, err: BaseException) -> None:
        code = exit_code(err)
        self.summary.update({"status": "failed", "exit_code": code,
                             "error": f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
                             "stages": [{"stage": s, "receipt_hash": r["receipt_hash"],
                                         "reused": r["reused_from"] is not None} for s, r in self.receipts.items()],
                             "finished_at": now_utc()})
        self.write_summary()


def totals(rs: dict[str, dict[str, Any]]) -> dict[str, int]:
    t: dict[str, int] = {}
    if m := rs.get("materialize"):
        t.update({"source_rows": m["counts"]["rows_in"], "evidence": m["counts"]["rows_out"],
                  "quarantined_materialize": m["counts"]["quarantined"]})
    if s := rs.get("score"):
        t.update({"scored": s["counts"]["rows_out"], "quarantined_score": s["counts"]["quarantined"],
                  **s["by_category"]})
    for stage in EXPORT_STAGES:
        if e := rs.get(stage):
            t[f"{stage.removeprefix('export-')}_written"] = e["counts"]["written"]
    return t


def run_all(ws: Workspace, cfg: Config, *, include_partial: bool | None = None, force: bool = False,
            progress: Progress = _no_progress, log: Callable[[str], None] = lambda msg: None,
            single_pass: bool = True) -> RunOutcome:
    """materialize → score → export-all as one recorded run (see the module docstring).

    Raises what the stages raise (TransformLoadError, StaleInputError, LeakError, WorkspaceBusy)
    or ChainError, after recording the run as failed; nothing of a failed run is published.
    The per-partition work runs on `cfg.executor` (refinery.executors)."""
    with executors.using(cfg.executor.kind, cfg.executor.ray_address), ws.lock():
        run = _Run(ws, cfg, include_partial, force, progress, log, single_pass)
        try:
            return run.execute()
        except BaseException as e:
            if _names(ws, run.run_id) and not (run.staging / PUBLISH_JOURNAL).exists():
                # Stopped after the last move (while dropping the emptied staging): published.
                shutil.rmtree(run.staging, ignore_errors=True)
                e.add_note(f"Run {run.run_id} had already published its outputs; it is complete.")
                raise
            if (run.staging / PUBLISH_JOURNAL).exists():
                # Stopped while publishing: the next holder of the lock completes the publish
                # (and with it this run's summary), so leave the staging and journal alone.
                e.add_note(f"Run {run.run_id} stopped while publishing; its publish is journaled and the next "
                           "refinery command completes it (`refinery runs` will do).")
                raise
            try:
                run.fail(e)
                recorded = "is recorded as failed"
            except OSError:  # the disk may be what failed: the summary then says incomplete, if it is there
                recorded = "is recorded as incomplete" if (run.dir / SUMMARY).exists() else "left no summary"
            shutil.rmtree(run.staging, ignore_errors=True)
            e.add_note(f"Run {run.run_id} {recorded} and published nothing: the outputs of the previous run are "
                       "as they were, and no temporary files were left.")
            raise


def run_all_in_subprocess(root: Path, *, hash_seed: int, include_partial: bool | None = None) -> dict[str, Any]:
    """`refinery run-all --force --json` on `root` in a fresh interpreter with its own hash seed,
    so that a determinism check also catches output that depends on `hash()` or on process
    state. Returns run-all's JSON document; raises RuntimeError with its stderr on a crash."""
    return start_run_all_in_subprocess(root, hash_seed=hash_seed, include_partial=include_partial).result()


class Started:
    """run-all in a subprocess, started: `result()` waits for it and gives its JSON document (or
    raises RuntimeError); `cancel()` stops it. Its output goes to temporary files, so however
    large, it never blocks the run."""

    def __init__(self, proc: Any, root: Path, out: Any, err: Any):
        self.proc, self.root, self.out, self.err = proc, root, out, err

    def result(self) -> dict[str, Any]:
        with self.out, self.err:
            code = self.proc.wait()
            self.out.seek(0)
            try:
                return orjson.loads(self.out.read())
            except orjson.JSONDecodeError:
                self.err.seek(0)
                raise RuntimeError(f"run-all in {self.root} exited {code}: "
                                   f"{self.err.read().decode(errors='replace')[-800:]}") from None

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()
        self.err.close()


def start_run_all_in_subprocess(root: Path, *, hash_seed: int, include_partial: bool | None = None) -> Started:
    """Start `run_all_in_subprocess` and return at once."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "refinery", "run-all", "--force", "--json", "--no-report", "--workspace", str(root)]
    if include_partial is not None:
        cmd.append("--include-partial" if include_partial else "--accepted-only")
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "REFINERY_WORKSPACE": str(root)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       env.get("PYTHONPATH")]))
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    return Started(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL), root, out, err)
