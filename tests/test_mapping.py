"""Declarative mappings, version 2: documents, lookups by key, filters, roles, conversions,
named scores — a format that is not built in, onboarded from refinery.toml alone."""

from __future__ import annotations

import orjson
import pytest

from conftest import evidence_rows, quarantine_rows, write_kb
from refinery import materialize
from refinery.config import ConfigError, load_config
from refinery.mapping import lookup, otel_value, parse_path

OTEL_MAPPING = '''
[mappings.spans]
match = "spans*.json"
kind = "llm_span"
record_paths = ["resourceSpans[].scopeSpans[].spans[]"]
filter = {"attributes[key=gen_ai.operation.name].value.stringValue" = "chat"}
[mappings.spans.fields]
recorded_at = "startTimeUnixNano"
messages = {path = "attributes[key=gen_ai.input.messages].value.stringValue", convert = "json"}
response_messages = {path = "attributes[key=gen_ai.output.messages].value.stringValue", convert = "json"}
model = ["attributes[key=gen_ai.response.model].value.stringValue",
         "attributes[key=gen_ai.request.model].value.stringValue"]
prompt_tokens = {path = "attributes[key=gen_ai.usage.input_tokens].value", convert = "otel_value"}
completion_tokens = {path = "attributes[key=gen_ai.usage.output_tokens].value", convert = "otel_value"}
latency_ms = {start = "startTimeUnixNano", end = "endTimeUnixNano"}
stop_reason = {path = "attributes[key=gen_ai.response.finish_reasons].value", convert = ["otel_value", "first"]}
task_id = "spanId"
[mappings.spans.scores.toxicity]
field = {path = "attributes[key=eval.toxicity].value", convert = "otel_value"}
higher_is_better = false
'''


def attr(key, value):
    kind = "intValue" if isinstance(value, int) else "stringValue"
    return {"key": key, "value": {kind: str(value) if kind == "intValue" else value}}


