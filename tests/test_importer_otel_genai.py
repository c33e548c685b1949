"""The otel_genai importer: OpenTelemetry GenAI spans and events (OTLP/JSON traces and logs),
joined by trace — one evidence record per inference span, evaluations attached to the span they
name, every other record of the trace joined into its last inference span."""

from __future__ import annotations

import shutil
from collections import Counter

import orjson
import pytest

from conftest import (
    FIXTURES, builtin_importer, copy_fixture, evidence_rows, foreign_inputs, probe_file,
    quarantine_rows, scored_categories, source_record, write_kb,
)
from refinery import export, materialize
from refinery.trace import trace
from refinery.transform import RowError

REAL = FIXTURES / "real" / "otel_genai"
GOLDEN = FIXTURES / "otel_genai"
CASSETTE = "openai_v2_cassette_replay.otlp.jsonl"
SPEC_EXAMPLE = "otlp_proto_examples_trace.json"
T1, T2 = "4bf92f3577b34da6a3ce929d0e0e4736", "5a1c0e9a33d74f5fb8f2f1d6a9e1c204"
NS = 1_795_000_000_000_000_000


def _module():
    return builtin_importer("otel_genai")


# --- building OTLP/JSON --------------------------------------------------------------------


def _value(x):
    if isinstance(x, bool):
        return {"boolValue": x}
    if isinstance(x, int):
        return {"intValue": str(x)}
    if isinstance(x, float):
        return {"doubleValue": x}
    if isinstance(x, str):
        return {"stringValue": x}
    if isinstance(x, list):
        return {"arrayValue": {"values": [_value(i) for i in x]}}
    return {"kvlistValue": {"values": [{"key": k, "value": _value(i)} for k, i in x.items()]}}


def _attrs(d):
    return [{"key": k, "value": _value(x)} for k, x in d.items()]


def _span(sid, name="chat gpt-4o", trace=T1, parent=None, start_ms=0, end_ms=100, status=None, events=None, **attrs):
    s = {"traceId": trace, "spanId": sid, "name": name, "kind": 3,
         "startTimeUnixNano": str(NS + start_ms * 1_000_000), "endTimeUnixNano": str(NS + end_ms * 1_000_000),
         "attributes": _attrs(attrs), "status": status or {}}
    if parent:
        s["parentSpanId"] = parent
    if events:
        s["events"] = events
    return s


def _chat(sid, question, answer, **kw):
    """An inference span of the latest conventions, content as JSON text (as SDKs write it)."""
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
             "gen_ai.input.messages": orjson.dumps([{"role": "user", "parts": [
                 {"type": "text", "content": question}]}]).decode()}
    if answer is not None:
        attrs["gen_ai.output.messages"] = orjson.dumps([{"role": "assistant", "parts": [
            {"type": "text", "content": answer}], "finish_reason": "stop"}]).decode()
    return _span(sid, **{**attrs, **kw})


def _traces(*spans, service="svc"):
    return {"resourceSpans": [{"resource": {"attributes": _attrs({"service.name": service})},
                               "scopeSpans": [{"scope": {"name": "test"}, "spans": list(spans)}]}]}


def _evaluation(trace=T1, span=None, **attrs):
    r = {"timeUnixNano": str(NS), "eventName": "gen_ai.evaluation.result", "attributes": _attrs(attrs),
         "traceId": trace}
    if span:
        r["spanId"] = span
    return r


def _logs(*records):
    return {"resourceLogs": [{"resource": {"attributes": []}, "scopeLogs": [{"scope": {"name": "evals"},
                                                                             "logRecords": list(records)}]}]}


def _doc(obj) -> str:
    return orjson.dumps(obj).decode()


def _run(ws, cfg):
    result = materialize.run(ws, cfg, validate=True)
    assert result.transform_errors == 0, [f.first_transform_error for f in result.files]
    return {f.source_file.removeprefix("data/_kb/"): f for f in result.files}


