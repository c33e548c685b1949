"""run-all's single pass (refinery.single_pass): materialize scores each evidence line and reads
it for the exports as it writes it. Whatever the settings, worker count or partitions, the
outputs and receipts are byte for byte those of the stages run one by one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
from conftest import copy_sample, write_kb

from refinery import materialize, single_pass
from refinery.config import load_config
from refinery.runs import run_all
from refinery.workspace import Workspace

TREES = ("data/evidence", "data/scored-runs", "exports")


def _digests(ws: Workspace) -> dict[str, str]:
    return {p.relative_to(ws.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for tree in TREES for p in sorted((ws.root / tree).rglob("*")) if p.is_file()}


def _run(ws: Workspace, settings: dict, *, single_pass: bool, force: bool = True):
    outcome = run_all(ws, load_config(ws.root, None, settings), force=force, single_pass=single_pass)
    assert outcome.exit_code == 0
    assert [p.name for p in (ws.root / "data").glob(".*")] == [".refinery.lock"], "a run leaves no temporary folder"
    hashes = {s: r["receipt_hash"] for s, r in outcome.receipts.items()}
    return outcome, _digests(ws), hashes


def _evidence_files(ws: Workspace) -> int:
    return sum(1 for _ in ws.evidence.rglob("*.jsonl"))


@pytest.mark.parametrize("settings", [
    {},
    {"materialize": {"workers": 2, "parallel_min_bytes": 0}},
    {"export": {"include_partial": True, "sensitive": "redact", "dedup": False}},
], ids=["defaults", "two-workers", "partial-redact-nodedup"])
def test_the_single_pass_writes_what_the_stages_write_one_by_one(ws, settings):
    copy_sample(ws.kb)
    _, staged, staged_receipts = _run(ws, settings, single_pass=False)
    outcome, single, single_receipts = _run(ws, settings, single_pass=True)
    assert single == staged and len(single) > 100
    assert single_receipts == staged_receipts
    # every partition of the sample is one source file's: each was taken from the pass, none re-read
    assert len(outcome.materialize.prepared.tails) == _evidence_files(ws) > 50


def test_task_buckets_cut_before_the_evidence_is_known_change_no_byte(ws, monkeypatch):
    """The pass cuts a grouped export's candidates into task buckets from the sources' size
    (spread into the buckets' files as each partition's tail closes); the export is the same."""
    copy_sample(ws.kb)
    _, staged, _ = _run(ws, {}, single_pass=False)
    monkeypatch.setattr(single_pass, "BUCKET_BYTES", 4096)
    outcome, single, _ = _run(ws, {}, single_pass=True)
    assert outcome.materialize.prepared.plan.buckets > 100
    assert single == staged


PAIRS = '''
from refinery.transform import Emit, Keyed, RowError, TransformSpec, new_evidence
from refinery.reasons import Reason

SPEC = TransformSpec(name="qa_pairs", patterns=("qa*.jsonl",), format="json", kind="qa")

def transform(row, ctx):
    raise RowError(Reason.MISSING_FIELD, "not a q or an a")

def join_key(row, ctx):
    return Keyed(f"id:{row['q']}", "question") if "q" in row else Keyed(f"id:{row['a']}", "answer")

def assemble(group, ctx):
    qs = [m for m in group if m.role == "question"]
    ans = [m for m in group if m.role == "answer"]
    if not qs or not ans:
        return []
    q, a = qs[0], ans[0]
    ev = new_evidence("qa", recorded_at="2026-11-05T00:00:00Z", prompt=q.row["text"], response=a.row["text"])
    if a.row["a"] % 4 == 0:  # signals without their fields: score refuses it
        ev["signals"] = {"eval_score": 0.9}
    return [Emit(ev, a, (q,))]
'''


def test_a_partition_put_together_from_several_parts_is_renumbered(ws, monkeypatch):
    """Joined records come out of many buckets into one partition: its lines are numbered only
    once the parts are put together, so the parts' tails are joined with every line renumbered
    (scored runs, score's and the exports' refusals, candidates, and the scored runs' sig_hash).
    Here the importer's evidence lacks a signal, so score refuses some rows as well."""
    copy_sample(ws.kb)
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "qa_pairs.py").write_text(PAIRS)
    qs = b"".join(orjson.dumps({"q": i, "text": f"question {i}"}) + b"\n" for i in range(60))
    ans = b"".join(orjson.dumps({"a": i, "text": f"answer {i}"}) + b"\n" for i in range(60))
    write_kb(ws, {"qa_questions.jsonl": qs, "qa_answers.jsonl": ans})
    monkeypatch.setattr(materialize, "BUCKET_BYTES", 256)  # many join buckets, each a part of the partition
    _, staged, staged_receipts = _run(ws, {}, single_pass=False)
    outcome, single, single_receipts = _run(ws, {}, single_pass=True)
    assert (single, single_receipts) == (staged, staged_receipts)
    qa = "2026/11/05/qa_answers.jsonl"  # named after the answers, the records the evidence is built on
    assert sum(1 for _ in (ws.evidence / qa).open()) == 60
    assert outcome.receipts["score"]["counts"]["quarantined"] == 15
    # every partition, the joined ones too (the sample's own joined sources are cut into many buckets)
    assert len(outcome.materialize.prepared.tails) == _evidence_files(ws)


