"""Receipts, run summaries, drift, incremental reuse and all-or-nothing publishing of run-all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import shutil
from pathlib import Path

import jsonschema
import orjson
import pytest
from typer.testing import CliRunner

from conftest import REPO, tree_bytes
from refinery import drift, receipts, runs
from refinery.cli import app
from refinery.config import DriftConfig, load_config
from refinery.sample import generate
from refinery.schemas import load_schema

runner = CliRunner()
STAGES = list(receipts.STAGES)
OUTPUT_TREES = ("data/evidence", "data/scored-runs", "exports")
#: one more row for the sample's eval.csv (eval_id,task_id,task_name,prompt,expected,output,score,approver,evaluated_at)
EVAL_ROW = b"ev-x%s,t-x,extra,How many orders are open?,12,12,0.9,li.chen,2026-11-02T10:00:00Z\n"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_all(*args: str) -> dict:
    result = invoke("run-all", "--json", *args)
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def outputs(ws) -> dict[str, bytes]:
    return {f"{t}/{k}": v for t in OUTPUT_TREES for k, v in tree_bytes(ws.root / t).items()}


def hashes(doc: dict) -> dict[str, str]:
    return {s: r["receipt_hash"] for s, r in doc["receipts"].items()}


def digests(receipt: dict, side: str) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in receipt[side]}


@pytest.fixture
def sample(ws):
    """The generated sample in data/_kb/, nothing run yet. Tests that start from the sample's
    first run take the `sample_run` fixture (conftest.py): that run, copied in, and its --json."""
    generate(400, 7, ws.kb)
    return ws


def schema(name: str) -> dict:
    return load_schema(name)


# --- what a run writes --------------------------------------------------------------------


def test_a_run_writes_a_receipt_per_stage_a_summary_and_drift(ws, sample_run):
    doc = sample_run
    run_dir = ws.reports / doc["run_id"]
    assert sorted(p.name for p in (run_dir / "receipts").iterdir()) == sorted(f"{s}.json" for s in STAGES)
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    jsonschema.validate(summary, schema("run_summary"))
    jsonschema.validate(orjson.loads((run_dir / "drift.json").read_bytes()), schema("drift_report"))
    assert summary["status"] == "complete" and summary["exit_code"] == 0
    assert [s["stage"] for s in summary["stages"]] == STAGES
    for stage in STAGES:
        r = orjson.loads(receipts.receipt_path(run_dir, stage).read_bytes())
        jsonschema.validate(r, schema("stage_receipt"))
        assert r == doc["receipts"][stage]
        assert r["run_id"] == doc["run_id"] and r["code_version"] == summary["code_version"]
        assert r["receipt_hash"] == receipts.receipt_hash(r)
        assert (r["policy_hash"] is not None) == (stage == "score")
        for f in r["outputs"]:  # every output is on disk with the recorded hash and row count
            on_disk = receipts.Digests().of(ws.root / f["path"], f["path"])
            assert on_disk == f, f["path"]
    m = doc["receipts"]["materialize"]
    c = m["counts"]
    assert c["rows_in"] == c["rows_out"] - c["split"] + c["joined"] + c["quarantined"]
    assert c["joined"] > 0  # the sample's Batch, Langfuse and OpenTelemetry records are joined
    assert sum(m["by_reason"].values()) == c["quarantined"]
    assert {i["path"] for i in m["inputs"]} == {f"data/_kb/{p.relative_to(ws.kb).as_posix()}"
                                               for p in ws.kb.rglob("*") if p.is_file()}
    assert sum(doc["receipts"]["score"]["by_category"].values()) == doc["receipts"]["score"]["counts"]["rows_out"]


def test_the_chain_holds_and_a_broken_link_is_named(ws, sample_run):
    doc = sample_run
    rs = doc["receipts"]
    assert receipts.check_chain(rs) == []
    evidence = {k: v for k, v in digests(rs["materialize"], "outputs").items() if k.startswith("data/evidence/")}
    assert digests(rs["score"], "inputs") == evidence
    scored = digests(rs["score"], "outputs")
    for stage in ("export-rag", "export-sft", "export-preference"):
        assert digests(rs[stage], "inputs") == {**evidence, **{k: v for k, v in scored.items()
                                                               if not k.startswith("exports/quarantine/")}}

    # An evidence file that changed between materialize and score breaks the chain at score.
    broken = orjson.loads(orjson.dumps(rs))
    broken["score"]["inputs"][0]["sha256"] = "0" * 64
    problems = receipts.check_chain(broken)
    assert len(problems) == 1 and problems[0].startswith(f"score: read {rs['score']['inputs'][0]['path']}")
    del broken["score"]["inputs"][0]
    assert "did not read" in receipts.check_chain(broken)[0]

    # On disk: `refinery receipts` re-checks hashes and chain, exit 1 naming the receipt.
    path = receipts.receipt_path(ws.reports / doc["run_id"], "score")
    r = orjson.loads(path.read_bytes())
    r["counts"]["rows_out"] += 1
    path.write_bytes(orjson.dumps(r))
    result = invoke("receipts")
    assert result.exit_code == 1
    assert "score: receipt_hash" in result.stdout and "does not match its content" in result.stdout


def test_receipts_and_runs_commands(ws, sample_run):
    first, second = sample_run, run_all()
    result = invoke("runs", "--json")
    assert result.exit_code == 0
    listed = orjson.loads(result.stdout)
    assert [r["run_id"] for r in listed] == [first["run_id"], second["run_id"]]
    assert [r["status"] for r in listed] == ["complete", "complete"]
    assert [r["drift_severity"] for r in listed] == ["ok", "ok"]
    table = invoke("runs").stdout
    assert first["run_id"] in table and "complete" in table

    doc = orjson.loads(invoke("receipts", "--json", "--run-id", first["run_id"][:20]).stdout)
    assert doc["summary"]["run_id"] == first["run_id"] and doc["checks"]["ok"] and doc["checks"]["problems"] == []
    assert doc["checks"]["files"] == (f"files: not checked: the outputs on disk are run {second['run_id']}'s, "
                                      "not this run's")
    assert list(doc["receipts"]) == STAGES and doc["drift"]["note"].startswith("first run")
    text = invoke("receipts").stdout  # the newest run, as tables
    assert second["run_id"] in text and "export-preference" in text and "drift against run" in text
    assert invoke("receipts", "--run-id", "nope").exit_code == 2
    assert invoke("receipts", "--run-id", "2026").exit_code == 2  # ambiguous prefix


def test_receipts_re_hashes_the_output_files_of_the_run_on_disk(ws):
    """`refinery receipts` checks the outputs' sha256 and rows against the receipts (it used to
    check only the receipts themselves, and say "checks: ..." over an edited export)."""
    (ws.kb / "gateway_receipts.jsonl").write_text('{"ts": 1762000000, "prompt": "a", "completion": "b"}\n')
    run_all()
    result = invoke("receipts")
    assert result.exit_code == 0
    assert re.search(r"files: all \d+ outputs on disk have the sha256 and rows their receipts record",
                     " ".join(result.stdout.split()))
    rag = ws.root / "exports" / "rag" / "playbooks.jsonl"
    rag.write_bytes(rag.read_bytes() + b'{"planted": 1}\n')
    result = invoke("receipts")
    assert result.exit_code == 1
    assert "exports/rag/playbooks.jsonl changed since export-rag wrote it" in result.stdout
    assert re.search(r"files: 1 of the \d+ outputs on disk differ", " ".join(result.stdout.split()))
    doc = orjson.loads(invoke("receipts", "--json").stdout)
    assert not doc["checks"]["ok"] and "exports/rag/playbooks.jsonl changed" in doc["checks"]["problems"][0]
    result = invoke("receipts", "--no-files")  # says plainly that it did not look
    assert result.exit_code == 0 and "files: not checked (--no-files)" in result.stdout


def test_receipts_without_any_run_exits_2(ws):
    result = invoke("receipts")
    assert result.exit_code == 2 and "run `refinery run-all` first" in result.output
    assert "no runs recorded" in invoke("runs").stdout


# --- determinism --------------------------------------------------------------------------


def test_same_inputs_same_hashes_whatever_the_worker_count(sample):
    a = run_all("--force", "--workers", "1")
    before = outputs(sample)
    (sample.root / "refinery.toml").write_text("[materialize]\nparallel_min_bytes = 0\n")
    b = run_all("--force", "--workers", "2")
    c = run_all()  # reused: the receipts are carried over, hashes and all
    assert hashes(a) == hashes(b) == hashes(c)  # a vs b is the determinism; c shows reuse keeps it
    assert a["summary"]["overall_hash"] == b["summary"]["overall_hash"] == c["summary"]["overall_hash"]
    assert outputs(sample) == before
    assert a["run_id"] != b["run_id"] != c["run_id"]


def test_one_changed_source_row_changes_exactly_what_is_downstream_of_it(ws, sample_run):
    a = sample_run
    path = ws.kb / "gateway_receipts.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    row = orjson.loads(lines[0])
    row["completion"] += " Confirmed by phone."
    lines[0] = orjson.dumps(row) + b"\n"
    path.write_bytes(b"".join(lines))
    b = run_all()

    ra, rb = a["receipts"], b["receipts"]
    changed = {s for s in STAGES if ra[s]["receipt_hash"] != rb[s]["receipt_hash"]}
    assert changed == set(STAGES)  # every stage reads (transitively) from the changed file

    def moved(stage: str, side: str) -> set[str]:
        da, db = digests(ra[stage], side), digests(rb[stage], side)
        assert da.keys() == db.keys()
        return {p for p in da if da[p] != db[p]}

    assert moved("materialize", "inputs") == {"data/_kb/gateway_receipts.jsonl"}
    evidence = moved("materialize", "outputs")
    assert len(evidence) == 1 and evidence.pop().endswith("/gateway_receipts.jsonl")
    day = next(p for p in moved("score", "inputs"))[len("data/evidence/"):]
    assert moved("score", "outputs") == {f"data/scored-runs/{day}", "data/scored-runs/manifest.json"}
    # the exports read the changed evidence and scored-run files and nothing else changed under them
    assert moved("export-rag", "inputs") == {f"data/evidence/{day}", f"data/scored-runs/{day}",
                                             "data/scored-runs/manifest.json"}


# --- drift ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("previous", "value", "severity"), [
    (100, 109.99, "ok"), (100, 110, "warn"), (100, 90, "warn"), (100, 124.99, "warn"),
    (100, 125, "alert"), (100, 75, "alert"), (100, 100, "ok"), (0, 0, "ok"), (0, 3, "alert"),
])
def test_drift_severity_at_the_thresholds(previous, value, severity):
    report = drift.compare("r2", {"m": value}, "r1", {"m": previous}, DriftConfig(warn_pct=10, alert_pct=25))
    (metric,) = report["metrics"]
    assert metric["severity"] == severity == report["severity"]
    assert metric["previous"] == previous and metric["value"] == value
    if previous:
        assert metric["change_pct"] == pytest.approx(100 * (value - previous) / previous)
    else:
        assert metric["change_pct"] == (0.0 if value == 0 else None)


def test_drift_first_run_and_metrics_that_come_and_go():
    first = drift.compare("r1", {"a": 5}, None, None, DriftConfig())
    assert first["previous_run_id"] is None and first["severity"] == "ok"
    assert first["note"] == "first run: no prior complete run to compare with"
    assert first["metrics"] == [{"name": "a", "value": 5, "previous": None, "change_pct": None, "severity": "ok"}]
    later = drift.compare("r2", {"b": 2}, "r1", {"a": 5}, DriftConfig())
    by_name = {m["name"]: m for m in later["metrics"]}
    assert by_name["a"]["value"] == 0 and by_name["a"]["change_pct"] == -100 and by_name["a"]["severity"] == "alert"
    assert by_name["b"]["previous"] == 0 and by_name["b"]["severity"] == "alert"


def test_drift_thresholds_come_from_config(ws, sample_run):
    first = sample_run
    with open(ws.kb / "eval.csv", "ab") as f:
        f.write(b"".join(EVAL_ROW % (b"%d" % i) for i in range(6)))
    loose = run_all()  # default thresholds (10 % / 25 %): six more source rows are no news
    rows = first["receipts"]["materialize"]["counts"]["rows_in"]
    source_rows = next(m for m in loose["drift"]["metrics"] if m["name"] == "source_rows")
    assert source_rows == {"name": "source_rows", "value": rows + 6, "previous": rows,
                           "change_pct": round(600 / rows, 2), "severity": "ok"}
    (ws.root / "refinery.toml").write_text("[drift]\nwarn_pct = 0.01\nalert_pct = 0.02\n")
    strict = run_all()  # same inputs as `loose`: nothing moved, so nothing to flag
    assert strict["drift"]["severity"] == "ok"
    with open(ws.kb / "eval.csv", "ab") as f:
        f.write(EVAL_ROW % b"last")
    moved = run_all()
    source_rows = next(m for m in moved["drift"]["metrics"] if m["name"] == "source_rows")
    assert source_rows["change_pct"] > 0.02 and source_rows["severity"] == "alert"
    assert moved["drift"]["previous_run_id"] == strict["run_id"]
    (ws.root / "refinery.toml").write_text("[drift]\nwarn_pct = 30\nalert_pct = 20\n")
    assert invoke("run-all").exit_code == 2  # warn above alert is a config error


# --- incremental reuse ---------------------------------------------------------------------


def reused(doc: dict) -> list[str]:
    return [s for s, r in doc["receipts"].items() if r["reused_from"]]


def test_an_unchanged_run_reuses_every_stage_and_says_so(ws, sample_run):
    first = sample_run
    result = invoke("run-all")
    assert result.exit_code == 0
    assert f"materialize: reused the outputs of run {first['run_id']}" in result.stderr
    assert "reused" in result.stdout
    again = run_all()
    assert reused(again) == STAGES and again["recomputed"] == {}
    assert {r["reused_from"] for r in again["receipts"].values()} == {first["run_id"]}  # the run that computed it
    forced = run_all("--force")
    assert reused(forced) == [] and set(forced["recomputed"].values()) == {"--force"}
    assert hashes(forced) == hashes(first)


def test_an_unchanged_rerun_reads_no_file_again_but_audit_full_does(ws, sample_run):
    """A file that keeps the size, mtime and inode the last run recorded is not re-read (how make,
    rsync and git decide); one with a new mtime is, and is reused when its bytes are the same.
    A byte changed in place with the mtime put back is what that rule cannot see: the run trusts
    it, and audit-full, which re-reads everything, fails on it."""
    def counts(stderr: str) -> tuple[int, int]:
        m = re.search(r"recorded them: (\d+); re-read: (\d+)", " ".join(stderr.split()))
        return (int(m[1]), int(m[2])) if m else (0, -1)

    def age(path, seconds=60):  # as if written a minute ago
        t = time.time_ns() - seconds * 10**9
        os.utime(path, ns=(t, t))

    for p in ws.kb.rglob("*"):
        age(p)
    invoke("run-all")  # the copied-in sample has new inodes: this run reads every file and records it
    result = invoke("run-all")
    trusted, reread = counts(result.stderr)
    assert reread == 0 and trusted > 10
    assert orjson.loads(receipts.receipt_path(ws.reports / runs.list_runs(ws)[-1]["run_id"], "score")
                        .read_bytes())["fingerprints"]

    src = ws.kb / "eval.csv"
    os.utime(src)  # same bytes, a new mtime: read again, found unchanged, every stage reused
    doc = run_all()
    assert reused(doc) == STAGES
    # modified within the last 2 s ("racily clean", as git says): a same-size rewrite in the same
    # clock tick would keep the fingerprint, so it is not recorded and the file is read again
    assert counts(invoke("run-all").stderr) == (trusted - 1, 1)
    age(src)
    invoke("run-all")  # recorded now
    assert counts(invoke("run-all").stderr) == (trusted, 0)

    st = src.stat()
    data = src.read_bytes()
    at = data.index(b"0.", data.index(b"\n"))  # a score in the first data row
    with open(src, "r+b") as f:  # in place: same inode, same size
        f.seek(at)
        f.write(b"9")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # a minute ago, as recorded
    assert reused(run_all()) == STAGES  # trusted by its fingerprint
    audit = invoke("audit-full", "--no-rerun", "--json")
    failed = {c["key"] for c in orjson.loads(audit.stdout)["checks"] if not c["ok"]}
    assert audit.exit_code == 1 and "sources_match_receipt" in failed


@pytest.mark.slow
@pytest.mark.parametrize(("change", "recomputed"), [
    ("input", STAGES),
    ("score_config", STAGES[1:]),
    ("export_config", STAGES[2:]),
    ("include_partial", ["export-rag", "export-sft", "export-preference"]),
    ("policy", STAGES[1:]),
    ("code", STAGES),
    ("edited_output", ["score"]),  # recomputed as it was: the exports downstream are reused
    ("transform_module", STAGES),
    ("edited_receipt", ["materialize"]),  # a receipt that no longer matches its hash is not trusted
    ("deleted_output", ["export-sft"]),
])
def test_reuse_is_invalidated_by_what_the_stage_depends_on(ws, sample_run, monkeypatch, change, recomputed):
    first = sample_run
    args: list[str] = []
    if change == "input":
        with open(ws.kb / "eval.csv", "ab") as f:
            f.write(EVAL_ROW % b"new")
    elif change == "score_config":
        (ws.root / "refinery.toml").write_text("[score]\naccept_min_score = 0.8\n")
    elif change == "export_config":
        (ws.root / "refinery.toml").write_text("[export]\nmax_pairs_per_task = 3\n")
    elif change == "include_partial":
        args = ["--include-partial"]
    elif change == "policy":
        monkeypatch.setattr("refinery.policy.POLICY_VERSION", "2099.1.1")
    elif change == "code":
        monkeypatch.setattr(receipts, "code_version", lambda ws, cfg: "9.9.9+test")
    elif change == "edited_output":  # someone edited a scored run after the last run
        p = next((ws.root / "data" / "scored-runs").rglob("*.jsonl"))
        p.write_bytes(p.read_bytes().replace(b'"category":"', b'"category": "', 1))
    elif change == "transform_module":
        (ws.root / "transforms").mkdir()
        (ws.root / "transforms" / "_helper.py").write_text("# a helper the transforms could import\n")
    elif change == "deleted_output":
        (ws.root / "exports" / "sft" / "instruction_response.jsonl").unlink()
    elif change == "edited_receipt":
        path = receipts.receipt_path(ws.reports / first["run_id"], "materialize")
        path.write_bytes(path.read_bytes().replace(b'"files": ', b'"files": 1', 1))
    doc = run_all(*args)
    assert [s for s in STAGES if s not in reused(doc)] == recomputed
    assert set(doc["recomputed"]) == set(recomputed)
    forced = run_all("--force", *args)  # what was reused is exactly what a full recompute gives
    assert hashes(forced) == hashes(doc)
    assert forced["summary"]["overall_hash"] == doc["summary"]["overall_hash"]
    assert [s["stage"] for s in doc["summary"]["stages"]] == STAGES


def test_settings_that_do_not_change_outputs_do_not_invalidate(ws, sample_run):
    (ws.root / "refinery.toml").write_text("[materialize]\nworkers = 1\nparallel_min_bytes = 0\n"
                                               "[drift]\nwarn_pct = 5.0\n")
    assert reused(run_all()) == STAGES


def test_stage_commands_run_outside_run_all_are_noticed(ws, sample_run):
    (ws.root / "refinery.toml").write_text("[export]\ndedup = false\n")
    assert invoke("export-rag").exit_code == 0  # rewrites exports/rag in place
    (ws.root / "refinery.toml").unlink()
    doc = run_all()
    assert "export-rag" not in reused(doc)
    assert "exports/rag/playbooks.jsonl changed since run" in doc["recomputed"]["export-rag"]


# --- failures, kills and the publish -------------------------------------------------------


def test_a_failed_run_publishes_nothing_and_is_listed_as_failed(ws, sample_run, monkeypatch):
    from refinery import export
    from refinery.exporters import sft

    first = sample_run
    before = outputs(ws)
    (ws.root / "refinery.toml").write_text("[score]\naccept_min_score = 0.9\n")

    def leak(path, ws, allowed):
        raise export.LeakError("row 3 is rejected")

    real = sft.verify_sft
    monkeypatch.setattr(sft, "verify_sft", leak)
    result = invoke("run-all")
    assert result.exit_code == 1 and "nothing was published" in result.output
    assert outputs(ws) == before  # materialize and score ran, but their outputs were not published
    listed = orjson.loads(invoke("runs", "--json").stdout)
    assert [r["status"] for r in listed] == ["complete", "failed"]
    assert listed[1]["exit_code"] == 1 and "LeakError" in listed[1]["error"]
    assert not list((ws.root / "data").glob(".run-*"))  # the staging is gone
    monkeypatch.setattr(sft, "verify_sft", real)
    (ws.root / "refinery.toml").unlink()
    again = run_all()  # a failed run is never what a later run reuses or compares with
    assert again["drift"]["previous_run_id"] == first["run_id"]
    assert {r["reused_from"] for r in again["receipts"].values()} == {first["run_id"]}


def test_a_publish_killed_half_way_is_completed_by_the_next_writer(ws, sample_run, monkeypatch):
    from refinery import jsonl

    with open(ws.kb / "eval.csv", "ab") as f:
        f.write(EVAL_ROW % b"new")
    real, calls = jsonl.publish_dir, []

    def dies_on_the_third(staging, target):
        if ".run-" not in str(target):  # the run's publish, not a stage staging into the run
            calls.append(target)
            if len(calls) == 3:
                raise KeyboardInterrupt  # stands in for a kill between two renames
        real(staging, target)

    monkeypatch.setattr(jsonl, "publish_dir", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        runs.run_all(ws, load_config(ws.root))
    monkeypatch.setattr(jsonl, "publish_dir", real)
    assert len(calls) == 3
    staging = list((ws.root / "data").glob(".run-*"))
    assert len(staging) == 1 and (staging[0] / jsonl.PUBLISH_JOURNAL).is_file()

    listed = orjson.loads(invoke("runs", "--json").stdout)
    killed = listed[-1]["run_id"]
    result = invoke("run-all", "--json")  # takes the lock: completes the publish first
    assert result.exit_code == 0
    assert not list((ws.root / "data").glob(".run-*"))
    listed = orjson.loads(invoke("runs", "--json").stdout)
    assert next(r for r in listed if r["run_id"] == killed)["status"] == "complete"
    doc = orjson.loads(result.stdout)
    assert reused(doc) == STAGES  # the completed run's outputs are all in place and verified
    assert {r["reused_from"] for r in doc["receipts"].values()} == {killed}


def worker_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="watches worker processes through /proc (Linux)")
def test_a_run_killed_mid_way_leaves_the_previous_run_intact(ws, tmp_path):
    """A real SIGKILL in the middle of run-all (after materialize finished, before the end),
    with worker processes running (they must not keep the workspace locked)."""
    generate(6000, 7, ws.kb)
    (ws.root / "refinery.toml").write_text("[materialize]\nworkers = 2\nparallel_min_bytes = 0\n")
    env = {**os.environ, "REFINERY_WORKSPACE": str(ws.root), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "refinery", "run-all", "--json"]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    before_outputs = outputs(ws)
    before_reports = tree_bytes(ws.reports)

    with open(ws.kb / "eval.csv", "ab") as f:
        f.write(EVAL_ROW % b"new")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # kill it once materialize is done and a later stage's workers are running
    while not (list(ws.reports.glob("*/receipts/materialize.json"))[1:] and worker_pids(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None, "never saw a later stage's workers"
        time.sleep(0.002)
    workers = worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(ws.reports.glob("*/receipts/export-sft.json"))[1:], "the run finished before the kill"
    while any(Path(f"/proc/{w}").exists() for w in workers):  # orphaned workers leave with their parent
        assert time.monotonic() < deadline, f"workers {workers} outlived their killed parent"
        time.sleep(0.05)

    assert outputs(ws) == before_outputs  # nothing of the killed run was published
    after = tree_bytes(ws.reports)
    assert {k: after[k] for k in before_reports} == before_reports  # the previous run's reports untouched
    listed = orjson.loads(subprocess.run([sys.executable, "-m", "refinery", "runs", "--json"], env=env,
                                         capture_output=True, check=True).stdout)
    assert [r["status"] for r in listed] == ["complete", "incomplete"]
    assert listed[1]["exit_code"] is None and listed[1]["overall_hash"] is None

    resumed = orjson.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
    leftovers = [p.name for p in (ws.root / "data").iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # the killed run's staging and its stages' temp folders are gone
    fresh_ws = tmp_path / "fresh"
    shutil.copytree(ws.kb, fresh_ws / "data" / "_kb")
    shutil.copy(ws.root / "refinery.toml", fresh_ws)
    fresh = orjson.loads(subprocess.run(cmd, env={**env, "REFINERY_WORKSPACE": str(fresh_ws)},
                                        capture_output=True, check=True).stdout)
    assert hashes(resumed) == hashes(fresh)  # the next run gives what an uninterrupted one gives
    assert not list((ws.root / "data").glob(".run-*"))




def test_a_broken_chain_inside_a_run_fails_it_and_publishes_nothing(ws, sample_run, monkeypatch):
    """A scored-run file edited between score and the exports: the exports read other bytes
    than score wrote, so the chain check refuses to publish."""
    from refinery import score

    before = outputs(ws)
    (ws.root / "refinery.toml").write_text("[score]\naccept_min_score = 0.8\n")
    real = score.run

    def score_then_tamper(ws, cfg, **kw):
        result = real(ws, cfg, **kw)
        p = next(ws.scored_runs.rglob("*.jsonl"))
        p.write_bytes(p.read_bytes().replace(b'"category":"', b'"category": "', 1))
        return result

    monkeypatch.setattr(score, "run", score_then_tamper)
    result = invoke("run-all")
    assert result.exit_code == 1
    assert "RECEIPT CHECK FAILED" in result.output and "export-rag: read data/scored-runs/" in result.output
    assert outputs(ws) == before
    assert orjson.loads(invoke("runs", "--json").stdout)[-1]["status"] == "failed"


def test_a_workspace_whose_rows_are_all_quarantined_runs_twice(ws):
    (ws.kb / "gateway_receipts.jsonl").write_bytes(b"{not json\n")
    first, second = run_all(), run_all()
    assert first["receipts"]["materialize"]["counts"]["rows_out"] == 0
    assert reused(second) == STAGES and hashes(first) == hashes(second)


def hold_lock(ws, note: str) -> subprocess.Popen:
    """Another process holding the workspace lock, as run-all (note = its run id) or a stage command."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from refinery.workspace import Workspace\n"
         f"ws = Workspace.at({str(ws.root)!r})\n"
         f"with ws.lock():\n    ws.note_lock({note!r}); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_runs_tells_a_running_run_from_a_killed_one(ws, sample_run):
    done = sample_run
    in_progress = "29991231T000000000Z-ffff"  # sorts after the real run
    d = ws.reports / in_progress
    d.mkdir()
    summary = orjson.loads((ws.reports / done["run_id"] / "summary.json").read_bytes())
    (d / "summary.json").write_bytes(orjson.dumps({**summary, "run_id": in_progress, "status": "incomplete",
                                                   "exit_code": None, "overall_hash": None}))
    for note, shown in ((in_progress, "running"), ("", "incomplete")):  # run-all vs a stage command
        holder = hold_lock(ws, note)
        try:
            assert orjson.loads(invoke("runs", "--json").stdout)[-1]["status"] == shown
            if note:
                assert "is writing to" in invoke("run-all").output  # exit 2: one writer at a time
        finally:
            holder.kill()
            holder.wait()
    assert orjson.loads(invoke("runs", "--json").stdout)[-1]["status"] == "incomplete"