def _by_span(ws):
    """Evidence by the span id (and part) it was made from."""
    out = {}
    for ev in evidence_rows(ws):
        rec, part = source_record(ws, ev), ev["provenance"].get("part")
        out[(rec.get("spanId") or rec.get("eventName")) + (f"/{part}" if part else "")] = ev
    return out


# --- detection -----------------------------------------------------------------------------


def _detect(path):
    return _module().detect(probe_file(path))


def _inputs(folder):
    skip = {"expected.jsonl", "refinery.toml"}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip
                  and p.suffix not in (".md", ".txt", ".py", ".toml") and not p.name.startswith("expected"))


def test_detects_its_own_files():
    for p in [*_inputs(REAL), *_inputs(GOLDEN)]:
        why = _detect(p)
        assert why and why.startswith("OTLP/JSON"), p
    assert "with gen_ai.* attributes" in _detect(REAL / CASSETTE)
    assert "no gen_ai.* attribute" in _detect(REAL / SPEC_EXAMPLE)
    assert _detect(GOLDEN / "genai_events.otlp.json").startswith("OTLP/JSON logs")


def test_claims_no_other_fixture():
    others = foreign_inputs("otel_genai", "otel")
    assert len(others) > 40
    claimed = [p for p in others if _detect(p)]
    assert claimed == []


def test_detects_otlp_shapes_only():
    detect = _module().detect
    from refinery.containers import Probe

    assert detect(Probe("json", [_traces()])) is not None
    assert detect(Probe("lines", [_logs(), _logs()])) is not None
    assert detect(Probe("json", [{"resourceSpans": [{"instrumentationLibrarySpans": []}]}])) is None  # pre-1.0
    assert detect(Probe("lines", [{"traceId": T1, "spanId": "a" * 16, "name": "x"}])) is None  # a bare span
    assert detect(Probe("json", [{"data": [{"traceID": T1, "spans": []}]}])) is None  # Jaeger JSON


# --- reading OTLP values ---------------------------------------------------------------------


def test_attribute_values_of_every_type():
    m = _module()
    span = {"attributes": _attrs({"s": "x", "i": 75, "d": 0.5, "b": True, "a": ["stop", "length"],
                                  "kv": {"role": "user", "n": 2}}) + [{"key": "bare", "value": {"intValue": 9}}]}
    assert [m.attr(span, k) for k in ("s", "i", "d", "b", "a", "kv", "bare", "absent")] == [
        "x", 75, 0.5, True, ["stop", "length"], {"role": "user", "n": 2}, 9, None]
    with pytest.raises(RowError, match="field 'attributes': expected a list"):
        m.key_values({"gen_ai.request.model": "gpt-4o"})  # attributes as a map: not OTLP/JSON


def test_ids_in_any_case_and_base64():
    m = _module()
    assert m.hex_id("5B8EFFF798038103D269B633813FC60C", 16) == "5b8efff798038103d269b633813fc60c"
    assert m.hex_id("W47/95gDgQPSabYzgT/GDA==", 16) == "5b8efff798038103d269b633813fc60c"
    assert m.hex_id("7uGbfsPBsXQ=", 8) == "eee19b7ec3c1b174"
    assert m.hex_id("", 8) is None


# --- the real files --------------------------------------------------------------------------


