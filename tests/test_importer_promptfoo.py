"""The promptfoo importer: eval exports (v3 `promptfoo eval -o results.json` / `promptfoo export`,
the older v2 results file, a bare eval summary, a shared eval, JSONL output) → one evidence per result.

Real file: tests/fixtures/real/promptfoo/sample-export.json (see its ORIGIN.md) — promptfoo
0.118.10, gpt-5 vs gpt-5-mini on two riddles, 4 results. Every result there has success:false,
failureReason 1 and an `error` string, yet every answer is right: they fail only latency (and
one a cost) threshold. The golden fixture tests/fixtures/promptfoo/ covers the other shapes and
the defects (a provider error, a missing prompt, a stripped output, a non-object result, a
cut JSONL line, tool calls, a manual rating, a cached answer, a truncated answer, a refusal).
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import (
    FIXTURES, evidence_rows, fixture_inputs, foreign_inputs, materialize_files, probe_file, quarantine_rows,
    scored_rows, write_kb,
)
from refinery import score
from refinery.materialize import claims_for
from refinery.models import EvidenceRecord
from refinery.trace import trace
from transforms import promptfoo

REAL = FIXTURES / "real" / "promptfoo" / "sample-export.json"
GOLDEN = FIXTURES / "promptfoo"
GOLDEN_INPUTS = ("promptfoo_eval.json", "promptfoo_v2_results.json", "promptfoo_summary.json",
                 "promptfoo_results.jsonl")


_probe, _inputs = probe_file, fixture_inputs


def _run(ws, cfg, *paths):
    return materialize_files(ws, cfg, *paths)


def _by_record(ws):
    return {r["provenance"].get("record") or r["provenance"]["line_offset"]: r for r in evidence_rows(ws)}


def _scored(ws):
    return {r["id"]: r for r in scored_rows(ws)}


def _scores(ev):
    return {s["name"]: (s["value"], s["normalized"], s["used"]) for s in ev["signals"]["scores"]}


def _export(ws, results, **doc):
    """A v3 export holding `results` (the real file's wrapper), written to data/_kb/."""
    body = {"evalId": "eval-test", "results": {"version": 3, "timestamp": "2025-10-01T20:08:11.168Z",
                                               "prompts": [], "results": results, "stats": {}},
            "config": {}, "shareableUrl": None, **doc}
    write_kb(ws, {"eval.json": json.dumps(body)})


def _result(**over):
    r = json.loads(REAL.read_text())["results"]["results"][0]
    r.update(over)
    return r


# --- detection --------------------------------------------------------------------------------


def test_detects_the_real_export_and_every_golden_shape():
    assert "results v3" in promptfoo.detect(_probe(REAL))
    assert "results v2" in promptfoo.detect(_probe(GOLDEN / "promptfoo_v2_results.json"))
    assert "results v1" in promptfoo.detect(_probe(GOLDEN / "promptfoo_summary.json"))
    assert "records are promptfoo eval results" in promptfoo.detect(_probe(GOLDEN / "promptfoo_results.jsonl"))


def test_claims_nothing_else():
    others = foreign_inputs("promptfoo", "evals")
    assert len(others) > 40
    assert [p.name for p in others if promptfoo.detect(_probe(p))] == []


def test_every_shape_is_claimed_by_promptfoo_alone(ws, cfg):
    for p in (REAL, *(GOLDEN / n for n in GOLDEN_INPUTS)):
        shutil.copy(p, ws.kb / p.name)
    _, sources, _, claims = claims_for(ws, cfg)
    got = {s.kb_rel: (c.name, c.error) for s, c in zip(sources, claims)}
    assert got == {p: ("promptfoo", None) for p in ("sample-export.json", *GOLDEN_INPUTS)}


def test_an_empty_export_is_still_promptfoos(tmp_path):
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"evalId": "eval-x", "results": {"version": 3, "timestamp": "2025-01-01T00:00:00Z",
                                                             "results": [], "stats": {}}}))
    assert promptfoo.detect(_probe(p)) == "a promptfoo eval export with no results"
    p.write_text(json.dumps({"results": [], "stats": {}}))  # anybody's empty list: not claimed
    assert promptfoo.detect(_probe(p)) is None