@pytest.mark.parametrize("damage", ["{bad", "[]", '{"severity": ["alert"]}'])
def test_runs_lists_a_run_whose_drift_report_is_damaged(ws, sample_run, damage):
    doc = sample_run
    (ws.reports / doc["run_id"] / "drift.json").write_text(damage)
    result = invoke("runs", "--json")
    assert result.exit_code == 0 and orjson.loads(result.stdout)[0]["drift_severity"] == "damaged"
    assert "damaged" in invoke("runs").stdout


def test_a_damaged_report_is_named_not_a_traceback(ws, sample_run):
    doc = sample_run
    (ws.reports / doc["run_id"] / "summary.json").write_text("{bad")
    assert orjson.loads(invoke("runs", "--json").stdout)[0]["status"] == "unreadable"
    result = invoke("receipts", "--run-id", doc["run_id"])
    assert result.exit_code == 2 and "summary.json: not valid JSON" in result.output
    again = run_all()  # a damaged run is neither reused from nor compared with
    assert reused(again) == [] and again["drift"]["previous_run_id"] is None


@pytest.mark.parametrize(("file", "field"), [("summary.json", "totals"), ("drift.json", "severity")])
def test_receipts_catches_an_edited_summary_or_drift_report(ws, sample_run, file, field):
    doc = sample_run
    path = ws.reports / doc["run_id"] / file
    report = orjson.loads(path.read_bytes())
    report[field] = {"scored": 1} if field == "totals" else "alert"
    path.write_bytes(orjson.dumps(report))
    result = invoke("receipts", "--json")
    assert result.exit_code == 1
    problems = orjson.loads(result.stdout)["checks"]["problems"]
    assert problems[0].startswith(f"reports/distillation/{doc['run_id']}/{file}: {file.split('.')[0]}_hash ")
    assert problems[0].endswith("it was edited after the run")