def test_real_openai_v2_cassette_replay(ws, cfg):
    shutil.copy(REAL / CASSETTE, ws.kb / CASSETTE)
    files = _run(ws, cfg)
    f = files[CASSETTE]
    # 4 spans in: 3 chat spans are evidence, the "agent turn" wrapper is joined, nothing refused
    assert (f.rows_in, f.evidence, f.joined, f.quarantined) == (4, 3, 1, 0)
    ev = _by_span(ws)
    first, second, failed = ev["f3b8d5e65bbf2201"], ev["438b6fefa4278493"], ev["e73f2cb4f6d9b3a9"]

    assert first["prompt"] == "What's the weather in Seattle and San Francisco today?"
    assert first["response"] is None
    assert [(c["name"], c["arguments"], c["id"]) for c in first["tool_calls"]] == [
        ("get_current_weather", {"location": "Seattle, WA"}, "call_JpNb8OiAkbIbHzDggfpdDHpi"),
        ("get_current_weather", {"location": "San Francisco, CA"}, "call_vaFQc3zK6hHTRZKXRI5Eo2cJ")]
    assert first["messages"][0] == {"role": "system", "content": "You're a helpful assistant.", "name": None,
                                    "tool_calls": None, "tool_call_id": None}
    assert (first["model"], first["provider"], first["prompt_tokens"], first["completion_tokens"]) == (
        "gpt-4o-mini-2024-07-18", "openai", 75, 51)
    assert first["signals"]["stop_reason"] == "tool_calls"
    assert first["latency_ms"] == 8.471  # 1795988488507064072 - 1795988488498593105 ns
    assert first["recorded_at"] == "2026-11-29T21:41:28.498593Z"
    assert first["recorded_at_from"] == "record:startTimeUnixNano"
    assert first["task_id"] == "chatcmpl-ASYMU9Ntix7ePttk0MSuerJstef6U"
    assert first["task_name"] == "openai-v2-cassette-replay"  # the resource's service.name

    assert second["response"].startswith("Today, the weather in Seattle is 50 degrees and raining")
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert second["messages"][3]["content"] == "50 degrees and raining"
    assert second["messages"][3]["tool_call_id"] == "call_JpNb8OiAkbIbHzDggfpdDHpi"
    assert second["messages"][3]["name"] == "get_current_weather"  # from the call it answers
    assert (second["prompt_tokens"], second["completion_tokens"], second["signals"]["stop_reason"]) == (99, 25, "stop")
    # the wrapper span is joined into the trace's last inference span
    assert [j["record"] for j in second["provenance"]["joined"]] == ["line 2 $.resourceSpans[0].scopeSpans[0].spans[0]"]
    assert "joined" not in first["provenance"]

    assert failed["signals"]["error"].startswith("NotFoundError: Error code: 404")
    assert (failed["prompt"], failed["response"], failed["model"]) == (
        "Say this is a test", None, "this-model-does-not-exist")

    for e in ev.values():
        assert trace(ws, e["id"]).ok
    scored = scored_categories(ws, cfg)
    assert scored[failed["id"]][0] == "rejected" and "error" in scored[failed["id"]][1]
    # no evaluation events: nothing says the answers are good
    assert scored[second["id"]] == ("needs_human_review", ["no_signal", "no_approval"])
    assert scored[first["id"]][0] == "needs_human_review"
    result = export.run(ws, cfg)
    assert {name: e["rows_out"] for name, e in result.exports.items()} == {"rag": 0, "sft": 0, "preference": 0}


def test_real_spec_example_trace(ws, cfg):
    """The spec's example: UPPER-case ids, bare-number times, no GenAI span: nothing to learn from."""
    shutil.copy(REAL / SPEC_EXAMPLE, ws.kb / SPEC_EXAMPLE)
    f = _run(ws, cfg)[SPEC_EXAMPLE]
    assert (f.rows_in, f.evidence, f.joined, f.by_reason) == (1, 0, 0, {"no_model_call": 1})
    [q] = quarantine_rows(ws)
    assert q["detail"].startswith("span \"I'm a server span\": its trace has no GenAI inference span")
    assert q["provenance"]["record"] == "$.resourceSpans[0].scopeSpans[0].spans[0]"