def span(span_id, op, *, msgs=None, out=None, tox=None, start=1762430400000000000, tokens="12"):
    attrs = [attr("gen_ai.operation.name", op), attr("gen_ai.request.model", "gpt-4o-mini")]
    if msgs is not None:
        attrs.append(attr("gen_ai.input.messages", orjson.dumps(msgs).decode()))
    if out is not None:
        attrs.append(attr("gen_ai.output.messages", orjson.dumps(out).decode()))
    attrs += [attr("gen_ai.usage.input_tokens", 12),
              {"key": "gen_ai.usage.output_tokens", "value": {"intValue": tokens}},
              {"key": "gen_ai.response.finish_reasons", "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}}}]
    if tox is not None:
        attrs.append({"key": "eval.toxicity", "value": {"doubleValue": tox}})
    return {"traceId": "t1", "spanId": span_id, "name": op, "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(start + 1_500_000_000), "attributes": attrs}


def test_paths_with_lookups_by_key():
    row = {"attributes": [{"key": "a.b", "value": {"intValue": "7"}}], "x": {"y": [1, 2]}, "dotted.col": 3}
    assert lookup(row, "attributes[key=a.b].value") == {"intValue": "7"}
    assert otel_value(lookup(row, "attributes[key=a.b].value")) == 7
    assert lookup(row, "x.y[1]") == 2 and lookup(row, "x.y[5]") is None and lookup(row, "dotted.col") == 3
    with pytest.raises(ValueError, match="cannot read it"):
        parse_path("a[")


def test_an_otel_export_onboarded_from_the_config_alone(ws):
    (ws.root / "refinery.toml").write_text(OTEL_MAPPING)
    doc = {"resourceSpans": [{"resource": {"attributes": [attr("service.name", "support")]}, "scopeSpans": [
        {"spans": [
            span("s1", "chat", msgs=[{"role": "user", "content": "Refund INV-1042?"}],
                 out=[{"role": "assistant", "content": "Refund the second capture."}], tox=0.1),
            span("s2", "execute_tool"),
            span("s3", "chat", msgs="not a list", out=[{"role": "assistant", "content": "x"}]),
            span("s4", "chat", msgs=[{"role": "user", "content": "Hi"}],
                 out=[{"role": "assistant", "content": "Hello"}], tokens="many"),
        ]}]}]}
    write_kb(ws, {"spans_2026-11-06.json": orjson.dumps(doc)})
    result = materialize.run(ws, load_config(ws.root), validate=True)
    f = result.files[0]
    assert (f.transform, f.rows_in, f.evidence, f.quarantined) == ("mapping:spans", 4, 2, 2)
    assert f.dropped_fields == {"completion_tokens": 1}  # s4 kept, its bad token count left out
    ev = {e["task_id"]: e for e in evidence_rows(ws)}
    s1 = ev["s1"]
    assert (s1["prompt"], s1["response"], s1["model"], s1["prompt_tokens"], s1["completion_tokens"]) == (
        "Refund INV-1042?", "Refund the second capture.", "gpt-4o-mini", 12, 12)
    assert (s1["latency_ms"], s1["signals"]["stop_reason"], s1["recorded_at"]) == (
        1500.0, "stop", "2025-11-06T12:00:00.000000Z")
    tox = s1["signals"]["scores"][0]
    assert (tox["name"], tox["higher_is_better"], tox["normalized"]) == ("toxicity", False, 0.9)
    assert s1["signals"]["eval_score"] == 0.9  # lower toxicity is the better answer
    assert s1["provenance"]["record"] == "$.resourceSpans[0].scopeSpans[0].spans[0]"
    assert ev["s4"]["completion_tokens"] is None
    reasons = {q["provenance"]["record"]: q["reason"] for q in quarantine_rows(ws)}
    assert reasons == {"$.resourceSpans[0].scopeSpans[0].spans[1]": "filtered_out",
                       "$.resourceSpans[0].scopeSpans[0].spans[2]": "wrong_type"}


def test_roles_and_message_keys_are_renamed(ws):
    (ws.root / "refinery.toml").write_text('''
[mappings.bot]
match = "bot*.jsonl"
roles = {human = "user", bot = "assistant"}
message_keys = {role = "speaker", content = "text"}
[mappings.bot.fields]
recorded_at = "at"
messages = "turns"
system = "persona"
score = "rating"
[mappings.bot.scores.helpfulness]
field = "stars"
scale = [1, 5]
by = "human"
''')
    row = {"at": "2026-11-06T10:00:00Z", "persona": "You are the bot.", "stars": 5,
           "turns": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"},
                     {"speaker": "human", "text": "Book LIS-AMS"}, {"speaker": "bot", "text": "Booked TP662."}]}
    write_kb(ws, {"bot_log.jsonl": orjson.dumps(row).decode() + "\n"})
    materialize.run(ws, load_config(ws.root), validate=True)
    (ev,) = evidence_rows(ws)
    assert [m["role"] for m in ev["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ev["prompt"] == "User: Hi\n\nAssistant: Hello!\n\nUser: Book LIS-AMS"
    assert ev["response"] == "Booked TP662."
    assert ev["signals"]["human_rating"] == 1.0 and ev["signals"]["scores"][0]["by"] == "human"


@pytest.mark.parametrize("toml,key", [
    ('[mappings.x]\nmatch = "x*"\n[mappings.x.fields]\nprompt = "a["\n', "mappings.x.fields.prompt"),
    ('[mappings.x]\nmatch = "x*"\n[mappings.x.fields]\nprompt = {path = "a", convert = "yaml"}\n',
     "mappings.x.fields.prompt.convert"),
    ('[mappings.x]\nmatch = "x*"\n[mappings.x.fields]\nlatency_ms = {start = "a"}\nprompt = "p"\n',
     "mappings.x.fields.latency_ms"),
    ('[mappings.x]\nmatch = "x*"\nrecord_paths = ["a..b"]\n[mappings.x.fields]\nprompt = "p"\n', "mappings.x"),
    ('[mappings.x]\nmatch = "x*"\n[mappings.x.fields]\nprompt = "p"\nresponse_text = "r"\n',
     "mappings.x.fields.response_text"),
])
def test_mapping_errors_name_the_key(ws, toml, key):
    (ws.root / "refinery.toml").write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(ws.root)
    assert f"'{key}" in str(e.value)


def test_the_readme_example_reads_real_opentelemetry_spans(ws):
    """The README's version-2 mapping, on the OpenTelemetry instrumentation's own export
    (tests/fixtures/real/otel_genai/): messages in the GenAI `parts` shape, tool calls and all."""
    import re
    import shutil

    from conftest import FIXTURES, REPO

    readme = (REPO / "README.md").read_text()
    (ws.root / "refinery.toml").write_text(re.search(r"```toml\n(\[mappings\.spans\].*?)```", readme, re.S).group(1))
    shutil.copy(FIXTURES / "real" / "otel_genai" / "openai_v2_cassette_replay.otlp.jsonl", ws.kb / "spans_genai.json")
    result = materialize.run(ws, load_config(ws.root), validate=True)
    assert (result.rows_in, result.evidence, result.by_reason) == (4, 3, {"filtered_out": 1})
    calls = sorted((e for e in evidence_rows(ws) if e["tool_calls"]), key=lambda e: e["latency_ms"])
    assert [c["name"] for c in calls[0]["tool_calls"]] == ["get_current_weather"] * 2
    assert calls[0]["prompt"] == "What's the weather in Seattle and San Francisco today?"
    assert calls[0]["response"].startswith("Today, the weather in Seattle is 50 degrees")
    assert calls[1]["response"] is None and calls[1]["signals"]["stop_reason"] == "tool_calls"
