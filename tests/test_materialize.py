from __future__ import annotations

import shutil

import pytest

from conftest import FIXTURES, evidence_rows, quarantine_rows, tree_bytes, write_kb, write_transform
from refinery import materialize
from refinery.canonical import sig_hash
from refinery.config import load_config
from refinery.models import EvidenceRecord, QuarantineRecord

# Every fixture stream at once: the end-to-end case with known counts.
EXPECTED_REASONS = {
    "bad_timestamp": 4, "blank_line": 1, "csv_malformed": 1, "duplicate_row": 3, "invalid_json": 1,
    "invalid_utf8": 1, "missing_field": 8, "not_an_object": 1, "wrong_type": 12,
}


#: The golden fixtures of refinery's own stream families (the public formats have their own tests).
OWN_FAMILIES = ("agent_transcripts", "auditor_verdicts", "eval_sheet", "gateway_receipts", "human_feedback",
                "openai_chat", "replays", "runs")


def load_all_fixtures(ws):
    for name in OWN_FAMILIES:
        for p in (FIXTURES / name).iterdir():
            if p.name != "expected.jsonl":
                shutil.copy(p, ws.kb / p.name)


def test_end_to_end_exact_counts(ws, cfg):
    load_all_fixtures(ws)
    result = materialize.run(ws, cfg, validate=True)
    assert (result.rows_in, result.evidence, result.quarantined) == (61, 29, 32)
    assert result.by_reason == EXPECTED_REASONS
    per_file = {f.source: (f.rows_in, f.evidence, f.quarantined) for f in result.files}
    assert per_file == {
        "agent_transcripts": (10, 4, 6), "auditor_verdicts": (5, 3, 2), "eval": (7, 4, 3),
        "gateway_receipts": (8, 3, 5), "human_feedback": (6, 2, 4), "openai_chat_log": (5, 3, 2),
        "replays": (9, 6, 3), "runs": (11, 4, 7),
    }
    for f in result.files:
        assert f.rows_in == f.evidence + f.quarantined
    assert len(evidence_rows(ws)) == result.evidence
    assert len(quarantine_rows(ws)) == result.quarantined


def test_partitioned_by_recorded_at_with_provenance(ws, cfg):
    load_all_fixtures(ws)
    materialize.run(ws, cfg)
    for p in ws.evidence.rglob("*.jsonl"):
        y, m, d, name = p.relative_to(ws.evidence).parts
        for row in evidence_rows_of(p):
            assert row["recorded_at"].startswith(f"{y}-{m}-{d}T")
            assert name == f"{row['source']}.jsonl"
            prov = row["provenance"]
            assert prov["recorded_at"] == row["recorded_at"]
            assert prov["source_file"].startswith("data/_kb/")


def evidence_rows_of(p):
    import orjson

    return [orjson.loads(line) for line in p.read_bytes().splitlines()]


def test_provenance_points_at_the_source_line_and_its_hash(ws, cfg):
    load_all_fixtures(ws)
    materialize.run(ws, cfg)
    import orjson

    for row in evidence_rows(ws):
        prov = row["provenance"]
        src = ws.root / prov["source_file"]
        if src.suffix == ".jsonl":
            line = src.read_bytes().splitlines()[prov["line_offset"]]
            assert sig_hash(orjson.loads(line)) == prov["sig_hash"]
    for q in quarantine_rows(ws):
        QuarantineRecord.model_validate(q)


def test_records_validate_against_the_model(ws, cfg):
    load_all_fixtures(ws)
    materialize.run(ws, cfg)
    for row in evidence_rows(ws):
        assert list(EvidenceRecord.model_validate(row).model_dump(mode="json")) == list(row)


def test_a_partition_of_one_part_takes_its_writer_s_hash(ws, cfg, monkeypatch):
    """Evidence bytes are hashed as they are written: a partition made of one part is not read
    again for its sha256, and the recorded sha256 is the file's."""
    import hashlib

    load_all_fixtures(ws)
    real = materialize.file_sha256

    def sources_only(path):  # the sources are hashed as materialize reads them; evidence never again
        assert "/data/_kb/" in str(path), f"{path} was read again"
        return real(path)

    monkeypatch.setattr(materialize, "file_sha256", sources_only)
    result = materialize.run(ws, cfg)
    evidence = [o for o in result.outputs if o["path"].startswith("data/evidence/")]
    assert evidence and all(hashlib.sha256((ws.root / o["path"]).read_bytes()).hexdigest() == o["sha256"]
                            for o in evidence)
    assert not list(ws.evidence.rglob("*.sha256"))  # the writers' notes stay with the parts