def test_upper_case_span_joins_lower_case_evaluation(ws, cfg):
    """The same ids in another case (or base64) are the same trace and span."""
    span = _chat("EEE19B7EC3C1B174", "How many moons has Mars?", "Two: Phobos and Deimos.",
                 trace="5B8EFFF798038103D269B633813FC60C")
    span["startTimeUnixNano"] = 1544712660000000000  # a bare number, as in the spec's example
    span["endTimeUnixNano"] = 1544712661000000000
    write_kb(ws, {"spans.json": _doc(_traces(span)), "evals.json": _doc(_logs(
        _evaluation(trace="5b8efff798038103d269b633813fc60c", span="eee19b7ec3c1b174",
                    **{"gen_ai.evaluation.name": "correct", "gen_ai.evaluation.score.label": "pass"}),
        _evaluation(trace="W47/95gDgQPSabYzgT/GDA==", span="7uGbfsPBsXQ=",
                    **{"gen_ai.evaluation.name": "relevance", "gen_ai.evaluation.score.value": 0.8})))})
    files = _run(ws, cfg)
    assert (files["evals.json"].joined, files["spans.json"].evidence) == (2, 1)
    [ev] = evidence_rows(ws)
    assert ev["recorded_at"] == "2018-12-13T14:51:00.000000Z" and ev["latency_ms"] == 1000.0
    assert [s["name"] for s in ev["signals"]["scores"]] == ["correct", "relevance"]
    assert (ev["signals"]["eval_score"], ev["signals"]["verdict"]) == (0.9, "pass")


# --- the golden fixture, signal by signal ------------------------------------------------------


@pytest.fixture
def golden(ws):
    return copy_fixture(ws, GOLDEN)


def test_golden_counts(ws, golden):
    files = _run(ws, golden)
    traces, events, recipe = (files["agent_traces.otlp.jsonl"], files["genai_events.otlp.json"],
                              files["recipe_bot_trace.json"])
    # 12 lines: a cut line, a non-OTLP line; the rest 14 spans → 7 spans make 8 evidence (n=2), 3 join
    assert (traces.rows_in, traces.evidence, traces.split, traces.joined) == (14, 8, 1, 3)
    assert traces.by_reason == {"invalid_json": 1, "no_model_call": 1, "wrong_type": 2}
    # 13 log records: 1 stands alone (tracing off), 9 join their spans, 3 refused
    assert (events.rows_in, events.evidence, events.joined) == (13, 1, 9)
    assert events.by_reason == {"missing_field": 1, "unmatched_join": 1, "wrong_type": 1}
    assert (recipe.rows_in, recipe.evidence, recipe.quarantined) == (1, 1, 0)


def test_golden_evaluations_attach_to_the_span_they_name(ws, golden):
    _run(ws, golden)
    ev = _by_span(ws)
    tool_decision, answer = ev["a1b2c3d4e5f60718"], ev["b2c3d4e5f6071829"]
    assert tool_decision["signals"]["scores"] == []
    # by spanId (relevance), by gen_ai.response.id (faithfulness, 4 on the configured 1..5),
    # and a trace-level label (task_completion) on the trace's last inference span
    assert [(s["name"], s["value"], s["normalized"], s["by"]) for s in answer["signals"]["scores"]] == [
        ("relevance", 0.92, 0.92, "automated"), ("faithfulness", 4, 0.75, "automated"),
        ("task_completion", "pass", 1.0, "automated")]
    assert (answer["signals"]["eval_score"], answer["signals"]["verdict"]) == (0.89, "pass")
    joined = {(j["source_file"].removeprefix("data/_kb/"), j["line_offset"]) for j in answer["provenance"]["joined"]}
    assert joined == {("agent_traces.otlp.jsonl", 1), ("agent_traces.otlp.jsonl", 3), ("agent_traces.otlp.jsonl", 4),
                      ("genai_events.otlp.json", 0), ("genai_events.otlp.json", 1), ("genai_events.otlp.json", 2)}
    assert answer["task_name"] == "flight-finder"  # gen_ai.agent.name of the enclosing invoke_agent span
    detail = {q["detail"] for q in quarantine_rows(ws)}
    assert ("a gen_ai.evaluation.result record naming span 99aabbccddeeff00, which is in no source file: add the "
            "file holding that span to data/_kb/") in detail


