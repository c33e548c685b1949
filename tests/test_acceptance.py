"""The acceptance gate: it passes on its fixture, prints every numbered invariant, and each of
its own invariants (determinism, pinned counts, coverage) fails on a deliberately broken input.
The on-disk invariants it shares with audit-full are broken one by one in test_invariants.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from conftest import REPO
from refinery import acceptance
from refinery.acceptance import FIXTURE, check_workspaces, run_gate
from refinery.cli import app
from refinery.invariants import INVARIANTS
from refinery.workspace import Workspace

runner = CliRunner()


def failed(checks) -> set[str]:
    return {c.key for c in checks if not c.ok}


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    dest = tmp_path / "fixture"
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.slow
def test_the_gate_passes_on_its_fixture_and_prints_every_invariant():
    result = runner.invoke(app, ["acceptance"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln[:3].strip().isdigit()]
    assert len(lines) >= 22 and all(" PASS  " in ln for ln in lines)
    assert [int(ln[:3]) for ln in lines] == list(range(1, len(lines) + 1))  # numbered in order
    assert f"acceptance: {len(lines)} of {len(lines)} invariants hold" in result.stdout
    doc = orjson.loads(runner.invoke(app, ["acceptance", "--json"]).stdout)
    assert doc["ok"] and len(doc["checks"]) == len(lines)
    assert {c["key"] for c in doc["checks"]} >= {k for k, _, _ in INVARIANTS} | {k for k, _, _ in acceptance.GATE_ONLY}


def test_the_fixture_is_what_it_claims():
    kb = sorted(p.name for p in (FIXTURE / "kb").iterdir())
    assert "notes_unclaimed.jsonl" in kb and "support_bot.jsonl" in kb  # unknown source, mapped source
    expected = orjson.loads((FIXTURE / "expected.json").read_bytes())
    assert set(expected["materialize"]["by_reason"]) == {
        r.value for r in acceptance.MATERIALIZE_REASONS if r not in acceptance.NOT_PLANTABLE}
    assert {r for e in expected["exports"].values() for r in e["by_reason"]} == {
        r.value for r in acceptance.EXPORT_REASONS}
    assert all(n > 0 for n in expected["score"]["by_category"].values())


@pytest.mark.slow
def test_determinism_fails_when_the_runs_differ(gate_dir, tmp_path):
    wss = [Workspace.at(shutil.copytree(gate_dir / n, tmp_path / n, symlinks=True)) for n in ("run-a", "run-b")]
    expected = orjson.loads((FIXTURE / "expected.json").read_bytes())
    assert failed(check_workspaces(wss[0], wss[1], expected)) == set()
    # the second run's export differs by one byte (as if a timestamp had crept in)
    p = wss[1].root / "exports" / "rag" / "playbooks.jsonl"
    p.write_bytes(p.read_bytes().replace(b'"schema_version":1', b'"schema_version": 1', 1))
    checks = check_workspaces(wss[0], wss[1], expected)
    assert failed(checks) == {"determinism"}
    assert next(c for c in checks if c.key == "determinism").problems == [
        "exports/rag/playbooks.jsonl: differs between the two runs"]


@pytest.mark.parametrize(("edit", "key"), [
    (lambda e: e["materialize"]["by_reason"].update(invalid_json=99), "expected_materialize"),
    (lambda e: e["score"]["by_category"].update(accepted=0), "expected_categories"),
    (lambda e: e["exports"]["export-sft"]["counts"].update(written=1), "expected_exports"),
])
def test_pinned_counts_fail_when_they_differ(gate_dir, edit, key):
    """The gate's checks on its two runs of the fixture (conftest.py's gate_dir), against pinned
    counts that differ by one edit. (That the gate reads them from the fixture's expected.json
    is test_a_broken_fixture_exits_1_and_a_missing_one_2's.)"""
    doc = orjson.loads((FIXTURE / "expected.json").read_bytes())
    edit(doc)
    checks = check_workspaces(Workspace.at(gate_dir / "run-a"), Workspace.at(gate_dir / "run-b"), doc)
    assert failed(checks) == {key}
    assert all("expected" in p for p in next(c for c in checks if c.key == key).problems)


@pytest.mark.slow
def test_coverage_fails_when_the_fixture_loses_a_family_a_rule_or_a_defect(fixture_copy):
    (fixture_copy / "kb" / "notes_unclaimed.jsonl").unlink()  # the only unknown_source row
    p = fixture_copy / "kb" / "gateway_receipts_extra.jsonl"  # its first row is the only truncated one
    p.write_bytes(b"".join(p.read_bytes().splitlines(keepends=True)[1:]))
    (fixture_copy / "kb" / "human_feedback.jsonl").unlink()  # the only human_feedback stream
    (fixture_copy / "kb" / "batch_output.jsonl").unlink()  # its second response is truncated too
    (fixture_copy / "kb" / "langsmith_runs.jsonl").unlink()  # and so is one of these runs
    checks = {c.key: c for c in run_gate(fixture_copy)}
    assert checks["covers_every_defect"].problems == ["no fixture row is quarantined as unknown_source"]
    assert "no fixture row fires the scorer rule truncated" in checks["covers_every_rule"].problems
    assert checks["covers_every_family"].problems[0].startswith("no fixture file for the human_feedback transform")
    assert not checks["expected_materialize"].ok  # and the pinned counts notice too
    assert all(checks[k].ok for k, _, _ in INVARIANTS)  # the outputs themselves are still sound


@pytest.mark.slow
def test_a_broken_fixture_exits_1_and_a_missing_one_2(fixture_copy, tmp_path):
    doc = orjson.loads((fixture_copy / "expected.json").read_bytes())
    doc["score"]["by_category"]["rejected"] += 1
    (fixture_copy / "expected.json").write_bytes(orjson.dumps(doc))
    result = runner.invoke(app, ["acceptance", "--fixture", str(fixture_copy)])
    assert result.exit_code == 1
    assert " FAIL  expected_categories" in result.stdout and "FAILED: expected_categories" in result.stdout
    assert runner.invoke(app, ["acceptance", "--fixture", str(tmp_path / "nope")]).exit_code == 2
    (fixture_copy / "expected.json").unlink()
    result = runner.invoke(app, ["acceptance", "--fixture", str(fixture_copy)])
    assert result.exit_code == 2 and "--write-expected" in result.output


@pytest.mark.slow
def test_write_expected_pins_what_the_fixture_gives(fixture_copy, tmp_path):
    (fixture_copy / "expected.json").unlink()
    result = runner.invoke(app, ["acceptance", "--fixture", str(fixture_copy), "--write-expected",
                                 "--keep", str(tmp_path / "kept")])
    assert result.exit_code == 0, result.output
    assert orjson.loads((fixture_copy / "expected.json").read_bytes()) == orjson.loads(
        (FIXTURE / "expected.json").read_bytes())
    assert (tmp_path / "kept" / "run-a" / "exports" / "sft" / "instruction_response.jsonl").is_file()
    assert Workspace.at(tmp_path / "kept" / "run-b").reports.is_dir()
    again = runner.invoke(app, ["acceptance", "--keep", str(tmp_path / "kept")])
    assert again.exit_code == 2 and "is not empty" in again.output


def test_acceptance_and_audit_do_not_import_the_training_stack():
    code = ("import sys, refinery.acceptance, refinery.audit, refinery.invariants; "
            "heavy = [m for m in ('mlx', 'mlx_lm', 'transformers', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_determinism_catches_output_that_depends_on_the_hash_seed(fixture_copy):
    t = fixture_copy / "transforms" / "flaky_tool.py"
    t.write_text(t.read_text().replace('response=text(row, "a"))',
                                       'response=f"{text(row, \'a\')} #{hash(\'salt\') % 997}")'))
    checks = {c.key: c for c in run_gate(fixture_copy)}
    assert not checks["determinism"].ok
    assert any("receipt_hash" in p for p in checks["determinism"].problems)