# --- the real export --------------------------------------------------------------------------


def test_real_export_every_result_becomes_evidence(ws, cfg):
    files = _run(ws, cfg, REAL)
    f = files["sample-export.json"]
    assert (f.rows_in, f.evidence, f.joined, f.quarantined, f.by_reason) == (4, 4, 0, 0, {})
    rows = evidence_rows(ws)
    for r in rows:
        EvidenceRecord.model_validate(r)
        assert r["prompt"].startswith("Solve this riddle: ") and r["response"]
        assert r["kind"] == "eval" and r["provider"] == "openai" and r["model"] in ("gpt-5", "gpt-5-mini")
        assert (r["recorded_at"], r["recorded_at_from"]) == ("2025-10-01T20:08:11.168000Z",
                                                             "document:metadata.evaluationCreatedAt")


def test_real_export_signals_say_what_the_file_says(ws, cfg):
    _run(ws, cfg, REAL)
    rows = _by_record(ws)
    first = rows["$.results.results[0]"]  # gpt-5-mini, the echo riddle, 5794 ms against a 3000 ms limit
    assert first["model"] == "gpt-5-mini" and first["response"].startswith("Answer: An echo.")
    assert (first["latency_ms"], first["prompt_tokens"], first["completion_tokens"]) == (5794.0, 37, 245)
    s = first["signals"]
    # success:false, failureReason 1, error "Latency 5794ms ...": an assertion failure, not a call error
    assert s["error"] is None and s["stop_reason"] == "stop" and s["safety_flags"] == []
    assert (s["verdict"], s["eval_score"]) == ("pass", 1.0)  # contains + llm-rubric both passed
    assert _scores(first) == {"cost": (1, 1.0, False), "latency": (0, 0.0, False), "contains": (1, 1.0, True),
                              "llm-rubric": (1, 1.0, True)}
    second = rows["$.results.results[1]"]  # gpt-5 on the same riddle: over the cost limit too
    assert second["model"] == "gpt-5" and second["response"] == "An echo."
    assert _scores(second)["cost"] == (0, 0.0, False) and second["signals"]["verdict"] == "pass"
    assert second["task_id"] == first["task_id"] and first["task_id"].startswith("vars:")  # same test, two models
    assert rows["$.results.results[2]"]["task_id"] != first["task_id"]
    assert {r["signals"]["eval_score"] for r in rows.values()} == {1.0}


def test_real_export_scores_all_accepted_and_traces(ws, cfg):
    _run(ws, cfg, REAL)
    score.run(ws, cfg)
    scored = _scored(ws)
    assert len(scored) == 4
    assert {r["category"] for r in scored.values()} == {"accepted"}
    ev = evidence_rows(ws)[0]
    assert trace(ws, ev["id"]).ok


def test_counting_latency_makes_the_slow_answers_fail(ws):
    """[signals.latency] use = true: the operator says latency is part of the answer's quality."""
    (ws.root / "refinery.toml").write_text("[signals.latency]\nuse = true\n")
    from refinery.config import load_config

    cfg = load_config(ws.root)
    _run(ws, cfg, REAL)
    first = _by_record(ws)["$.results.results[0]"]["signals"]
    assert first["verdict"] == "fail" and first["eval_score"] == pytest.approx(2 / 3)
    assert _scores({"signals": first})["latency"] == (0, 0.0, True)


# --- the golden fixture's shapes ---------------------------------------------------------------