def test_golden_signals_and_categories(ws, golden):
    _run(ws, golden)
    ev = _by_span(ws)
    timeout, capture_off = ev["d4e5f60718293a4b"], ev["e5f60718293a4b5c"]
    two = [ev["f60718293a4b5c6d/choice-0"], ev["f60718293a4b5c6d/choice-1"]]
    older, openllmetry = ev["3a4b5c6d7e8f9001"], ev["4b5c6d7e8f900112"]
    alone, recipe = ev["gen_ai.client.inference.operation.details"], ev["B7AD6B7169203331"]

    assert timeout["signals"]["error"] == "APITimeoutError: Request timed out."
    assert timeout["signals"]["scores"] == []  # its evaluation failed (error.type): no score
    assert (capture_off["prompt"], capture_off["response"], capture_off["prompt_tokens"]) == (None, None, 54)
    assert capture_off["signals"]["stop_reason"] == "stop"
    assert [e["signals"]["stop_reason"] for e in two] == ["stop", "length"]
    assert older["messages"][0]["content"] == "You are a concise assistant for a cycling shop."
    assert older["response"].startswith("Yes - we bleed")
    assert (older["signals"]["human_rating"], older["signals"]["approved"]) == (1.0, True)
    assert (older["provider"], older["prompt_tokens"]) == ("openai", 31)  # gen_ai.system
    assert (openllmetry["prompt"], openllmetry["response"]) == ("What is the capital of Australia?",
                                                                "The capital of Australia is Canberra.")
    assert (openllmetry["prompt_tokens"], openllmetry["completion_tokens"]) == (40, 24)
    assert alone["recorded_at_from"] == "record:timeUnixNano" and alone["latency_ms"] is None
    assert recipe["response"].startswith("Lower the egg")  # the reasoning part is not the answer
    assert recipe["task_id"] == "0af7651916cd43dd8448eb211c80319c:b7ad6b7169203331"

    scored = scored_categories(ws, golden)
    cats = Counter(c for c, _ in scored.values())
    assert cats == {"accepted": 3, "rejected": 4, "needs_human_review": 3}
    assert scored[ev["b2c3d4e5f6071829"]["id"]] == ("accepted", [])
    assert scored[older["id"]] == ("accepted", [])
    assert scored[recipe["id"]] == ("accepted", [])
    assert "empty_answer" in scored[capture_off["id"]][1]
    assert "truncated" in scored[two[1]["id"]][1] and "audit_fail" in scored[two[0]["id"]][1]
    for e in ev.values():
        assert trace(ws, e["id"]).ok


def test_golden_refusals_name_the_problem(ws, golden):
    _run(ws, golden)
    q = {(r["provenance"]["source_file"].removeprefix("data/_kb/"), r["provenance"]["line_offset"]): r
         for r in quarantine_rows(ws)}
    assert q[("agent_traces.otlp.jsonl", 8)]["reason"] == "invalid_json"
    assert "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT" in q[("agent_traces.otlp.jsonl", 9)]["detail"]
    assert q[("genai_events.otlp.json", 5)]["detail"].startswith("the GenAI span it belongs with was refused")
    assert q[("agent_traces.otlp.jsonl", 11)]["detail"].startswith("not an OTLP span or log record")
    assert q[("genai_events.otlp.json", 11)]["detail"].startswith("field 'traceId' is missing")
    assert "GET /health" in q[("agent_traces.otlp.jsonl", 10)]["detail"]


# --- joins and edge cases --------------------------------------------------------------------


def test_content_capture_off_is_evidence_the_exports_refuse(ws, cfg):
    write_kb(ws, {"spans.json": _doc(_traces(_span(
        "a" * 16, **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 9,
                     "gen_ai.usage.output_tokens": 3, "gen_ai.response.finish_reasons": ["stop"]})))})
    _run(ws, cfg)
    [ev] = evidence_rows(ws)
    assert (ev["prompt"], ev["response"], ev["completion_tokens"]) == (None, None, 3)
    assert scored_categories(ws, cfg)[ev["id"]][0] == "rejected"
    export.run(ws, cfg)
    reasons = Counter(r["reason"] for r in export.refusals(ws, "preference"))
    assert reasons == {"missing_text": 1}


