"""run-all as a recorded run: stages with receipts, reuse of unchanged stages, one publish.

    reports/distillation/<run_id>/summary.json            RunSummary (written first as incomplete)
    reports/distillation/<run_id>/receipts/<stage>.json   StageReceipt, as each stage finishes
    reports/distillation/<run_id>/drift.json              DriftReport against the last complete run

A run builds all of its outputs in a staging folder (`data/.run-<id>/`) and publishes them
together at the end, through a journal that the next holder of the workspace lock completes
if the process died part-way. So a run that is killed or fails leaves the previous complete
run's outputs as they were, and shows as incomplete (killed) or failed in `refinery runs`.

Incremental: a stage whose inputs (by sha256), settings, code version and policy are those of
its receipt in the last successful run — and whose outputs are still on disk with the hashes
that receipt records — is not recomputed; its outputs are hard-linked into the new run and
its receipt is carried over (same receipt_hash, `reused_from` naming the run that computed it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from refinery import drift, receipts
from refinery.canonical import sig_hash
from refinery.config import Config
from refinery.jsonl import PUBLISH_JOURNAL, RUN_STAGING_PREFIX, publish_together
from refinery.receipts import EXPORT_STAGES, Digests
from refinery.workspace import Workspace

#: The trees a run publishes: everything its stages write.
PUBLISHED = ("data/evidence", "data/scored-runs", "exports/rag", "exports/sft", "exports/preference",
             "exports/quarantine")
SUMMARY, DRIFT = "summary.json", "drift.json"

Progress = Callable[[str, int | None], contextlib.AbstractContextManager[Callable[[Any, int], None]]]


class ChainError(AssertionError):
    """A stage's inputs are not the outputs of the stage before it. Nothing was published."""


class RunNotFound(LookupError):
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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
            runs.append(orjson.loads(path.read_bytes()))
        except (orjson.JSONDecodeError, OSError):
            runs.append({"run_id": d.name, "status": "unreadable"})
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


def published_run(ws: Workspace) -> str | None:
    """The run whose outputs are on disk: the newest complete one (a later run that failed or
    was killed published nothing)."""
    return next((r["run_id"] for r in reversed(list_runs(ws)) if r["status"] == "complete"), None)