def test_golden_counts(ws):
    shutil.copy(GOLDEN / "refinery.toml", ws.root / "refinery.toml")
    from refinery.config import load_config

    cfg = load_config(ws.root)
    files = _run(ws, cfg, *(GOLDEN / n for n in GOLDEN_INPUTS))
    counts = {n: (f.rows_in, f.evidence, f.joined, f.by_reason) for n, f in files.items()}
    assert counts == {
        "promptfoo_eval.json": (12, 9, 0, {"missing_field": 2, "not_an_object": 1}),
        "promptfoo_v2_results.json": (3, 3, 0, {}),
        "promptfoo_summary.json": (2, 2, 0, {}),
        "promptfoo_results.jsonl": (3, 2, 0, {"invalid_json": 1}),
    }
    q = {r["detail"] for r in quarantine_rows(ws)}
    assert "field 'prompt.raw' is missing or empty" in q
    assert any("PROMPTFOO_STRIP_RESPONSE_OUTPUT" in d for d in q)
    score.run(ws, cfg)
    where = {r["id"]: (r["source"], r["provenance"]["line_offset"]) for r in evidence_rows(ws)}
    got = {where[i]: (r["category"], r["rules_fired"]) for i, r in _scored(ws).items()}
    assert got[("promptfoo_eval", 0)] == ("accepted", [])                       # right, only slow
    assert got[("promptfoo_eval", 1)][0] == "rejected"                           # Sydney
    assert "error" in got[("promptfoo_eval", 2)][1]                              # 529 Overloaded
    assert got[("promptfoo_eval", 3)] == ("accepted", [])                        # tool call
    assert got[("promptfoo_eval", 4)][0] == "needs_human_review"                 # rubric fail, human pass
    assert got[("promptfoo_eval", 5)] == ("accepted", [])                        # cached
    assert got[("promptfoo_eval", 8)] == ("accepted", [])                        # threshold met
    assert "safety_flag" in got[("promptfoo_eval", 10)][1]                       # refusal
    assert "truncated" in got[("promptfoo_eval", 11)][1]                         # finishReason length
    assert got[("promptfoo_summary", 0)][0] == "needs_human_review"             # "No assertions"
    assert "no_signal" in got[("promptfoo_summary", 0)][1]


@pytest.fixture
def golden(ws):
    shutil.copy(GOLDEN / "refinery.toml", ws.root / "refinery.toml")
    from refinery.config import load_config

    _run(ws, load_config(ws.root), *(GOLDEN / n for n in GOLDEN_INPUTS))
    return {(r["source"], r["provenance"]["line_offset"]): r for r in evidence_rows(ws)}


def test_error_is_classified_by_failure_reason(golden):
    assert golden[("promptfoo_eval", 0)]["signals"]["error"] is None       # failureReason 1 + error text
    err = golden[("promptfoo_eval", 2)]
    assert err["signals"]["error"].startswith("API call error: 529 Overloaded")  # failureReason 2
    assert err["response"] is None and err["signals"]["verdict"] is None and err["signals"]["scores"] == []
    # v2 files have no failureReason: an assertion's error is not a call error, a response's error is
    assert golden[("promptfoo_v2_results", 1)]["signals"]["error"] is None
    assert golden[("promptfoo_v2_results", 1)]["signals"]["verdict"] == "fail"
    assert golden[("promptfoo_v2_results", 2)]["signals"]["error"] == "API error: 401 Unauthorized"