def test_failed_agent_run_marks_its_last_answer(ws, cfg):
    spans = [_span("0" * 15 + "1", "invoke_agent helper", start_ms=0, end_ms=900,
                   status={"code": 2, "message": "tool budget exhausted"},
                   **{"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "helper"}),
             _chat("0" * 15 + "2", "q1", "a1", parent="0" * 15 + "1", start_ms=10, end_ms=200),
             _chat("0" * 15 + "3", "q2", "a2", parent="0" * 15 + "1", start_ms=300, end_ms=800)]
    write_kb(ws, {"spans.jsonl": "".join(_doc(_traces(s)) + "\n" for s in spans)})
    f = _run(ws, cfg)["spans.jsonl"]
    assert (f.evidence, f.joined) == (2, 1)
    ev = _by_span(ws)
    assert ev["0" * 15 + "2"]["signals"]["error"] is None
    assert ev["0" * 15 + "3"]["signals"]["error"] == (
        "the enclosing span 'invoke_agent helper' ended in error: tool budget exhausted")
    assert ev["0" * 15 + "3"]["task_name"] == "helper"


def test_span_event_evaluation_of_an_agent_goes_to_its_last_answer(ws, cfg):
    agent = _span("1" * 16, "invoke_agent", end_ms=1000, events=[{
        "timeUnixNano": str(NS), "name": "gen_ai.evaluation.result",
        "attributes": _attrs({"gen_ai.evaluation.name": "goal", "gen_ai.evaluation.score.value": 0.9})}],
        **{"gen_ai.operation.name": "invoke_agent"})
    early = _chat("2" * 16, "q", "thinking", parent="1" * 16, end_ms=100)
    late = _chat("3" * 16, "q", "done", parent="1" * 16, start_ms=200, end_ms=500)
    other = _chat("4" * 16, "q", "elsewhere", start_ms=600, end_ms=900)  # same trace, not under the agent
    write_kb(ws, {"spans.json": _doc(_traces(agent, early, late, other))})
    _run(ws, cfg)
    ev = _by_span(ws)
    assert [s["name"] for s in ev["3" * 16]["signals"]["scores"]] == ["goal"]
    assert ev["2" * 16]["signals"]["scores"] == ev["4" * 16]["signals"]["scores"] == []
    assert [j["record"] for j in ev["4" * 16]["provenance"]["joined"]] == ["$.resourceSpans[0].scopeSpans[0].spans[0]"]


def test_a_span_read_twice_is_a_duplicate(ws, cfg):
    span = _chat("5" * 16, "q", "a")
    write_kb(ws, {"a.json": _doc(_traces(span)), "b.json": _doc(_traces(span, service="other"))})
    files = _run(ws, cfg)
    assert (files["a.json"].evidence, files["b.json"].by_reason) == (1, {"duplicate_row": 1})


def test_structured_content_on_a_details_event_and_older_message_events(ws, cfg):
    """Content as structured arrays on a details log record; the older events' tool calls."""
    details = {"timeUnixNano": str(NS), "eventName": "gen_ai.client.inference.operation.details",
               "traceId": T2, "spanId": "6" * 16, "attributes": _attrs({
                   "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "weather?"}]}],
                   "gen_ai.output.messages": [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
                       {"type": "tool_call", "id": "c1", "name": "weather", "arguments": {"city": "Oslo"}}]}]})}
    old = [{"timeUnixNano": str(NS), "traceId": T2, "spanId": "7" * 16, "body": _value(body),
            "attributes": _attrs({"event.name": name, "gen_ai.system": "openai"})} for name, body in (
        ("gen_ai.user.message", {"content": "add 2 and 3"}),
        ("gen_ai.choice", {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}}))]
    spans = [_span("6" * 16, trace=T2, **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}),
             _span("7" * 16, trace=T2, start_ms=200, end_ms=300, **{"gen_ai.system": "openai",
                                                                   "gen_ai.request.model": "m"})]
    write_kb(ws, {"spans.json": _doc(_traces(*spans)), "logs.json": _doc(_logs(details, *old))})
    files = _run(ws, cfg)
    assert (files["spans.json"].evidence, files["logs.json"].joined) == (2, 3)
    ev = _by_span(ws)
    assert (ev["6" * 16]["prompt"], ev["6" * 16]["tool_calls"][0]["arguments"]) == ("weather?", {"city": "Oslo"})
    assert ev["6" * 16]["signals"]["stop_reason"] == "tool_calls"
    assert ev["7" * 16]["prompt"] == "add 2 and 3"
    assert ev["7" * 16]["tool_calls"] == [{"id": "c2", "name": "add", "arguments": {"a": 2, "b": 3}, "problem": None}]


