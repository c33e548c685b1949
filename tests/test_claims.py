"""Who reads a file, and why: refinery.toml [sources] > [mappings] > file name > content; an
ambiguous file is refused by name with both candidates; `refinery sources` says all of it.
And where a record's time comes from: its own, its document's, its parent's, the source's
configured fallback, or "undated" — never now."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from conftest import evidence_rows, quarantine_rows, write_kb
from refinery import materialize
from refinery.cli import app
from refinery.config import ConfigError, load_config
from refinery.discovery import TransformLoadError
from refinery.materialize import claims_for

runner = CliRunner()
CHAT = '{"messages": [{"role": "user", "content": "Is auth-gateway up?"}, {"role": "assistant", "content": "Yes."}]}\n'
RIVAL = '''
from refinery.transform import TransformSpec, dated, new_evidence
SPEC = TransformSpec(name="team_chats", patterns=(), format="json", kind="chat")

def detect(probe):
    return "rows have messages" if probe.mostly(lambda r: "messages" in r) else None

def transform(row, ctx):
    when, src = dated(ctx)
    return new_evidence("chat", recorded_at=when, recorded_at_from=src, prompt="p", response="r")
'''


def claims(ws):
    _, sources, _, cs = claims_for(ws, load_config(ws.root))
    return {s.kb_rel: (c.name, c.why, c.error) for s, c in zip(sources, cs)}


def test_name_then_content(ws):
    write_kb(ws, {"runs.csv": "run_id\n1\n", "chat_completions_log.jsonl": CHAT, "export.json": "[" + CHAT + "]"})
    got = claims(ws)
    assert got["runs.csv"][:2] == ("runs", "file name matches its file-name pattern 'runs*.csv'")
    assert got["chat_completions_log.jsonl"][:2] == ("openai_finetune",
                                                      "content: records are {messages[, tools]} chat examples")
    assert got["export.json"][0] == "openai_finetune"  # a JSON array, whatever its name


def test_an_ambiguous_file_names_both_candidates_and_is_refused(ws):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "team_chats.py").write_text(RIVAL)
    write_kb(ws, {"chats.jsonl": CHAT})
    name, why, error = claims(ws)["chats.jsonl"]
    assert name is None and "openai_finetune" in error and "team_chats" in error
    assert '[sources.chats] importer = "openai_finetune"' in error  # the fix, spelled out
    result = materialize.run(ws, load_config(ws.root))
    assert result.exit_code == 2 and result.files[0].by_reason == {"ambiguous_source": 1}
    (q,) = quarantine_rows(ws)
    assert q["provenance"]["line_offset"] is None and "team_chats" in q["detail"]
    out = runner.invoke(app, ["sources", "--workspace", str(ws.root)])
    assert out.exit_code == 2 and "AMBIGUOUS" in out.stdout and "recognised by" in out.stderr


def test_the_config_overrides_detection(ws):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "team_chats.py").write_text(RIVAL)
    write_kb(ws, {"chats.jsonl": CHAT})
    (ws.root / "refinery.toml").write_text('[sources.chats]\nimporter = "team_chats"\n')
    assert claims(ws)["chats.jsonl"][:2] == ("team_chats", "refinery.toml [sources.chats] importer = 'team_chats'")
    result = materialize.run(ws, load_config(ws.root))
    assert (result.exit_code, result.evidence) == (0, 1)


def test_an_unknown_importer_or_a_bad_table_is_an_error_naming_it(ws):
    write_kb(ws, {"chats.jsonl": CHAT})
    (ws.root / "refinery.toml").write_text('[sources.chats]\nimporter = "nope"\n')
    with pytest.raises(TransformLoadError, match=r"\[sources.chats\] importer = 'nope': no such importer"):
        claims(ws)
    (ws.root / "refinery.toml").write_text('[sources.chats]\nrecorded_at = "yesterday"\n')
    with pytest.raises(ConfigError, match="sources.chats.recorded_at"):
        load_config(ws.root)
    (ws.root / "refinery.toml").write_text('[sources.chats]\ntrust = "high"\n')
    with pytest.raises(ConfigError, match="sources.chats.trust"):
        load_config(ws.root)


def test_refinery_sources_says_who_and_why(ws):
    write_kb(ws, {"runs.csv": "run_id\n1\n", "b.jsonl": '{"custom_id": "x", "response": {}}\n', "notes.md": "hi\n"})
    out = runner.invoke(app, ["sources", "--workspace", str(ws.root), "--json"])
    assert out.exit_code == 0
    doc = orjson.loads(out.stdout)
    rows = {r["file"]: (r["container"], r["transform"], r["why"]) for r in doc["sources"]}
    assert rows == {
        "data/_kb/b.jsonl": ("lines", "openai_batch",
                             "content: records carry custom_id with a response (Batch output)"),
        "data/_kb/notes.md": (None, None, "not a container refinery reads"),
        "data/_kb/runs.csv": ("csv", "runs", "file name matches its file-name pattern 'runs*.csv'"),
    }
    assert {t["name"] for t in doc["transforms"] if t["detects"]} >= {"openai_batch", "langfuse", "promptfoo"}


# --- where the time comes from ---------------------------------------------------------------


def test_time_from_the_record_the_document_the_parent_the_fallback_or_undated(ws):
    promptfoo = {"evalId": "e1", "metadata": {"evaluationCreatedAt": "2026-11-02T09:00:00.000Z"},
                 "results": {"version": 3, "timestamp": "2026-11-02T09:00:00.000Z", "results": [
                     {"prompt": {"raw": "Refund INV-1042?"}, "provider": {"id": "openai:chat:gpt-4o-mini"},
                      "response": {"output": "Refund the second capture."}, "success": True, "score": 1,
                      "gradingResult": {"pass": True, "score": 1, "componentResults": [
                          {"pass": True, "score": 1, "assertion": {"type": "contains", "value": "Refund"}}]},
                      "failureReason": 0}]}}
    trace = {"id": "t1", "timestamp": "2026-11-03T10:00:00.000Z", "name": "qa", "input": "q", "output": "a",
             "sessionId": "s-1", "userId": "u-7", "tags": []}
    generation = {"id": "g1", "traceId": "t1", "type": "GENERATION", "name": "chat", "model": "gpt-4o-mini",
                  "input": [{"role": "user", "content": "Where is my parcel?"}],  # no startTime of its own
                  "output": {"role": "assistant", "content": "It left the depot."}}
    score = {"id": "s1", "traceId": "t1", "observationId": "g1", "name": "correctness", "value": 0.9,
             "dataType": "NUMERIC", "source": "EVAL"}
    write_kb(ws, {
        "pf.json": orjson.dumps(promptfoo),
        "lf.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in (trace, score, generation)),
        "ft.jsonl": CHAT, "dated_ft.jsonl": CHAT.replace("auth-gateway", "billing-worker"),
    })
    (ws.root / "refinery.toml").write_text('[sources.dated_ft]\nrecorded_at = "2026-10-01"\n')
    result = materialize.run(ws, load_config(ws.root), validate=True)
    when = {r["source"]: (r["recorded_at"], r["recorded_at_from"]) for r in evidence_rows(ws)}
    assert when == {
        "pf": ("2026-11-02T09:00:00.000000Z", "document:metadata.evaluationCreatedAt"),
        "lf": ("2026-11-03T10:00:00.000000Z", "parent:timestamp"),
        "dated_ft": ("2026-10-01T00:00:00.000000Z", "fallback:[sources.dated_ft] recorded_at"),
        "ft": ("1970-01-01T00:00:00.000000Z", "undated"),
    }
    assert {f.source: f.undated for f in result.files} == {"dated_ft": 0, "ft": 1, "lf": 0, "pf": 0}
    out = runner.invoke(app, ["materialize", "--workspace", str(ws.root)])
    assert "ft.jsonl: 1 record(s) carry no time" in out.stderr and "[sources.ft]" in out.stderr


def test_a_detector_that_crashes_on_odd_data_does_not_stop_the_run(ws):
    """One record of a surprising shape in a file must not cost every other file: the detector's
    error is a 'not recognised', said in the claim's reason."""
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "fragile.py").write_text(RIVAL.replace('"team_chats"', '"fragile"').replace(
        'return "rows have messages" if', 'return "x" if probe.records[0]["messages"][99] and'))
    write_kb(ws, {"chats.jsonl": CHAT, "runs.csv": "run_id\n1\n"})
    name, why, error = claims(ws)["chats.jsonl"]
    assert name == "openai_finetune" and error is None
    write_kb(ws, {"other.jsonl": '{"x": 1}\n'})
    assert "fragile's detect() raised KeyError" in claims(ws)["other.jsonl"][1]


def test_a_sources_table_applies_to_its_stream_when_two_files_share_the_name(ws):
    hh = ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello, how can I help?", '
          '"rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}\n')
    write_kb(ws, {"hh.jsonl": hh, "hh.json": "[" + hh.strip() + "]"})
    (ws.root / "refinery.toml").write_text('[sources.hh]\ntrust = "curated"\nrecorded_at = 2024-01-01\n')
    materialize.run(ws, load_config(ws.root))
    rows = evidence_rows(ws)
    assert len(rows) == 4 and all(r["signals"]["trust"] == "curated" for r in rows)
    assert {r["recorded_at_from"] for r in rows} == {"fallback:[sources.hh] recorded_at"}


def test_a_table_that_matches_no_file_is_said(ws):
    write_kb(ws, {"hh.jsonl": CHAT})
    (ws.root / "refinery.toml").write_text('[sources.hhh]\ntrust = "curated"\n')
    out = runner.invoke(app, ["run-all", "--workspace", str(ws.root)])
    assert "[sources.hhh] matches no file under data/_kb/" in out.stderr and "the streams are: hh" in out.stderr