def test_a_run_publishes_a_pointer_to_itself_with_its_summary_hash(ws, sample_run):
    doc = sample_run
    pointer = orjson.loads(runs.published_path(ws).read_bytes())
    assert pointer == {"schema_version": 1, "run_id": doc["run_id"], "summary_hash": doc["summary"]["summary_hash"]}
    assert doc["summary"]["summary_hash"] == runs.summary_hash(doc["summary"])
    assert doc["summary"]["drift_hash"] == doc["drift"]["drift_hash"] == drift.drift_hash(doc["drift"])
    jsonschema.validate(pointer, schema("published_run"))


def test_a_run_recorded_before_summaries_were_sealed_is_not_called_edited(sample):
    """A workspace upgraded from a version whose summaries (schema 1) had no summary_hash."""
    doc = run_all()
    path = sample.reports / doc["run_id"] / "summary.json"
    old = {k: v for k, v in orjson.loads(path.read_bytes()).items() if k not in ("summary_hash", "drift_hash")}
    path.write_bytes(orjson.dumps({**old, "schema_version": 1}))
    result = invoke("receipts", "--json")
    assert result.exit_code == 0, result.output


def test_a_damaged_receipt_s_outputs_are_reported_not_a_crash(tmp_path):
    """An output listed by several receipts is checked once; a damaged record (rows a list)
    is reported as a problem, not a TypeError."""
    from refinery.workspace import Workspace

    ws = Workspace.at(tmp_path)
    f = {"path": "exports/quarantine/export.jsonl", "sha256": "0" * 64, "rows": 1}
    listed = {"export-rag": {"outputs": [f]}, "export-sft": {"outputs": [dict(f)]},
              "export-preference": {"outputs": [{**f, "rows": [1]}]}}
    assert [len(w) for _, w in receipts.recorded_outputs(listed)] == [2, 1]
    problems = receipts.check_files(ws, listed)
    assert problems[0] == "exports/quarantine/export.jsonl (written by export-rag, export-sft) is missing"
    assert len(problems) == 2
