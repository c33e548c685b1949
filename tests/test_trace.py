"""`refinery trace`: every hop checks, a tampered hop is named, CSV and JSONL sources alike."""

from __future__ import annotations

import shutil

import orjson
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, read_jsonl_file
from refinery import export, materialize, score
from refinery.cli import app
from refinery.trace import NotFound, trace

runner = CliRunner()


@pytest.fixture
def done(ws, cfg):
    for name in ("eval.csv", "agent_transcripts.jsonl"):
        shutil.copy(FIXTURES / "exports" / name, ws.kb / name)
    materialize.run(ws, cfg)
    score.run(ws, cfg)
    export.run(ws, cfg)
    return ws


def first(ws, rel, pred=lambda r: True):
    return next(r for r in read_jsonl_file(ws.root / rel) if pred(r))


@pytest.mark.parametrize("export_name", ["rag", "sft"])
def test_every_hop_checks_down_to_the_source_line(done, export_name):
    for row in read_jsonl_file(done.exports / export.PATHS[export_name]):
        t = trace(done, row["id"])
        assert t.ok
        hops = t.chains[0].hops
        assert [h.file.split("/")[1] for h in hops[1:]] == ["scored-runs", "evidence", "_kb"]


def test_a_pair_has_two_chains(done):
    pair = first(done, "exports/preference/chosen_rejected.jsonl")
    t = trace(done, pair["id"])
    assert [c.label for c in t.chains] == ["chosen", "rejected"] and t.ok
    assert t.chains[0].hops[-1].file != t.chains[1].hops[-1].file or \
        t.chains[0].hops[-1].line != t.chains[1].hops[-1].line


def test_quarantine_and_evidence_ids_trace_too(done):
    q = first(done, "exports/quarantine/export-sft.jsonl")
    assert trace(done, q["id"]).ok
    ev = read_jsonl_file(sorted(done.evidence.rglob("*.jsonl"))[0])[0]
    t = trace(done, ev["id"])
    assert t.ok and t.found_in.startswith("data/scored-runs/")


def test_a_changed_evidence_line_is_named(done):
    row = first(done, "exports/sft/instruction_response.jsonl")
    scored = first(done, row["provenance"]["source_file"])
    ev_rel = scored["provenance"]["source_file"]
    path = done.root / ev_rel
    path.write_bytes(path.read_bytes().replace(b'"kind":"eval"', b'"kind":"evil"', 1))
    t = trace(done, row["id"])
    assert not t.ok
    broken = t.chains[0].broken
    assert broken.file == ev_rel and "sig_hash differs" in broken.problem
    result = runner.invoke(app, ["trace", row["id"]])
    assert result.exit_code == 1
    assert f"broken at {ev_rel}" in result.output


def test_a_changed_source_line_is_named(done):
    row = first(done, "exports/rag/playbooks.jsonl", lambda r: r["source"] == "agent_transcripts")
    src = done.kb / "agent_transcripts.jsonl"
    lines = src.read_bytes().splitlines(keepends=True)
    t = trace(done, row["id"])
    line = t.chains[0].hops[-1].line
    lines[line] = lines[line].replace(b'"latency_ms": 900', b'"latency_ms": 901')
    assert b'901' in lines[line]
    src.write_bytes(b"".join(lines))
    t = trace(done, row["id"])
    assert t.chains[0].broken.file == "data/_kb/agent_transcripts.jsonl"


def test_a_missing_scored_file_is_named(done):
    row = first(done, "exports/rag/playbooks.jsonl")
    (done.root / row["provenance"]["source_file"]).unlink()
    t = trace(done, row["id"])
    assert "does not exist" in t.chains[0].broken.problem


def test_unknown_ids(done):
    with pytest.raises(NotFound):
        trace(done, "sft-ffffffffffffffff")
    assert runner.invoke(app, ["trace", "bogus"]).exit_code == 2


def test_cli_json(done):
    row = first(done, "exports/sft/instruction_response.jsonl")
    result = runner.invoke(app, ["trace", row["id"], "--json"])
    assert result.exit_code == 0
    doc = orjson.loads(result.output)
    assert doc["ok"] and len(doc["chains"][0]["hops"]) == 4
