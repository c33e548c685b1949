"""refinery.api: what the commands do, called from Python as a script would."""

from __future__ import annotations

import pytest

from conftest import copy_sample
from refinery import api
from refinery.errors import RefineryError


def test_a_script_runs_the_pipeline_audits_it_and_traces_a_row(tmp_path):
    copy_sample(tmp_path / "data" / "_kb")
    notes: list[str] = []
    outcome = api.run_all(tmp_path, log=notes.append)
    assert outcome.exit_code == 0 and outcome.summary["status"] == "complete"
    again = api.run_all(tmp_path, log=notes.append)
    assert all(r["reused_from"] == outcome.run_id for r in again.receipts.values())
    assert any("reused the outputs" in n for n in notes)
    result = api.audit(tmp_path, rerun=False)
    assert result.ok, [c.problems for c in result.checks if not c.ok]
    sft = tmp_path / "exports" / "sft" / "instruction_response.jsonl"
    row_id = sft.read_text().split('"id":"', 1)[1].split('"', 1)[0]
    assert api.trace(tmp_path, row_id).ok
    assert api.convert(sft, tmp_path / "alpaca.jsonl", "alpaca") == outcome.receipts["export-sft"]["counts"]["written"]


def test_errors_a_script_meets_have_the_one_root(tmp_path):
    with pytest.raises(RefineryError, match="does not exist"):
        api.run_all(tmp_path / "nowhere")
    (tmp_path / "refinery.toml").write_text("[export]\nmax_pairs_per_task = -1\n")
    with pytest.raises(RefineryError, match="max_pairs_per_task"):
        api.open_workspace(tmp_path)
    with pytest.raises(RefineryError):
        api.trace(tmp_path, "sft-0000000000000000")
    with pytest.raises(RefineryError, match="does not exist"):
        api.trace(tmp_path / "nowhere", "sft-0000000000000000")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RefineryError, match="no source folder"):  # nothing is run, nothing written
        api.run_all(empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(RefineryError, match="export-all"):
        api.convert(tmp_path / "nope.jsonl", tmp_path / "x.jsonl", "trl")