def test_chat_prompt_and_tool_calls(golden):
    ev = golden[("promptfoo_eval", 3)]
    assert [m["role"] for m in ev["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ev["prompt"].startswith("User: I fly to Oslo on Friday.") and ev["prompt"].endswith(
        "User: What will the weather be like there on Friday?")
    assert ev["response"] is None
    assert ev["tool_calls"] == [{"id": "call_Q1x9", "name": "get_weather",
                                 "arguments": {"city": "Oslo", "date": "2025-11-07"}, "problem": None}]
    assert ev["signals"]["stop_reason"] == "tool_calls" and ev["signals"]["tool_call_count"] == 1
    assert (ev["task_id"], ev["task_name"]) == ("weather question calls get_weather",) * 2
    assert _scores(ev)["calls_weather"] == (1, 1.0, True)  # the assertion's metric names the score


def test_manual_rating_is_a_human_approval(golden):
    s = golden[("promptfoo_eval", 4)]["signals"]
    assert (s["approved"], s["approver"], s["human_rating"]) == (True, "promptfoo manual rating", 1.0)
    assert (s["verdict"], s["eval_score"]) == ("fail", 0.4)  # the rubric's own verdict is kept
    assert [(x["name"], x["by"]) for x in s["scores"]] == [("llm-rubric", "automated"), ("human", "human")]


def test_cached_answer_has_no_call_latency_or_tokens(golden):
    ev = golden[("promptfoo_eval", 5)]
    assert (ev["latency_ms"], ev["prompt_tokens"], ev["completion_tokens"]) == (None, None, None)
    assert ev["response"] == "Rome"


def test_structured_output_weights_threshold_and_derived_metrics(golden):
    ev = golden[("promptfoo_eval", 8)]
    assert json.loads(ev["response"]) == {"city": "Lyon", "country": "France", "confidence": 0.93}
    s = ev["signals"]
    # is-json (weight 2) passed, similar (weight 1) scored 0.58; cost is not counted: (2 + 0.58) / 3
    assert s["eval_score"] == pytest.approx(0.86) and s["verdict"] == "pass"  # test threshold 0.6
    assert _scores(ev) == {"format": (1, 1.0, True), "similar": (0.58, 0.58, True), "cost": (1, 1.0, False),
                           "exact_fields": (0.67, 0.67, False)}


def test_flags_and_provider_ids(golden):
    refusal = golden[("promptfoo_eval", 10)]
    assert refusal["signals"]["safety_flags"] == ["refusal"] and refusal["signals"]["verdict"] == "pass"
    assert (refusal["provider"], refusal["model"]) == ("anthropic", "claude-3-5-haiku-20241022")
    assert golden[("promptfoo_eval", 11)]["signals"]["stop_reason"] == "length"
    line = golden[("promptfoo_results", 0)]
    assert (line["provider"], line["model"]) == ("ollama", "qwen2.5:7b")
    assert golden[("promptfoo_summary", 0)]["provider"] == "ollama"  # a provider given as a plain id


def test_times_of_each_shape(golden):
    assert golden[("promptfoo_v2_results", 0)]["recorded_at_from"] == "document:results.timestamp"
    assert golden[("promptfoo_summary", 0)]["recorded_at"] == "2023-08-21T17:40:03.551000Z"
    line = golden[("promptfoo_results", 1)]  # JSONL results carry no time: the configured one
    assert (line["recorded_at"], line["recorded_at_from"]) == (
        "2025-11-03T09:00:00.000000Z", "fallback:[sources.promptfoo_results] recorded_at")


# --- other shapes and defects, one at a time --------------------------------------------------


def test_shared_eval_is_read_with_its_time(ws, cfg):
    v2 = json.loads((GOLDEN / "promptfoo_v2_results.json").read_text())
    write_kb(ws, {"shared.json": json.dumps({"data": v2})})
    _run(ws, cfg)
    rows = _by_record(ws)
    assert sorted(rows) == ["$.data.results.results[0]", "$.data.results.results[1]", "$.data.results.results[2]"]
    assert rows["$.data.results.results[0]"]["recorded_at_from"] == "document:data.results.timestamp"


def test_without_eval_time_the_export_time_dates_it(ws, cfg):
    _export(ws, [_result()], metadata={"exportedAt": "2025-10-02T08:00:00Z"})
    doc = json.loads((ws.kb / "eval.json").read_text())
    del doc["results"]["timestamp"]
    write_kb(ws, {"eval.json": json.dumps(doc)})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert (ev["recorded_at"], ev["recorded_at_from"]) == ("2025-10-02T08:00:00.000000Z",
                                                          "document:metadata.exportedAt")


def test_only_performance_assertions_give_no_verdict(ws, cfg):
    r = _result()
    r["gradingResult"]["componentResults"] = r["gradingResult"]["componentResults"][:2]  # cost, latency
    _export(ws, [r])
    _run(ws, cfg)
    score.run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert (ev["signals"]["verdict"], ev["signals"]["eval_score"]) == (None, None)
    assert [(r["category"], "no_signal" in r["rules_fired"]) for r in _scored(ws).values()] == [
        ("needs_human_review", True)]


def test_stripped_grading_falls_back_on_the_test_case(ws, cfg):
    ok = _result(gradingResult=None, success=True, score=1, failureReason=0, error=None)
    ok["testCase"]["assert"] = [{"type": "contains", "value": "echo"}]
    mixed = _result(gradingResult=None)  # success false, with latency among the assertions: undecidable
    _export(ws, [ok, mixed])
    _run(ws, cfg)
    rows = _by_record(ws)
    assert rows["$.results.results[0]"]["signals"]["verdict"] == "pass"
    assert rows["$.results.results[0]"]["signals"]["eval_score"] == 1.0
    s = rows["$.results.results[1]"]["signals"]
    assert (s["verdict"], s["eval_score"]) == (None, None) and _scores({"signals": s}) == {"score": (0.75, 0.75, False)}


@pytest.mark.parametrize("change, detail", [
    ({"prompt": {"raw": "[prompt stripped]", "label": "x"}}, "PROMPTFOO_STRIP_PROMPT_TEXT"),
    ({"prompt": {"label": "Solve this riddle: {{riddle}}"}}, "field 'prompt.raw' is missing"),
    ({"prompt": 7}, "field 'prompt': expected an object {raw, label} or text"),
    ({"response": {"tokenUsage": {}}}, "field 'response.output' is missing"),
    ({"response": "An echo"}, "field 'response': expected an object"),
    ({"failureReason": 9}, "field 'failureReason': expected 0, 1 or 2"),
    ({"gradingResult": {"pass": True, "score": 1, "reason": "x", "componentResults": {"a": 1}}},
     "field 'gradingResult.componentResults': expected a list"),
    ({"provider": ["openai:gpt-5"]}, "field 'provider': expected an object {id, label} or an id"),
])
def test_defects_are_refused_with_the_field_named(ws, cfg, change, detail):
    _export(ws, [_result(**change), _result(id="a-good-one")])
    files = _run(ws, cfg)
    assert (files["eval.json"].rows_in, files["eval.json"].evidence) == (2, 1)
    (q,) = quarantine_rows(ws)
    assert q["provenance"]["record"] == "$.results.results[0]"
    assert detail in q["detail"], q["detail"]


@pytest.mark.parametrize("output, text, calls", [
    ([{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                              "input": {"q": "echo"}}],
     "Checking.", [{"id": "toolu_1", "name": "lookup", "arguments": {"q": "echo"}, "problem": None}]),
    ({"role": "assistant", "content": "Looking it up.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}]},
     "Looking it up.", [{"id": "c1", "name": "lookup", "arguments": {"q": 1}, "problem": None}]),
    ({"name": "lookup", "arguments": "{not json"},
     None, [{"id": None, "name": "lookup", "arguments": "{not json", "problem": "arguments_not_json"}]),
    ([{"type": "function_call", "call_id": "fc_1", "name": "lookup", "arguments": "{}"}],
     None, [{"id": "fc_1", "name": "lookup", "arguments": {}, "problem": None}]),
    (["echo", "wind"], '["echo","wind"]', []),
    (42, "42", []),
])
def test_object_outputs(ws, cfg, output, text, calls):
    r = _result()
    r["response"]["output"] = output
    _export(ws, [r])
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert (ev["response"], ev["tool_calls"]) == (text, calls)


@pytest.mark.parametrize("pid, label, want", [
    ("openai:gpt-5", "", ("openai", "gpt-5")),
    ("openai:chat:gpt-4o-mini", None, ("openai", "gpt-4o-mini")),
    ("anthropic:messages:claude-sonnet-4-20250514", None, ("anthropic", "claude-sonnet-4-20250514")),
    ("bedrock:anthropic.claude-3-haiku-20240307-v1:0", None, ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0")),
    ("ollama:chat:llama3.1:8b", None, ("ollama", "llama3.1:8b")),
    ("file://providers/my_rag.py", "rag-v2", ("file", "rag-v2")),
    ("https://api.example.com/chat", None, ("https", None)),
    ("echo", None, ("echo", None)),
])
def test_provider_ids(pid, label, want):
    assert promptfoo._provider({"provider": {"id": pid, "label": label}}) == want


def test_redteam_final_prompt_is_the_prompt(ws, cfg):
    r = _result()
    r["response"]["metadata"] = {"redteamFinalPrompt": "Pretend you are my grandmother and solve this riddle"}
    _export(ws, [r])
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert ev["prompt"] == "Pretend you are my grandmother and solve this riddle"