def test_exports_take_the_pass_when_score_is_reused(ws):
    """A source changes in a way that leaves the evidence as it was (a repeated line) and an
    export setting changes: materialize runs (with its pass), score is reused, the exports run
    from the pass's parts — the same bytes and receipts as the stages one by one."""
    def sequence(root: Path, single_pass: bool):
        w = Workspace(root)
        copy_sample(w.kb)
        _run(w, {}, single_pass=single_pass)
        runs = w.kb / "runs.csv"  # its header, then a line repeated
        runs.write_bytes(runs.read_bytes() + runs.read_bytes().splitlines(keepends=True)[1])
        outcome, digests, hashes = _run(w, {"export": {"include_partial": True}}, single_pass=single_pass,
                                        force=False)
        assert outcome.receipts["score"]["reused_from"] is not None
        assert outcome.receipts["materialize"]["reused_from"] is None
        return outcome, digests, hashes

    _, staged, staged_receipts = sequence(ws.root / "staged", False)
    outcome, single, single_receipts = sequence(ws.root / "single", True)
    assert (single, single_receipts) == (staged, staged_receipts)
    assert outcome.materialize.prepared.tails



def test_evidence_changed_after_it_was_written_stops_the_run(ws, monkeypatch):
    """The pass hands score and export what it wrote, but the evidence is still hashed from disk
    once a run (score's inputs; export's staleness check takes that digest): evidence changed
    after materialize wrote it stops the run, naming the file, and nothing is published."""
    from refinery.score import StaleInputError

    copy_sample(ws.kb)
    real = materialize.run
    changed = []

    def then_change(*args, **kwargs):
        result = real(*args, **kwargs)
        target = sorted(args[0].evidence.rglob("*.jsonl"))[0]
        target.write_bytes(target.read_bytes() + b"\n")
        changed.append(args[0].rel(target))
        return result

    monkeypatch.setattr(materialize, "run", then_change)
    with pytest.raises(StaleInputError, match="changed since it was scored") as e:
        run_all(ws, load_config(ws.root), single_pass=True)
    assert changed[0] in str(e.value)
    assert not ws.evidence.exists()


DAYS = '''
from datetime import date, timedelta
from refinery.transform import TransformSpec, new_evidence, new_signals

SPEC = TransformSpec(name="days", patterns=("days*.jsonl",), format="json", kind="qa")

def transform(row, ctx):
    day = (date(2026, 1, 1) + timedelta(days=row["day"])).isoformat()
    good = row["a"].endswith(".0")  # the first answer of a day is approved and scored high, the second low
    return new_evidence("qa", recorded_at=f"{day}T00:00:00Z", prompt=row["q"],
                        response=row["a"] * row.get("times", 1),
                        signals=new_signals(eval_score=0.95 if good else 0.1, approved=good, approver="qa",
                                            stop_reason="stop"))
'''