def test_a_call_that_fails_to_read_takes_its_records_along(ws, cfg):
    bad = _span("8" * 16, **{"gen_ai.operation.name": "chat",
                             "gen_ai.output.messages": '[{"role": "user", "parts": []}]'})
    tool = _span("9" * 16, "execute_tool x", start_ms=0, end_ms=50, **{"gen_ai.operation.name": "execute_tool"})
    write_kb(ws, {"spans.json": _doc(_traces(bad, tool)),
                  "logs.json": _doc(_logs(_evaluation(span="8" * 16, **{"gen_ai.evaluation.name": "x",
                                                                          "gen_ai.evaluation.score.value": 1.0})))})
    files = _run(ws, cfg)
    assert files["spans.json"].by_reason == {"wrong_type": 2} and files["logs.json"].by_reason == {"wrong_type": 1}
    details = sorted(q["detail"] for q in quarantine_rows(ws))
    assert details[0] == "field 'gen_ai.output.messages[0].role': 'user', expected assistant"
    assert all(d.startswith("the GenAI span it belongs with was refused") for d in details[1:])


def test_semconv_1_26_content_events_and_plain_system_instructions(ws, cfg):
    old = _span("a1" * 8, trace=T2, events=[
        {"timeUnixNano": str(NS), "name": "gen_ai.content.prompt", "attributes": _attrs(
            {"gen_ai.prompt": '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]'})},
        {"timeUnixNano": str(NS), "name": "gen_ai.content.completion", "attributes": _attrs(
            {"gen_ai.completion": '[{"role": "assistant", "content": "4"}]'})}],
        **{"gen_ai.system": "openai", "gen_ai.request.model": "gpt-4", "gen_ai.response.finish_reasons": "stop"})
    plain = _chat("b2" * 8, "hi", "hello", trace=T2, start_ms=200, end_ms=300,
                  **{"gen_ai.system_instructions": "You are terse."})
    write_kb(ws, {"spans.json": _doc(_traces(old, plain))})
    _run(ws, cfg)
    ev = _by_span(ws)
    assert [(m["role"], m["content"]) for m in ev["a1" * 8]["messages"]] == [
        ("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")]
    assert ev["a1" * 8]["signals"]["stop_reason"] == "stop"  # one string, not a list
    assert ev["b2" * 8]["messages"][0] == {"role": "system", "content": "You are terse.", "name": None,
                                          "tool_calls": None, "tool_call_id": None}


def test_an_empty_export_is_refused_by_name(ws, cfg):
    write_kb(ws, {"spans.jsonl": _doc(_traces(_chat("c3" * 8, "q", "a"))) + "\n"
                  + _doc({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": []}]}]}) + "\n"})
    f = _run(ws, cfg)["spans.jsonl"]
    assert (f.rows_in, f.evidence, f.by_reason) == (2, 1, {"missing_field": 1})
    assert quarantine_rows(ws)[0]["detail"].startswith("an OTLP/JSON traces export with no record at")
