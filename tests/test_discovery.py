from __future__ import annotations

import pytest

from conftest import evidence_rows, quarantine_rows, write_kb
from refinery import materialize
from refinery.config import load_config
from refinery.discovery import Registry, TransformLoadError
from refinery.sources import list_sources

MODULE = '''
from refinery.transform import TransformSpec, new_evidence, parse_timestamp, text
SPEC = TransformSpec(name="tickets", patterns=("tickets*.jsonl",), format="jsonl", kind="ticket")
def transform(row, ctx):
    return new_evidence("ticket", recorded_at=parse_timestamp(row.get("at"), "at"),
                        prompt=text(row, "q", required=True), response=text(row, "a"))
'''


def _reader(ws, reg, name, body):
    """The transform that claims data/_kb/`name` holding `body` (None: no one)."""
    write_kb(ws, {name: body})
    [src] = [s for s in list_sources(ws, [])[0] if s.kb_rel == name]
    return reg.claim(src).transform


def test_builtin_transforms_claim_the_sample_streams(ws, cfg):
    reg = Registry.load(ws.root, cfg)
    claims = {f: _reader(ws, reg, f, "a,b\n1,2\n" if f.endswith(".csv") else '{"a": 1}\n').spec.name for f in
              ["runs.csv", "eval.csv", "agent_transcripts.jsonl", "gateway_receipts.jsonl",
               "auditor_verdicts.jsonl", "human_feedback.jsonl", "openai_chat_log.jsonl"]}
    assert claims == {"runs.csv": "runs", "eval.csv": "eval_sheet", "agent_transcripts.jsonl": "agent_transcripts",
                      "gateway_receipts.jsonl": "gateway_receipts", "auditor_verdicts.jsonl": "auditor_verdicts",
                      "human_feedback.jsonl": "human_feedback", "openai_chat_log.jsonl": "openai_chat"}
    assert _reader(ws, reg, "runs.jsonl", '{"a": 1}\n') is None  # the format must match too


def test_a_module_dropped_into_the_workspace_is_picked_up(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "tickets.py").write_text(MODULE)
    write_kb(ws, {"tickets.jsonl": '{"at": "2026-11-05T00:00:00Z", "q": "Reset my password", "a": "Done."}\n'})
    result = materialize.run(ws, cfg, validate=True)
    assert [f.transform for f in result.files] == ["tickets"]
    [row] = evidence_rows(ws)
    assert row["kind"] == "ticket" and row["prompt"] == "Reset my password"


def test_a_broken_module_is_an_error_that_names_it(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "broken.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(TransformLoadError, match=r"broken\.py failed to import: ModuleNotFoundError"):
        Registry.load(ws.root, cfg)


def test_a_module_without_spec_is_an_error(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "nospec.py").write_text("def transform(row, ctx):\n    return None\n")
    with pytest.raises(TransformLoadError, match=r"nospec\.py defines no SPEC"):
        Registry.load(ws.root, cfg)


def test_helper_modules_with_underscore_are_skipped(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "_shared.py").write_text("X = 1\n")
    assert {t.spec.name for t in Registry.load(ws.root, cfg).modules} >= {"runs"}


def test_two_modules_claiming_one_file_is_an_error(ws, cfg):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "runs2.py").write_text(MODULE.replace('"tickets"', '"runs2"')
                                                     .replace('"tickets*.jsonl"', '"runs*.csv"')
                                                     .replace('format="jsonl"', 'format="csv"'))
    reg = Registry.load(ws.root, cfg)
    with pytest.raises(TransformLoadError, match="claimed by several transforms"):
        _reader(ws, reg, "runs.csv", "a,b\n1,2\n")


def test_mapping_wins_over_a_module(ws):
    (ws.root / "refinery.toml").write_text(
        '[mappings.myruns]\nmatch = "runs*.csv"\nkind = "custom"\n'
        '[mappings.myruns.fields]\nrecorded_at = "started_at"\nprompt = "prompt"\nresponse = "output"\n')
    reg = Registry.load(ws.root, load_config(ws.root))
    assert _reader(ws, reg, "runs.csv", "a,b\n1,2\n").spec.name == "mapping:myruns"


def test_an_unclaimed_file_is_quarantined_line_by_line(ws, cfg):
    write_kb(ws, {"mystery.jsonl": '{"a": 1}\n{"a": 2}\nnot json\n'})
    result = materialize.run(ws, cfg)
    assert result.files[0].transform is None
    assert result.by_reason == {"invalid_json": 1, "unknown_source": 2}
    assert evidence_rows(ws) == []
    assert [q["provenance"]["line_offset"] for q in quarantine_rows(ws)] == [0, 1, 2]
