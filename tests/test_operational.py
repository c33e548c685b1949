"""Operational errors are not bugs: a full disk, Ctrl-C or a reader that goes away (`| head`)
give a message that says what happened, what to do and what was kept, a meaningful exit code,
no traceback and no stray temporary files."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from conftest import write_kb
from refinery import jsonl, receipts
from refinery.cli import app

runner = CliRunner()
ROWS = "".join(f'{{"ts": 1762000000, "prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(20))


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders a stopped command could leave: atomic-write temps, run and
    stage stagings."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith(".run-") or ".staging-" in p.name)


def published(ws) -> dict[str, bytes]:
    return {p.relative_to(ws.root).as_posix(): p.read_bytes()
            for tree in ("data/evidence", "data/scored-runs", "exports") for p in sorted((ws.root / tree).rglob("*"))
            if p.is_file()}


def runs_listed() -> list[dict]:
    return orjson.loads(invoke("runs", "--json").stdout)


@pytest.fixture
def ran(ws):
    write_kb(ws, {"gateway_receipts.jsonl": ROWS})
    assert invoke("run-all").exit_code == 0
    (ws.kb / "gateway_receipts.jsonl").write_text(ROWS.replace("a1", "b1"))  # the next run recomputes
    return ws


def full_disk_after(n: int):
    """A JsonlWriter.write that fails as a full disk does, after `n` rows."""
    real, count = jsonl.JsonlWriter.write, [0]

    def write(self, row):
        count[0] += 1
        if count[0] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row)
    return write


def test_a_full_disk_in_run_all_is_a_message_not_a_traceback(ran, monkeypatch):
    before, real = published(ran), jsonl.JsonlWriter.write
    monkeypatch.setattr(jsonl.JsonlWriter, "write", full_disk_after(5))
    result = invoke("run-all")
    assert result.exit_code == 2
    assert "error: no space left on the device: free some space" in result.stderr
    assert "is recorded as failed and published nothing: the outputs of the previous run are as they were" \
        in result.stderr
    assert published(ran) == before and leftovers(ran.root) == []
    monkeypatch.setattr(jsonl.JsonlWriter, "write", real)
    assert [r["status"] for r in runs_listed()] == ["complete", "failed"]


def test_a_disk_too_full_to_record_the_failure_still_leaves_nothing_behind(ran, monkeypatch):
    """The receipt write fails, and so does the summary that would record the failure."""
    before = published(ran)

    def full(path, doc):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(receipts, "write_json", full)
    result = invoke("run-all")
    assert result.exit_code == 2 and "no space left on the device (" in result.stderr
    assert "left no summary and published nothing" in result.stderr  # not even the first summary fitted
    assert published(ran) == before and leftovers(ran.root) == []


def test_a_full_disk_in_audit_full_is_a_message(ws, monkeypatch):
    write_kb(ws, {"gateway_receipts.jsonl": ROWS})
    assert invoke("run-all").exit_code == 0
    real = jsonl.atomic_write

    def full(path, *a, **kw):  # the report and the ledger are written through atomic_write
        if "audit" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)
    monkeypatch.setattr(jsonl, "atomic_write", full)
    result = invoke("audit-full")
    assert result.exit_code == 2 and "no space left on the device" in result.stderr, result.output
    assert "Traceback" not in result.output and leftovers(ws.root) == []


def test_an_atomic_write_that_fails_even_to_close_leaves_no_temp_file(tmp_path):
    """On a full disk the failed write's close flushes and fails again: the temp file (here a
    link to /dev/full, which refuses every write with ENOSPC) must still be removed."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    import os

    target = tmp_path / "out.jsonl"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.symlink_to("/dev/full")
    with pytest.raises(OSError) as e, jsonl.atomic_write(target) as f:
        f.write(b"x" * 10)
    assert e.value.errno == errno.ENOSPC
    assert not tmp.is_symlink() and not target.exists()


def test_ctrl_c_says_what_was_kept(ran, monkeypatch):
    from refinery import score

    before = published(ran)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(score, "run", interrupted)
    result = invoke("run-all")
    assert result.exit_code == 130
    assert "\ninterrupted. Run " in result.stderr and "published nothing" in result.stderr
    assert published(ran) == before and leftovers(ran.root) == []
    assert runs_listed()[-1]["status"] == "failed" and runs_listed()[-1]["exit_code"] == 130