def test_two_runs_give_identical_bytes_whatever_the_worker_count(ws):
    load_all_fixtures(ws)
    serial = load_config(ws.root, overrides={"materialize": {"workers": 1}})
    parallel = load_config(ws.root, overrides={"materialize": {"workers": 2, "parallel_min_bytes": 0}})
    materialize.run(ws, serial)
    first = tree_bytes(ws.evidence), (ws.quarantine / "materialize.jsonl").read_bytes()
    materialize.run(ws, parallel)
    second = tree_bytes(ws.evidence), (ws.quarantine / "materialize.jsonl").read_bytes()
    assert first == second
    assert len(first[0]) > 5


def test_outputs_carry_hashes_and_rows(ws, cfg):
    load_all_fixtures(ws)
    result = materialize.run(ws, cfg)
    from refinery.canonical import file_sha256

    for o in result.outputs:
        p = ws.root / o["path"]
        assert file_sha256(p) == o["sha256"]
        assert len(p.read_bytes().splitlines()) == o["rows"]


def test_a_rerun_replaces_the_previous_evidence(ws, cfg):
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "a", "completion": "b"}\n'})
    materialize.run(ws, cfg)
    (ws.kb / "gateway_receipts.jsonl").write_text('{"ts": "2026-11-09T00:00:00Z", "prompt": "a", "completion": "b"}\n')
    materialize.run(ws, cfg)
    assert [p.relative_to(ws.evidence).as_posix() for p in ws.evidence.rglob("*.jsonl")] == [
        "2026/11/09/gateway_receipts.jsonl"]


def test_a_crash_mid_run_leaves_the_previous_output_intact(ws, cfg, monkeypatch):
    load_all_fixtures(ws)
    materialize.run(ws, cfg)
    before = tree_bytes(ws.evidence), (ws.quarantine / "materialize.jsonl").read_bytes()

    real = materialize.process_file
    calls = []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill: not an Exception a transform could swallow
        return real(*a, **kw)

    monkeypatch.setattr(materialize, "process_file", dying)
    (ws.kb / "gateway_receipts.jsonl").write_text('{"ts": 1762000000, "prompt": "changed", "completion": "b"}\n')
    with pytest.raises(KeyboardInterrupt):
        materialize.run(ws, cfg)
    after = tree_bytes(ws.evidence), (ws.quarantine / "materialize.jsonl").read_bytes()
    assert after == before
    leftovers = [p.name for p in (ws.root / "data").iterdir() if p.name.startswith(".")]
    assert leftovers == [".refinery.lock"]  # no staging folder, no half-written part


@pytest.mark.slow
def test_one_writer_per_workspace(ws, cfg):
    """Another process holding the lock stops a run at once; this process may re-enter its own
    lock (run-all holds it across the stages it calls)."""
    import subprocess
    import sys

    from refinery.workspace import WorkspaceBusy

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from refinery.workspace import Workspace\n"
         f"with Workspace.at({str(ws.root)!r}).lock():\n    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ws.holder() == (holder.pid, "")
        with pytest.raises(WorkspaceBusy, match="another refinery run"):
            materialize.run(ws, cfg)
    finally:
        holder.kill()
        holder.wait()
    assert ws.holder() is None  # killed while holding it: the lock is free again
    with ws.lock():
        materialize.run(ws, cfg)  # re-entrant within one process


def test_an_unreadable_file_is_reported_and_the_run_goes_on(ws, cfg, monkeypatch):
    load_all_fixtures(ws)
    real = materialize.file_sha256

    def deny(path, *a):
        if str(path).endswith("eval.csv"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a)

    monkeypatch.setattr(materialize, "file_sha256", deny)
    result = materialize.run(ws, cfg)
    assert result.file_errors == ["data/_kb/eval.csv: cannot read: Permission denied"]
    assert result.evidence == 25  # everything else went through (29 less eval's 4)
    q = [r for r in quarantine_rows(ws) if r["reason"] == "unreadable_file"]
    assert len(q) == 1 and q[0]["provenance"]["line_offset"] is None


def test_an_empty_file_is_a_warning(ws, cfg):
    write_kb(ws, {"runs.csv": "", "gateway_receipts.jsonl": ""})
    result = materialize.run(ws, cfg)
    assert result.rows_in == 0
    assert sorted(w for f in result.files for w in f.warnings) == [
        "data/_kb/gateway_receipts.jsonl is empty", "data/_kb/runs.csv is empty"]


def test_a_transform_bug_is_counted_not_fatal(ws, cfg):
    write_transform(ws, "buggy", "def transform(row, ctx):\n    return 1 / 0\n")
    write_kb(ws, {"buggy.jsonl": '{"a": 1}\n{"a": 2}\n'})
    result = materialize.run(ws, cfg)
    assert result.transform_errors == 2
    assert result.files[0].first_transform_error.startswith(
        "data/_kb/buggy.jsonl:0: transform buggy raised ZeroDivisionError")
    assert {q["reason"] for q in quarantine_rows(ws)} == {"transform_error"}