def check_run_files(ws: Workspace, run_id: str, stage_receipts: dict[str, dict[str, Any]]) -> tuple[list[str], str]:
    """Re-hash the outputs a run's receipts record, when they are the outputs on disk: (the
    problems, a sentence saying what was checked — or why nothing was)."""
    published = published_run(ws)
    if run_id != published:
        on_disk = f"run {published}'s" if published else "no run's (no run is complete)"
        return [], f"files: not checked: the outputs on disk are {on_disk}, not this run's"
    problems = receipts.check_files(ws, stage_receipts)
    n = sum(len(r["outputs"]) for r in stage_receipts.values())
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
    return (receipts.read_json(d / SUMMARY), receipts.read_receipts(d),
            receipts.read_json(drift_path) if drift_path.exists() else None)


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
                 progress: Progress, log: Callable[[str], None]):
        self.ws, self.cfg, self.include_partial, self.force = ws, cfg, include_partial, force
        self.progress, self.log = progress, log
        self.run_id = new_run_id()
        ws.note_lock(self.run_id)  # so `refinery runs` can tell this run is running, not killed
        self.dir = ws.reports / self.run_id
        self.staging = ws.root / "data" / f"{RUN_STAGING_PREFIX}{self.run_id}"
        self.staged = ws.staged(self.staging)
        self.code = receipts.code_version(ws, cfg)
        self.digests = Digests()
        self.receipts: dict[str, dict[str, Any]] = {}
        self.why: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.previous = None if force else _latest(ws, clean=True)
        self.summary: dict[str, Any] = {
            "schema_version": 1, "run_id": self.run_id, "status": "incomplete", "exit_code": None, "error": None,
            "code_version": self.code, "config_hash": cfg.config_hash(), "include_partial": include_partial,
            "stages": [], "totals": {},
            "overall_hash": None, "started_at": _now(), "finished_at": None}

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
        timings = {"started_at": started, "finished_at": _now(), "seconds": round(time.perf_counter() - t0, 3)}
        r = receipts.make_receipt(**{**fields, "run_id": self.run_id, "stage": stage, "timings": timings})
        receipts.write_json(receipts.receipt_path(self.dir, stage), r)
        self.receipts[stage] = r

    def _base(self, stage: str, config_hash: str, policy_hash: str | None, inputs, outputs) -> dict[str, Any]:
        return {"code_version": self.code, "config_hash": config_hash, "policy_hash": policy_hash,
                "inputs": inputs, "outputs": outputs}

    def _digests(self, files: list[Path]) -> list[dict[str, Any]]:
        rels = sorted((self.staged.rel(p), p) for p in files)
        return [self.digests.of(p, rel) for rel, p in rels]

    # the stages -----------------------------------------------------------------------------

    def materialize(self) -> Any:
        from refinery import materialize
        from refinery.sources import list_sources

        stage, started, t0 = "materialize", _now(), time.perf_counter()
        sources, _ = list_sources(self.ws, self.cfg.materialize.ignore)
        chash = receipts.stage_config_hash(stage, self.cfg)
        inputs = [self.digests.of(s.path, s.ws_rel) for s in sources]
        if prev := self._reusable(stage, chash, None, inputs):
            self._reuse(stage, prev, started, t0)
            return None
        with self.progress(stage, sum(s.size for s in sources)) as advance:
            result = materialize.run(self.staged, self.cfg, on_file_done=advance)
        c = receipts.materialize_counts(result)
        self._record(stage, {**self._base(stage, chash, None, c.pop("inputs"), result.outputs), **c}, started, t0)
        return result

    def score(self) -> None:
        from refinery import score
        from refinery.policy import policy_hash

        stage, started, t0 = "score", _now(), time.perf_counter()
        chash, phash = receipts.stage_config_hash(stage, self.cfg), policy_hash(self.cfg.score)
        inputs = self._digests(score.evidence_files(self.staged))
        if prev := self._reusable(stage, chash, phash, inputs):
            self._reuse(stage, prev, started, t0)
            return
        with self.progress(stage, sum(p.stat().st_size for p in score.evidence_files(self.staged))) as advance:
            result = score.run(self.staged, self.cfg, on_file_done=advance)
        self._record(stage, {**self._base(stage, chash, phash, inputs, result.outputs),
                             **receipts.score_counts(result)}, started, t0)

    def exports(self) -> None:
        from refinery import export

        started, t0 = _now(), time.perf_counter()
        from refinery.score import evidence_files

        # what the exports read: the evidence, the scored runs and the scored runs' manifest
        inputs = self._digests([*evidence_files(self.staged),
                                *(p for p in self.staged.scored_runs.rglob("*") if p.is_file())])
        hashes = {s: receipts.stage_config_hash(s, self.cfg, self.include_partial) for s in EXPORT_STAGES}
        todo = []
        for stage in EXPORT_STAGES:
            if prev := self._reusable(stage, hashes[stage], None, inputs):
                self._reuse(stage, prev, started, t0)
            else:
                todo.append(stage)
        if not todo:
            return
        names = tuple(s.removeprefix("export-") for s in todo)
        with self.progress("export", None) as advance:
            result = export.run(self.staged, self.cfg, exports=names, include_partial=self.include_partial,
                                on_file_done=advance)
        for name in names:
            e = result.exports[name]
            mine = {e["path"], e["quarantine"], e["stats_path"]}
            outputs = [o for o in result.outputs if o["path"] in mine]
            stage = f"export-{name}"
            self._record(stage, {**self._base(stage, hashes[stage], None, inputs, outputs),
                                 **receipts.export_counts(name, e)}, started, t0)

    # the whole run --------------------------------------------------------------------------

    def write_summary(self, path: Path | None = None) -> None:
        from refinery.models import RunSummary

        doc = RunSummary.model_validate(self.summary).model_dump(mode="json")
        receipts.write_json(path or self.dir / SUMMARY, doc)

    def execute(self) -> RunOutcome:
        self.write_summary()
        for tree in PUBLISHED:  # even an empty one is published, replacing the last run's
            (self.staging / tree).mkdir(parents=True, exist_ok=True)
        m = self.materialize()
        self.score()
        self.exports()
        self.receipts = {s: self.receipts[s] for s in receipts.STAGES}  # stage order, whatever was reused
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
            "finished_at": _now()})
        # The summary saying "complete" is the last thing the publish moves into place.
        self.write_summary(self.staging / SUMMARY)
        staging = self.ws.rel(self.staging)
        moves = [(f"{staging}/{tree}", tree) for tree in PUBLISHED]
        moves.append((f"{staging}/{SUMMARY}", self.ws.rel(self.dir / SUMMARY)))
        publish_together(self.ws.root, self.staging, moves)
        return RunOutcome(self.run_id, self.summary, self.receipts, report, m, self.why,
                          time.perf_counter() - self.t0)

    def fail(self, err: BaseException) -> None:
        code = 1 if isinstance(err, AssertionError) else 130 if isinstance(err, KeyboardInterrupt) else 2
        self.summary.update({"status": "failed", "exit_code": code,
                             "error": f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
                             "stages": [{"stage": s, "receipt_hash": r["receipt_hash"],
                                         "reused": r["reused_from"] is not None} for s, r in self.receipts.items()],
                             "finished_at": _now()})
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
            progress: Progress = _no_progress, log: Callable[[str], None] = lambda msg: None) -> RunOutcome:
    """materialize → score → export-all as one recorded run (see the module docstring).

    Raises what the stages raise (TransformLoadError, StaleInputError, LeakError, WorkspaceBusy)
    or ChainError, after recording the run as failed; nothing of a failed run is published."""
    with ws.lock():
        run = _Run(ws, cfg, include_partial, force, progress, log)
        try:
            return run.execute()
        except BaseException as e:
            if (run.staging / PUBLISH_JOURNAL).exists():
                # Stopped while publishing: the next holder of the lock completes the publish
                # (and with it this run's summary), so leave the staging and journal alone.
                raise
            run.fail(e)
            shutil.rmtree(run.staging, ignore_errors=True)
            raise


def run_all_in_subprocess(root: Path, *, hash_seed: int, include_partial: bool | None = None) -> dict[str, Any]:
    """`refinery run-all --force --json` on `root` in a fresh interpreter with its own hash seed,
    so that a determinism check also catches output that depends on `hash()` or on process
    state. Returns run-all's JSON document; raises RuntimeError with its stderr on a crash."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "refinery", "run-all", "--force", "--json", "--workspace", str(root)]
    if include_partial is not None:
        cmd.append("--include-partial" if include_partial else "--accepted-only")
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "REFINERY_WORKSPACE": str(root)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    try:
        return orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        raise RuntimeError(f"run-all in {root} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-800:]}") from None