@pytest.mark.parametrize("args,broken", [
    ([], "stdout"), ([], "both"), (["--json"], "stdout"), ([], "stderr"),
], ids=["stdout", "stdout-and-stderr", "json-stdout", "stderr-only"])
def test_a_reader_that_goes_away_does_not_fail_the_run(ran, args, broken):
    """`refinery run-all | head`, `2>&1 | head`, `--json | head` (its document is far over a pipe's
    buffer, so the write itself fails) and a closed stderr: the pipe is closed before refinery
    writes a byte. The run completes and is recorded as complete, and the exit code is the
    run's — not 1 (rich's broken-pipe exit), not a traceback and not a failed run."""
    import os

    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "refinery", "run-all", *args, "--workspace", str(ran.root)],
                          stdout=w if broken in ("stdout", "both") else subprocess.PIPE,
                          stderr=w if broken in ("stderr", "both") else subprocess.PIPE)
    os.close(w)
    assert proc.returncode == 0, proc.stderr
    for seen in (proc.stdout, proc.stderr):
        assert not seen or (b"Traceback" not in seen and b"BrokenPipe" not in seen), seen
    if args:
        assert len(proc.stdout or b"") == 0
    listed = runs_listed()
    assert [r["status"] for r in listed] == ["complete", "complete"]


def test_outputs_are_fsynced_unless_a_throwaway_workspace_says_not_to():
    """The suite runs with REFINERY_FSYNC=0 (conftest); refinery itself fsyncs by default."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "REFINERY_FSYNC"}
    probe = "from refinery import jsonl; print(jsonl.DURABLE)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout == "True\n"
    env["REFINERY_FSYNC"] = "0"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout == "False\n"


def test_ctrl_c_just_after_the_publish_keeps_the_run_complete(ran, monkeypatch):
    """The outputs are in place and the summary says complete; an interrupt before run-all
    returns must not rewrite that summary as failed (the audit would then refuse the run its
    published.json names)."""
    from refinery import runs

    real = runs.publish_together

    def then_interrupted(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "publish_together", then_interrupted)
    result = invoke("run-all")
    assert result.exit_code == 130 and "had already published its outputs; it is complete" in result.stderr
    monkeypatch.setattr(runs, "publish_together", real)
    assert [r["status"] for r in runs_listed()] == ["complete", "complete"]
    assert invoke("receipts").exit_code == 0 and leftovers(ran.root) == []


def test_one_failed_write_in_materialize_stops_the_run_not_the_file(ran, monkeypatch):
    """Only the first write fails: materialize once took it for an unreadable source,
    quarantined the file as unreadable_file and published the run without its rows."""
    before = published(ran)
    real, failed = jsonl.JsonlWriter.write, []

    def write(self, row):
        if not failed:
            failed.append(row)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row)
    monkeypatch.setattr(jsonl.JsonlWriter, "write", write)
    result = invoke("run-all")
    assert result.exit_code == 2 and "no space left on the device" in result.stderr
    assert "unreadable" not in result.output and published(ran) == before


def test_an_audit_stopped_between_its_ledger_row_and_its_head_is_finished_not_called_tampering(ws, monkeypatch):
    """append_ledger writes the row, then the head; a kill (or a full disk) between the two
    left a head one row behind, which the next audit took for rows cut off the end."""
    from refinery import audit

    write_kb(ws, {"gateway_receipts.jsonl": ROWS})
    assert invoke("run-all").exit_code == 0
    assert invoke("audit-full").exit_code == 0

    def stopped(ws, row):
        raise KeyboardInterrupt
    monkeypatch.setattr(audit, "_write_head", stopped)
    assert invoke("audit-full").exit_code == 130
    monkeypatch.undo()
    monkeypatch.chdir(ws.root)
    head = orjson.loads(audit.head_path(ws).read_bytes())
    assert head["seq"] == 0 and len(audit.ledger_path(ws).read_bytes().splitlines()) == 2  # one behind
    result = invoke("audit-full", "--workspace", str(ws.root))
    assert result.exit_code == 0, result.output
    assert [r["seq"] for r in audit.read_ledger(ws)] == [0, 1, 2]