def test_ignored_files_are_not_sources(ws):
    write_kb(ws, {"audit_baselines.jsonl": '{"seq": 0}\n', "notes.md": "# notes\n", ".hidden.jsonl": "x\n"})
    (ws.root / "refinery.toml").write_text('[materialize]\nignore = ["notes.md"]\n')
    result = materialize.run(ws, load_config(ws.root))
    assert result.files == [] and result.ignored == ["audit_baselines.jsonl", "notes.md"]


def test_a_file_refinery_cannot_read_is_refused_by_name_never_skipped(ws, cfg):
    write_kb(ws, {"notes.md": "# notes\n", "weights.bin": b"\x00\x01\x02"})
    result = materialize.run(ws, cfg)
    assert [(f.source_file, f.container, f.rows_in, f.quarantined) for f in result.files] == [
        ("data/_kb/notes.md", None, 1, 1), ("data/_kb/weights.bin", None, 1, 1)]
    q = quarantine_rows(ws)
    assert [(r["reason"], r["provenance"]["source_file"], r["provenance"]["line_offset"]) for r in q] == [
        ("unsupported_container", "data/_kb/notes.md", None), ("unsupported_container", "data/_kb/weights.bin", None)]
    assert result.exit_code == 0  # a warning, not an error: nothing in them was meant for refinery


def _peak_materialize_memory(ws, rows: int) -> tuple[int, int]:
    import tracemalloc

    line = '{"ts": %d, "prompt": "%s", "completion": "%s"}\n'
    data = "".join(line % (1762000000 + i, "p" * 200 + str(i), "c" * 300) for i in range(rows))
    write_kb(ws, {"gateway_receipts.jsonl": data})
    del data
    size = (ws.kb / "gateway_receipts.jsonl").stat().st_size
    tracemalloc.start()
    materialize.run(ws, load_config(ws.root, overrides={"materialize": {"workers": 1}}))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size, peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_input(ws):
    """Streaming: doubling the input adds only the duplicate index (8-byte hash keys), never rows."""
    size1, peak1 = _peak_materialize_memory(ws, 10_000)
    size2, peak2 = _peak_materialize_memory(ws, 30_000)
    assert size2 - size1 > 10_000_000
    growth = (peak2 - peak1) / (size2 - size1)
    assert growth < 0.1, f"peak grew by {growth:.0%} of the added input ({peak1} → {peak2} bytes)"


def test_asking_who_holds_the_lock_never_releases_it(ws):
    """`holder()` (called by `runs`, run-all and the audit while they hold the lock) must not
    open another descriptor of the lock file: closing it would release the process's POSIX lock
    and let a second run in (seen: two run-alls 0.7 s apart, the second deleting the first's
    staging)."""
    import subprocess
    import sys

    from refinery.runs import list_runs

    probe = ("import sys; from refinery.workspace import Workspace, WorkspaceBusy\n"
             f"try:\n    Workspace.at({str(ws.root)!r}).lock(wait_s=0).__enter__()\n"
             "    print('got it')\nexcept WorkspaceBusy:\n    print('busy')")
    with ws.lock():
        ws.note_lock("run-x")
        assert ws.holder()[1] == "run-x"
        list_runs(ws)  # what run-all does before publishing
        ws.holder()
        got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        assert got == "busy"
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    assert got == "got it"


@pytest.mark.slow
def test_a_second_run_all_waits_for_the_first(ws):
    """Two `run-all`s moments apart: the second is refused while the first writes (it used to
    get in, because the first released its own lock when it read who held it). The first is
    paused once it is past its start, so the test does not depend on how fast the machine is."""
    import signal
    import subprocess
    import sys
    import time

    from refinery.sample import generate

    generate(2000, 3, ws.kb)
    cmd = [sys.executable, "-m", "refinery", "run-all", "--workspace", str(ws.root)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0  # a recorded run to read back
    with open(ws.kb / "gateway_receipts.jsonl", "ab") as f:  # then a source changes
        f.write(b'{"ts": 1762000000, "prompt": "new", "completion": "row"}\n')
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    others: dict[str, subprocess.Popen] = {}
    try:
        deadline = time.monotonic() + 60
        while (ws.holder() or (0, ""))[1] == "":  # until run-all has noted its run id
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # past its start: it has read the recorded runs (and, before the fix, let go)
        first.send_signal(signal.SIGSTOP)
        # a second run-all, a forced one and an audit; each waits out the lock (2 s) before it
        # gives up, so they are started together and wait together
        audit = [*cmd[:3], "audit-full", *cmd[4:]]
        for name, args in (("second", cmd), ("forced", [*cmd, "--force"]), ("audit", audit)):
            others[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, proc in others.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 2 and "another refinery run is writing" in err, (name, err)
        listed = subprocess.run([*cmd[:3], "runs", *cmd[4:]], capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "running" in listed.stdout  # and it did not clean up under the run
        assert list((ws.root / "data").glob(".run-*"))
    finally:
        for proc in others.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=180) == 0, first.stderr.read().decode()[-2000:]