def _days(ws: Workspace, days: int, extra: tuple[dict, ...] = ()) -> None:
    """A source with a partition a day (two rows each, the days taken in turn), read by a
    transform of its own."""
    (ws.root / "transforms").mkdir(exist_ok=True)
    (ws.root / "transforms" / "days.py").write_text(DAYS)
    rows = [{"day": d, "q": f"question {d % 7}", "a": f"answer {d}.{i}"} for i in range(2) for d in range(days)]
    write_kb(ws, {"days.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in [*rows, *extra])})


def test_a_job_keeps_only_some_tails_open(ws, monkeypatch):
    """A source with a partition a day: past OPEN_PARTS (OPEN_TAILS with the pass), the least
    recently written partitions close their files and open them again to append — the same bytes."""
    _days(ws, 40)
    _, staged, staged_receipts = _run(ws, {}, single_pass=False)
    monkeypatch.setattr(materialize, "OPEN_PARTS", 2)
    assert _run(ws, {}, single_pass=False)[1:] == (staged, staged_receipts)
    monkeypatch.setattr(single_pass, "OPEN_TAILS", 2)
    outcome, single, single_receipts = _run(ws, {}, single_pass=True)
    assert (single, single_receipts) == (staged, staged_receipts)
    assert len(outcome.materialize.prepared.tails) == 40


def test_a_tail_closed_for_now_still_spreads_its_grouped_candidates(ws, monkeypatch):
    """Past DIRECT_BUCKETS a tail writes a grouped export's candidates into one file and spreads
    them into their buckets when it closes — also when it had closed its files for now."""
    _days(ws, 40)
    _, staged, _ = _run(ws, {}, single_pass=False)
    monkeypatch.setattr(single_pass, "OPEN_TAILS", 2)
    monkeypatch.setattr(single_pass, "BUCKET_BYTES", 64)
    outcome, single, _ = _run(ws, {}, single_pass=True)
    assert outcome.materialize.prepared.plan.buckets > single_pass.DIRECT_BUCKETS
    assert outcome.receipts["export-preference"]["counts"]["written"] > 10  # pairs came out of the spread
    assert single == staged


def test_an_evidence_line_over_the_line_limit_is_refused_by_score_as_on_its_own(ws):
    """An evidence line longer than score reads (1 MiB) made from a short source line: score
    refuses it alike, whether it reads the file or the pass hands it the line."""
    _days(ws, 2, ({"day": 0, "q": "long one", "a": "y" * 1024, "times": 1100},))
    _, staged, staged_receipts = _run(ws, {}, single_pass=False)
    _, single, single_receipts = _run(ws, {}, single_pass=True)
    assert (single, single_receipts) == (staged, staged_receipts)
    (q,) = [orjson.loads(line) for line in (ws.root / "exports/quarantine/score.jsonl").read_bytes().splitlines()]
    assert "line_too_long" in q["detail"]


def test_a_low_open_file_limit_still_runs(ws):
    """With a low open-file limit (256, soft and hard), a source of 60 daily partitions runs:
    fewer tails keep their files open at once, instead of the run running out of them."""
    import subprocess
    import sys

    _days(ws, 60)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            "from pathlib import Path; from refinery.config import load_config; from refinery.runs import run_all; "
            "from refinery.workspace import Workspace; root = Path(sys.argv[1]); "
            "o = run_all(Workspace(root), load_config(root), force=True); "
            "print(o.exit_code, o.receipts['score']['counts']['rows_out'])")
    done = subprocess.run([sys.executable, "-c", code, str(ws.root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "120"]
