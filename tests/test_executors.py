"""Executors (refinery.executors): the per-partition work on this machine's process pool or as
Ray tasks gives the same files and receipt hashes — also when Ray has to run a task again
because its worker died."""

from __future__ import annotations

import errno
import hashlib
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_sample
from typer.testing import CliRunner

from refinery import executors
from refinery.cli import app
from refinery.config import load_config
from refinery.parallel import map_files
from refinery.runs import run_all

TREES = ("data/evidence", "data/scored-runs", "exports")
#: a transform that kills the worker process it runs in, the first time (a node lost mid-task)
KILLER = '''
import os
from pathlib import Path
from refinery.transform import TransformSpec, new_evidence, new_signals

SPEC = TransformSpec(name="killer", patterns=("killer*.jsonl",), format="jsonl", kind="run",
                     description="dies once")
MARK = Path(__file__).resolve().parent.parent / "killed-once"


def transform(row, ctx):
    if not MARK.exists():
        MARK.write_text(str(os.getpid()))
        os._exit(1)
    return new_evidence(SPEC.kind, recorded_at=row["at"], prompt=row["q"], response=row["a"],
                        signals=new_signals(eval_score=0.9, approved=True))
'''


def _disk_full_or_write(i: int, folder: str) -> None:
    """A piece of work that finds the disk full (the first), or writes its part a moment later."""
    if i == 0:
        raise OSError(errno.ENOSPC, "No space left on device")
    time.sleep(2)
    Path(folder).mkdir(exist_ok=True)
    (Path(folder) / str(i)).write_text("part")


def _digests(ws) -> dict[str, str]:
    return {p.relative_to(ws.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for tree in TREES for p in sorted((ws.root / tree).rglob("*")) if p.is_file()}


def test_a_cluster_address_nothing_answers_at_is_a_usage_error_at_once(ws):
    copy_sample(ws.kb)
    for address, said in (("127.0.0.1:1", "cannot reach a Ray cluster"), ("ray://127.0.0.1:1", "cannot reach"),
                          ("garbage", "write it as ray://host:10001")):
        result = CliRunner().invoke(app, ["run-all", "--workspace", str(ws.root), "--executor", "ray",
                                          "--ray-address", address])
        assert result.exit_code == 2 and said in result.output, result.output


def test_without_ray_installed_the_ray_executor_says_how_to_get_it(ws, monkeypatch):
    copy_sample(ws.kb)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    result = CliRunner().invoke(app, ["run-all", "--workspace", str(ws.root), "--executor", "ray"])
    assert result.exit_code == 2 and "pip install 'refinery[ray]'" in result.output
    assert not ws.evidence.exists()
    result = CliRunner().invoke(app, ["run-all", "--workspace", str(ws.root), "--executor", "spark"])
    assert result.exit_code == 2 and "choose local or ray" in result.output


@pytest.mark.slow
def test_ray_tasks_give_the_local_run_byte_for_byte_even_when_a_worker_dies(ws, tmp_path):
    ray = pytest.importorskip("ray")
    copy_sample(ws.kb)
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "killer.py").write_text(KILLER)
    (ws.kb / "killer.jsonl").write_text("".join(
        f'{{"at": "2026-11-0{1 + i % 3}T10:00:00Z", "q": "question {i}?", "a": "answer {i}."}}\n' for i in range(30)))
    mark = ws.root / "killed-once"
    # every piece of work goes to a worker (none in-process), cut small so that there are many
    settings = {"materialize": {"parallel_min_bytes": 0, "partition_bytes": 16384}}
    mark.write_text("not this time")
    local = run_all(ws, load_config(ws.root, None, settings), force=True)
    assert local.exit_code == 0
    expected = _digests(ws), {s: r["receipt_hash"] for s, r in local.receipts.items()}, local.summary["overall_hash"]

    mark.unlink()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = run_all(ws, load_config(ws.root, None, {**settings, "executor": {"kind": "ray"}}), force=True)
        assert ray.is_initialized()  # a run on a cluster that was already up leaves it up
        # a task's own error comes back as the local pool's would (its type and errno: the CLI's
        # exit 2 and message), and the others are stopped before the driver cleans up after them
        folder = tmp_path / "parts"
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
        with executors.using("ray"), pytest.raises(OSError) as failed:
            map_files(_disk_full_or_write, [(i, str(folder)) for i in range(6)], [1] * 6, workers=2,
                      parallel_min_bytes=0)
        assert failed.value.errno == errno.ENOSPC and type(failed.value) is OSError
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(3)
        assert not folder.exists()  # nothing still running wrote it again
    finally:
        ray.shutdown()
    assert remote.exit_code == 0
    assert mark.exists()  # a worker was killed mid-task, and Ray ran that task again
    got = _digests(ws), {s: r["receipt_hash"] for s, r in remote.receipts.items()}, remote.summary["overall_hash"]
    assert got == expected
    assert any(p.name == "killer.jsonl" for p in ws.evidence.rglob("*.jsonl"))
