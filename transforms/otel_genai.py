"""OpenTelemetry GenAI spans and events, exported as OTLP/JSON (traces and logs), joined by trace.

    traces  {"resourceSpans": [{"resource": {"attributes": [...]},          # service.name
                                "scopeSpans": [{"scope": {...}, "spans": [
        {"traceId", "spanId", "parentSpanId", "name", "startTimeUnixNano", "endTimeUnixNano",
         "status": {"code": 2 | "STATUS_CODE_ERROR", "message"},             # {} when OK
         "attributes": [{"key", "value": {"stringValue" | "intValue" (often a string) | "doubleValue"
                                          | "boolValue" | "arrayValue": {"values"} | "kvlistValue"}}],
         "events": [{"name", "timeUnixNano", "attributes"}]}]}]}]}
    logs    {"resourceLogs": [{"scopeLogs": [{"logRecords": [
        {"traceId", "spanId", "timeUnixNano", "eventName", "attributes", "body"}]}]}]}

One document per file, or one per line (the OTLP file exporter writes one export request a
line). Recognised by content: documents of resourceSpans[].scopeSpans[] or
resourceLogs[].scopeLogs[]. An OTLP file is claimed even when its first documents hold no
GenAI span — GenAI spans sit among HTTP and app spans, and no other importer reads OTLP — and
what is not GenAI in it is refused record by record, by name. Ids are hex in either case (the
spec's own example is UPPER-case) or base64 (protobuf's JSON mapping); times are nanosecond
strings or bare numbers.

Every span and log record is joined by its trace id, across files (a traces file and a logs
file side by side). Evidence is one per GenAI inference span: `gen_ai.operation.name` chat,
text_completion or generate_content — or no operation, but `gen_ai.request.model` with message
content, or OpenLLMetry's `llm.request.type` chat/completion:

- messages: `gen_ai.system_instructions` (the system message), `gen_ai.input.messages` and
  `gen_ai.output.messages` — JSON text on spans, structured arrays on events — whose parts map
  `text` to content, `tool_call` {id, name, arguments} to tool calls and `tool_call_response`
  {id, response} to tool messages. The same attributes on a
  `gen_ai.client.inference.operation.details` event (a span event, or a log record naming the
  span). Older conventions: message events gen_ai.system/user/assistant/tool.message and
  gen_ai.choice (span events or log records; the name in `eventName` or the `event.name`
  attribute; the content in the body or the attributes); OpenLLMetry's indexed
  `gen_ai.prompt.N.*` / `gen_ai.completion.N.*` attributes; `gen_ai.prompt` / `gen_ai.completion`
  JSON (semconv 1.26). The prompt is the conversation up to its last user message; each output
  message is one choice (several: parts choice-0, choice-1, ...).
- model `gen_ai.response.model`, else `gen_ai.request.model`; provider `gen_ai.provider.name`,
  else `gen_ai.system`; tokens `gen_ai.usage.input_tokens` / `output_tokens` (older
  `prompt_tokens` / `completion_tokens`); stop reason the choice's `finish_reason`, else
  `gen_ai.response.finish_reasons`; latency end − start, ns → ms; time `startTimeUnixNano`;
  task id `gen_ai.response.id`, else `<traceId>:<spanId>`; task name `gen_ai.agent.name` of the
  span or of its nearest ancestor, else the resource's `service.name`.
- error: status code 2 / STATUS_CODE_ERROR (with its message), or `error.type`. The trace's last
  inference span also takes the error of a span enclosing it: the last answer of a failed agent
  run is not a good answer.
- quality: `gen_ai.evaluation.result` events (log records or span events) become automated
  named scores — `gen_ai.evaluation.name`; `score.value`, or `score.label` when there is no
  value or the value is off 0..1 with no [signals.<name>] scale — combined into eval_score; a
  label pass/fail is the verdict (any fail wins). An evaluation attaches to the span it names
  (a log record's spanId; the span holding a span event): that span if it is an inference
  span, else the last inference span under it, else the trace's last. One naming no span
  attaches by `gen_ai.response.id`, else to the trace's last inference span (a trace-level
  evaluation). The older `gen_ai.evaluation.user_feedback` (`gen_ai.evaluation.score` in
  -1..1) is a human rating, and its sign the approval. A failed evaluation (`error.type`)
  gives no score; explanations are not kept (the evidence has no field for them).

Every other record of the trace — execute_tool, invoke_agent, HTTP and app spans, other log
records — is joined into the evidence of the trace's last inference span (the one that ends
last): it is part of the run that produced that answer. A trace with no inference span in any
file holds no model call to learn from: each of its records is refused as no_model_call, naming
its trace (its GenAI span may be in a file not given; a plain, non-GenAI trace, such as the OTLP
spec's example, has none). An evaluation or message event naming a span that is in no file is
unmatched_join. A span or log record with no trace id cannot be joined and is refused
(missing_field) — except a details event, which holds a whole call and stands alone (tracing
off); a line that is no OTLP document is refused as wrong_type. A span recorded with content
capture off still becomes evidence — model, tokens, latency, stop reason, errors — with no
prompt and no response: the scorer rejects it (empty_answer) and the exports refuse it
(missing_text).

Not read: reasoning, blob, file and uri parts, server-side tool calls, execute_tool arguments
and results (the next inference span's input holds them), embeddings spans,
`gen_ai.conversation.id` (the evidence has no session field), and other vendors' conventions
(OpenInference `llm.input_messages.*`, the Vercel AI SDK's `ai.*`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import defaultdict
from typing import Any, NamedTuple

import orjson

from refinery import chat_formats as cf
from refinery.mapping import otel_value
from refinery.reasons import Reason
from refinery.transform import (
    PART_KEY, Emit, Keyed, Refuse, RowError, TransformSpec, combine_scores, dated, messages, wrong_type,
)

SPANS, LOGS = "resourceSpans[].scopeSpans[].spans[]", "resourceLogs[].scopeLogs[].logRecords[]"
SPEC = TransformSpec(
    name="otel_genai", patterns=(), format="json", kind="chat_completion",
    description="OpenTelemetry GenAI spans and events (OTLP/JSON traces and logs), joined by trace",
    record_paths=(SPANS, LOGS))

INFERENCE_OPS = {"chat", "text_completion", "generate_content"}
#: Operations that are not one model call with a text answer, whatever content they carry.
NOT_INFERENCE_OPS = {"embeddings", "execute_tool", "invoke_agent", "create_agent", "invoke_workflow"}
DETAILS = "gen_ai.client.inference.operation.details"
EVALUATION, USER_FEEDBACK = "gen_ai.evaluation.result", "gen_ai.evaluation.user_feedback"
MESSAGE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                  "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
CHOICE = "gen_ai.choice"
CONTENT_EVENTS = {"gen_ai.content.prompt": "gen_ai.prompt", "gen_ai.content.completion": "gen_ai.completion"}
#: Events whose content belongs to the call of the span they name.
CALL_EVENTS = {*MESSAGE_EVENTS, CHOICE, DETAILS}
ERROR_CODES = {2, "2", "STATUS_CODE_ERROR", "ERROR"}
PASS, FAIL = {"pass", "passed"}, {"fail", "failed"}
LOG_KEYS = ("timeUnixNano", "observedTimeUnixNano", "body", "severityNumber", "severityText", "eventName")


# --- OTLP values ----------------------------------------------------------------------------


def key_values(kvs: Any, field: str = "attributes") -> dict[str, Any]:
    """`[{key, value: AnyValue}]` as a dict of plain values (intValue "75" → 75, arrayValue → list,
    kvlistValue → dict)."""
    if kvs is None:
        return {}
    if not isinstance(kvs, list):
        raise wrong_type(field, "a list of {key, value}", kvs)
    return {kv["key"]: otel_value(kv.get("value")) for kv in kvs
            if isinstance(kv, dict) and isinstance(kv.get("key"), str)}


def attr(obj: dict[str, Any], key: str) -> Any:
    """One attribute of a span, event, log record or resource, whatever its value type."""
    for kv in obj.get("attributes") or ():
        if isinstance(kv, dict) and kv.get("key") == key:
            return otel_value(kv.get("value"))
    return None


def hex_id(value: Any, size: int) -> str | None:
    """A trace (16 bytes) or span (8 bytes) id as lower-case hex, from hex in any case or base64."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) == 2 * size and re.fullmatch(r"[0-9a-fA-F]+", value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value.lower()
    return raw.hex() if len(raw) == size else value.lower()


def _nanos(row: dict[str, Any], field: str) -> int | None:
    """A *UnixNano time, a string or a bare number; 0 means unknown in OTLP."""
    v = row.get(field)
    if v is None or v in ("", 0, "0"):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise wrong_type(field, "nanoseconds since the epoch", v) from None


def _json(value: Any, field: str) -> Any:
    """An attribute held as JSON text on spans and as structure on events."""
    if not isinstance(value, str):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        raise RowError(Reason.WRONG_TYPE, f"field '{field}' is not complete JSON (cut by the SDK's attribute "
                                          "length limit? raise OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT)") from None


def _count(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():  # JS SDKs may send counts as doubleValue
        return int(v)
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


# --- reading records ----------------------------------------------------------------------


class Event(NamedTuple):
    name: str | None
    fields: dict[str, Any]
    """its attributes, with a log record's body (a map, or JSON text of one) laid over them"""
    span: str | None
    """the span it belongs to: the span holding it, or a log record's spanId"""


class Span(NamedTuple):
    trace: str | None
    id: str | None
    parent: str | None
    name: str | None
    attrs: dict[str, Any]
    events: list[Event]
    start: int | None
    end: int | None
    status: dict[str, Any]


def record_kind(row: dict[str, Any], record: str | None) -> str | None:
    """"span", "log", or None for neither: by where the record sits in its document, else (a
    record that is a whole line or document) by its keys."""
    if record is not None and ".spans[" in record:
        return "span"
    if record is not None and ".logRecords[" in record:
        return "log"
    if "spanId" in row and "name" in row and "startTimeUnixNano" in row:
        return "span"
    return "log" if any(k in row for k in LOG_KEYS) else None


def read_span(row: dict[str, Any]) -> Span:
    sid = hex_id(row.get("spanId"), 8)
    events = [Event(_str(ev.get("name")), key_values(ev.get("attributes"), f"events[{i}].attributes"), sid)
              for i, ev in enumerate(row.get("events") or ()) if isinstance(ev, dict)]
    name = row.get("name")
    return Span(hex_id(row.get("traceId"), 16), sid, hex_id(row.get("parentSpanId"), 8),
                name if isinstance(name, str) else None, key_values(row.get("attributes")), events,
                _nanos(row, "startTimeUnixNano"), _nanos(row, "endTimeUnixNano"),
                row["status"] if isinstance(row.get("status"), dict) else {})


def read_log(row: dict[str, Any]) -> Event:
    attrs = key_values(row.get("attributes"))
    body = otel_value(row.get("body"))
    if isinstance(body, str) and body[:1] in ("{", "["):  # some SDKs send the event body as JSON text
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    if isinstance(body, dict):
        fields = {**attrs, **body}
    else:
        fields = {**attrs, "content": body} if body is not None else attrs
    return Event(_str(row.get("eventName")) or _str(attrs.get("event.name")), fields, hex_id(row.get("spanId"), 8))


def _log_time(row: dict[str, Any]) -> tuple[str, int | None]:
    t = _nanos(row, "timeUnixNano")
    return ("record:timeUnixNano", t) if t is not None else (
        "record:observedTimeUnixNano", _nanos(row, "observedTimeUnixNano"))


# --- messages -----------------------------------------------------------------------------


def _text(v: Any) -> str | None:
    return v if v is None or isinstance(v, str) else orjson.dumps(v).decode()


def _from_parts(msg: Any, field: str) -> list[dict[str, Any]]:
    """One semconv message {role, parts, name} as OpenAI-shaped messages: text parts joined,
    tool_call parts as its tool calls, each tool_call_response part a tool message."""
    if not isinstance(msg, dict):
        raise wrong_type(field, "a message object {role, parts}", msg)
    parts = msg.get("parts")
    if not isinstance(parts, list):
        raise wrong_type(f"{field}.parts", "a list of parts", parts)
    texts, calls, results = [], [], []
    for p in parts:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("content", p.get("text")), str):
            texts.append(p.get("content", p.get("text")))
        elif kind == "tool_call":
            calls.append({"id": p.get("id"), "name": p.get("name"), "arguments": p.get("arguments")})
        elif kind == "tool_call_response":  # the spec's own example once said "result"
            results.append({"role": "tool", "content": _text(p.get("response", p.get("result"))),
                            "tool_call_id": p.get("id")})
        # reasoning, blob, file, uri and server-side tool parts are not text of the conversation
    said = [{"role": msg.get("role"), "content": "".join(texts) if texts else None, "tool_calls": calls or None,
             "name": msg.get("name")}] if texts or calls or not results else []
    return said + results


def _semconv(value: Any, field: str) -> list[dict[str, Any]]:
    value = _json(value, field)
    if not isinstance(value, list):
        raise wrong_type(field, "a list of messages {role, parts}", value)
    out = [m for i, msg in enumerate(value) for m in _from_parts(msg, f"{field}[{i}]")]
    # a tool_call_response names only the call it answers: give its message the tool's name
    names = {c["id"]: c["name"] for m in out for c in m.get("tool_calls") or () if isinstance(c["id"], str)}
    for m in out:
        if m["role"] == "tool" and isinstance(m["tool_call_id"], str):
            m["name"] = names.get(m["tool_call_id"])
    return out


def _instructions(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str) and value.lstrip()[:1] not in ("[", "{"):  # some SDKs write the bare text
        return [{"role": "system", "content": value}]
    value = _json(value, "gen_ai.system_instructions")
    if not isinstance(value, list):
        raise wrong_type("gen_ai.system_instructions", "a list of parts", value)
    texts = [p.get("content", p.get("text")) for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
    text = "".join(t for t in texts if isinstance(t, str))
    return [{"role": "system", "content": text}] if text else []


def _event_message(ev: Event) -> dict[str, Any]:
    """An older-conventions message event (gen_ai.user.message, ...) as an OpenAI-shaped message."""
    content = ev.fields.get("content")
    if isinstance(content, str) and content[:1] == "[":  # Strands writes content blocks as JSON text
        try:
            content = orjson.loads(content)
        except orjson.JSONDecodeError:
            pass
    msg = {"role": MESSAGE_EVENTS[ev.name], "content": content, "tool_calls": ev.fields.get("tool_calls")}
    if msg["role"] == "tool":
        msg["tool_call_id"] = _str(ev.fields.get("id")) or _str(ev.fields.get("tool_call_id"))
    return msg


def _choice(ev: Event) -> tuple[int, dict[str, Any], str | None]:
    """A gen_ai.choice event: (index, the assistant message, its finish reason)."""
    message = ev.fields.get("message")
    if isinstance(message, str):
        try:
            message = orjson.loads(message)
        except orjson.JSONDecodeError:
            message = {"content": message}
    if isinstance(message, list):  # content blocks
        message = {"content": message}
    message = message if isinstance(message, dict) else {}
    finish = ev.fields.get("finish_reason")
    return (_count(ev.fields.get("index")) or 0,
            {"role": "assistant", "content": message.get("content"), "tool_calls": message.get("tool_calls")},
            finish if isinstance(finish, str) else None)


_INDEXED = re.compile(r"gen_ai\.(prompt|completion)\.(\d+)\.(.+)")
_INDEXED_CALL = re.compile(r"tool_calls\.(\d+)\.(\w+)")


def _indexed(attrs: dict[str, Any], which: str) -> list[tuple[dict[str, Any], str | None]]:
    """OpenLLMetry's flattened gen_ai.prompt.N.role / .content / .tool_calls.M.name ... attributes."""
    groups: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in attrs.items():
        m = _INDEXED.fullmatch(key)
        if m and m.group(1) == which:
            groups[int(m.group(2))][m.group(3)] = value
    out = []
    for i in sorted(groups):
        g = groups[i]
        calls: dict[int, dict[str, Any]] = defaultdict(dict)
        for key, value in g.items():
            m = _INDEXED_CALL.fullmatch(key)
            if m:
                calls[int(m.group(1))][m.group(2)] = value
        msg = {"role": g.get("role") or ("assistant" if which == "completion" else "user"), "content": g.get("content"),
               "tool_call_id": g.get("tool_call_id"), "tool_calls": [calls[j] for j in sorted(calls)] or None}
        finish = g.get("finish_reason")
        out.append((msg, finish if isinstance(finish, str) else None))
    return out


def _legacy_json(attrs: dict[str, Any], events: list[Event], key: str) -> list[dict[str, Any]] | None:
    """semconv 1.26: gen_ai.prompt / gen_ai.completion, JSON of [{role, content}], on the span or
    on a gen_ai.content.prompt / .completion event."""
    event = next((e for e in events if CONTENT_EVENTS.get(e.name or "") == key), None)
    value = attrs.get(key, event.fields.get(key) if event else None)
    if value is None:
        return None
    value = _json(value, key)
    if not isinstance(value, list):
        raise wrong_type(key, "a list of messages", value)
    return [m for m in value if isinstance(m, dict)]


class Content(NamedTuple):
    prompt: list[dict[str, Any]] | None
    """the conversation sent, normalised (None: not recorded)"""
    choices: list[tuple[dict[str, Any], str | None]]
    """each answer (an assistant message, normalised) with its own finish reason"""


def _prompt(attrs: dict[str, Any], events: list[Event]) -> tuple[list[dict[str, Any]] | None, str]:
    """The conversation sent, raw, and the field it came from (newest convention first)."""
    if attrs.get("gen_ai.input.messages") is not None or attrs.get("gen_ai.system_instructions") is not None:
        system = attrs.get("gen_ai.system_instructions")
        said = attrs.get("gen_ai.input.messages")
        return ((_instructions(system) if system is not None else [])
                + (_semconv(said, "gen_ai.input.messages") if said is not None else [])), "gen_ai.input.messages"
    said = [_event_message(e) for e in events if e.name in MESSAGE_EVENTS]
    if said:
        return said, "gen_ai.*.message events"
    indexed = _indexed(attrs, "prompt")
    if indexed:
        return [m for m, _ in indexed], "gen_ai.prompt.N"
    return _legacy_json(attrs, events, "gen_ai.prompt"), "gen_ai.prompt"


def _choices(attrs: dict[str, Any], events: list[Event]) -> tuple[list[tuple[dict[str, Any], str | None]], str]:
    """Each answer, raw, with its finish reason, and the field they came from."""
    if attrs.get("gen_ai.output.messages") is not None:
        out = _json(attrs["gen_ai.output.messages"], "gen_ai.output.messages")
        if not isinstance(out, list):
            raise wrong_type("gen_ai.output.messages", "a list of messages {role, parts}", out)
        return [(_from_parts(m, f"gen_ai.output.messages[{i}]")[0],
                 m["finish_reason"] if isinstance(m.get("finish_reason"), str) else None)
                for i, m in enumerate(out)], "gen_ai.output.messages"
    picked = sorted((_choice(e) for e in events if e.name == CHOICE), key=lambda c: c[0])
    if picked:
        return [(m, finish) for _, m, finish in picked], "gen_ai.choice events"
    indexed = _indexed(attrs, "completion")
    if indexed:
        return indexed, "gen_ai.completion.N"
    legacy = _legacy_json(attrs, events, "gen_ai.completion") or []
    return [({"role": "assistant", "content": m.get("content"), "tool_calls": m.get("tool_calls")}, None)
            for m in legacy], "gen_ai.completion"


def read_content(attrs: dict[str, Any], events: list[Event]) -> Content:
    """The messages of one call, normalised (roles checked, tool calls parsed)."""
    raw_prompt, field = _prompt(attrs, events)
    prompt = messages({}, field, raw_prompt) if raw_prompt is not None else None
    raw_choices, field = _choices(attrs, events)
    choices = []
    for i, (m, finish) in enumerate(raw_choices):
        msg = messages({}, f"{field}[{i}]", [m])[0]
        if msg["role"] != "assistant":
            raise RowError(Reason.WRONG_TYPE, f"field '{field}[{i}].role': {msg['role']!r}, expected assistant")
        choices.append((msg, finish))
    return Content(prompt, choices)


def _has_content(attrs: dict[str, Any], events: list[Event]) -> bool:
    return (any(k in attrs for k in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.prompt",
                                     "gen_ai.completion"))
            or any(_INDEXED.fullmatch(k) for k in attrs)
            or any(e.name in MESSAGE_EVENTS or e.name == CHOICE or e.name in CONTENT_EVENTS for e in events))


def is_inference(attrs: dict[str, Any], events: list[Event]) -> bool:
    """Whether a span (its attributes and events) is one model call with an answer."""
    op = attrs.get("gen_ai.operation.name")
    if op in INFERENCE_OPS:
        return True
    if op in NOT_INFERENCE_OPS:
        return False
    if attrs.get("llm.request.type") in ("chat", "completion"):  # OpenLLMetry, before operation names
        return True
    return bool(attrs.get("gen_ai.request.model")) and _has_content(attrs, events)


# --- signals ------------------------------------------------------------------------------


def _error(status: dict[str, Any], attrs: dict[str, Any]) -> str | None:
    """Why a span (or event) failed — status ERROR and its message, or error.type — or None."""
    etype = _str(attrs.get("error.type"))
    if status.get("code") not in ERROR_CODES and etype is None:
        return None
    return ": ".join(x for x in (etype, _str(status.get("message"))) if x) or "span status ERROR"


def _evaluation(ev: Event, score) -> tuple[dict[str, Any] | None, str | None, bool | None]:
    """(named score, verdict, approval) of one evaluation event; a failed evaluation gives none."""
    f = ev.fields
    if f.get("error.type") is not None:
        return None, None, None
    if ev.name == USER_FEEDBACK:  # older conventions: a user's reaction in -1..1
        value = f.get("gen_ai.evaluation.score")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, None, None
        return (score("user_feedback", value, by="human", scale=(-1.0, 1.0)), None,
                True if value > 0 else False if value < 0 else None)
    name = _str(f.get("gen_ai.evaluation.name")) or "evaluation"
    value, label = f.get("gen_ai.evaluation.score.value"), _str(f.get("gen_ai.evaluation.score.label"))
    s = score(name, value, default_by="automated") if value is not None else None
    if label is not None and (s is None or s["normalized"] is None):
        by_label = score(name, label, default_by="automated")  # no value, or one off 0..1 with no configured scale
        s = by_label if s is None or by_label["normalized"] is not None else s
    low = label.lower() if label else None
    return s, "pass" if low in PASS else "fail" if low in FAIL else None, None


def _signals(evals: list[Event], score) -> dict[str, Any]:
    scores, verdicts, approvals = [], [], []
    for ev in evals:
        s, verdict, approved = _evaluation(ev, score)
        scores += [s] if s is not None else []
        verdicts += [verdict] if verdict is not None else []
        approvals += [approved] if approved is not None else []
    eval_score, human_rating = combine_scores(scores)
    sig: dict[str, Any] = {"scores": scores, "eval_score": eval_score, "human_rating": human_rating,
                           "verdict": "fail" if "fail" in verdicts else "pass" if verdicts else None}
    if approvals:
        sig["approved"], sig["approver"] = all(approvals), "user_feedback"
    return sig


# --- one call -----------------------------------------------------------------------------


class Call(NamedTuple):
    """One GenAI inference: a span, or a details event standing alone."""

    attrs: dict[str, Any]
    """the span's attributes over its details event's"""
    events: list[Event]
    """its message and details events, from the span and from log records naming it"""
    span: Span | None
    time: tuple[str, int | None]
    """(label, nanoseconds) of when it started"""


def build(call: Call, ctx, evals: list[Event], *, task_name: str | None, outer_error: str | None = None
          ) -> list[dict[str, Any]]:
    """The evidence of one call: one record, or one per choice (parts choice-0, choice-1, ...)."""
    a, span = call.attrs, call.span
    content = read_content(a, call.events)
    recorded_at, when = dated(ctx, call.time)
    latency = None
    if span and span.start is not None and span.end is not None and span.end >= span.start:
        latency = round((span.end - span.start) / 1e6, 3)
    finishes = _finish_reasons(a.get("gen_ai.response.finish_reasons"))
    model = _str(a.get("gen_ai.response.model")) or _str(a.get("gen_ai.request.model"))
    pt = _count(a.get("gen_ai.usage.input_tokens", a.get("gen_ai.usage.prompt_tokens")))
    ct = _count(a.get("gen_ai.usage.output_tokens", a.get("gen_ai.usage.completion_tokens")))
    rid = _str(a.get("gen_ai.response.id"))
    common = dict(
        recorded_at=recorded_at, recorded_at_from=when, model=model, task_name=task_name, latency_ms=latency,
        provider=_str(a.get("gen_ai.provider.name")) or _str(a.get("gen_ai.system")),
        error=_error(span.status if span else {}, a) or outer_error,
        task_id=rid or (f"{span.trace}:{span.id}" if span and span.trace and span.id else None),
        signals=_signals(evals, ctx.score))
    if not content.choices:
        ev = cf.call_evidence(SPEC.kind, content.prompt, None, **common)
        # no answer recorded (content capture off, or a failed call): what the span says still holds
        ev["prompt_tokens"], ev["completion_tokens"] = pt, ct
        ev["signals"]["stop_reason"] = finishes[0] if finishes else None
        return [ev]
    out = []
    n = len(content.choices)
    for i, (msg, finish) in enumerate(content.choices):
        stop = finish or (finishes[i] if len(finishes) == n else finishes[0] if finishes else None)
        answer = cf.Answer(msg, stop, None, model, pt, ct, None, rid)
        out.append(cf.call_evidence(SPEC.kind, content.prompt, answer, part=f"choice-{i}" if n > 1 else None,
                                    **common))
    return out


def _finish_reasons(value: Any) -> list[str]:
    if isinstance(value, str):  # one string where the conventions say string[]
        return [value]
    return [f for f in value if isinstance(f, str)] if isinstance(value, list) else []


# --- detection ----------------------------------------------------------------------------


def _otlp_kind(doc: Any) -> str | None:
    """"traces" or "logs" for an OTLP/JSON export request, else None."""
    if not isinstance(doc, dict):
        return None
    for key, scope, kind in (("resourceSpans", "scopeSpans", "traces"), ("resourceLogs", "scopeLogs", "logs")):
        value = doc.get(key)
        if isinstance(value, list) and (not value or (isinstance(value[0], dict)
                                                      and isinstance(value[0].get(scope), list))):
            return kind
    return None


def detect(probe):
    if not probe.mostly(_otlp_kind):
        return None
    kinds = sorted({_otlp_kind(r) for r in probe.records} - {None}, reverse=True)
    paths = {"traces": SPANS, "logs": LOGS}
    genai = any(b'"gen_ai.' in orjson.dumps(r) for r in probe.records)
    return (" and ".join(f"OTLP/JSON {k} ({paths[k]})" for k in kinds)
            + (" with gen_ai.* attributes" if genai else ", no gen_ai.* attribute in its first documents"))


# --- the join -------------------------------------------------------------------------------


def join_key(row, ctx):
    kind = record_kind(row, ctx.record)
    if kind is None and _otlp_kind(row) is not None:  # the reader hands over a document it finds no record in
        what = {"traces": SPANS, "logs": LOGS}[_otlp_kind(row)]
        raise RowError(Reason.MISSING_FIELD, f"an OTLP/JSON {_otlp_kind(row)} export with no record at {what}: "
                                             "an empty export, nothing to read")
    if kind is None:
        raise RowError(Reason.WRONG_TYPE, f"not an OTLP span or log record: expected documents of {SPANS} or {LOGS}")
    trace = hex_id(row.get("traceId"), 16)
    if trace is None:
        return None  # transform() reads it alone, or says why it cannot
    return Keyed(f"trace:{trace}", kind, {"service": _service(ctx.parents)})


def _service(parents) -> str | None:
    for p in parents:
        if isinstance(p, dict) and isinstance(p.get("resource"), dict):
            return _str(attr(p["resource"], "service.name"))
    return None


def transform(row, ctx):
    """A record with no trace id: only a details event, which holds a whole call, stands alone."""
    if record_kind(row, ctx.record) != "log":
        raise RowError(Reason.MISSING_FIELD, "field 'traceId' is missing: a span outside any trace cannot be "
                                             "joined with its events and scores")
    ev = read_log(row)
    if ev.name != DETAILS:
        raise RowError(Reason.MISSING_FIELD, f"field 'traceId' is missing: a {ev.name or 'log'} record outside any "
                                             "trace cannot be joined to the GenAI span it belongs to")
    return build(Call(ev.fields, [], None, _log_time(row)), ctx, [], task_name=_service(ctx.parents))


class Rec(NamedTuple):
    """One member of a trace, read."""

    m: Any
    """its Member"""
    span: Span | None
    log: Event | None


def assemble(group, gctx):
    out: list[Any] = []
    recs: list[Rec] = []
    broken: dict[str, str] = {}  # span id → why the span was refused
    for m in group:
        try:
            recs.append(Rec(m, None, read_log(m.row)) if m.role == "log" else Rec(m, read_span(m.row), None))
        except RowError as e:
            out.append(Refuse(m, e.reason, e.detail))
            if m.role == "span" and hex_id(m.row.get("spanId"), 8):
                broken[hex_id(m.row["spanId"], 8)] = e.detail
    spans: dict[str, Rec] = {}
    kept = []
    for r in recs:
        if r.span is not None and r.span.id is not None and r.span.id in spans:
            first = spans[r.span.id].m
            out.append(Refuse(r.m, Reason.DUPLICATE_ROW, f"span {r.span.id} was read already, from "
                                                         f"{gctx.source_file(first)} record {first.offset}"))
            continue
        if r.span is not None and r.span.id is not None:
            spans[r.span.id] = r
        kept.append(r)
    return out + Trace(kept, spans, broken, gctx).assemble()


class Trace:
    """The records of one trace: which calls they hold, and where every other record goes."""

    def __init__(self, recs: list[Rec], spans: dict[str, Rec], broken: dict[str, str], gctx):
        self.recs, self.spans, self.broken, self.gctx = recs, spans, broken, gctx
        self.calls: list[tuple[Call, Rec]] = []
        self.joined: dict[int, list[Any]] = defaultdict(list)
        self.evals: dict[int, list[Event]] = defaultdict(list)
        self.last = 0
        """the index of the call that ends last: the trace's outcome"""

    def assemble(self) -> list[Any]:
        taken = self._find_calls()
        if not self.calls:
            return [Refuse(r.m, Reason.NO_MODEL_CALL, _no_call(r)) for r in self.recs]
        order = {id(r): i for i, r in enumerate(self.recs)}
        self.last = max(range(len(self.calls)), key=lambda i: (self._end(i), order[id(self.calls[i][1])]))
        primaries = {id(rec) for _, rec in self.calls}
        out = []
        for r in self.recs:
            if r.log is not None and id(r) not in taken:
                out += self._place_log(r)
            elif r.span is not None and id(r) not in primaries:
                self.joined[self.last].append(r.m)
            if r.span is not None:
                self._span_evaluations(r)
        return out + self._emit()

    def _find_calls(self) -> set[int]:
        """Collect the calls: inference spans (with the content events naming them), then details
        events that no inference span carries. Returns the ids of the records taken as content."""
        naming: dict[str, list[Rec]] = defaultdict(list)
        for r in self.recs:
            if r.log is not None and r.log.span is not None and r.log.name in CALL_EVENTS:
                naming[r.log.span].append(r)
        taken: set[int] = set()
        for r in self.recs:
            if r.span is None:
                continue
            own = naming.get(r.span.id or "", [])
            details = [e for e in r.span.events if e.name == DETAILS] + [o.log for o in own if o.log.name == DETAILS]
            attrs = {k: v for d in details for k, v in d.fields.items()} | r.span.attrs
            events = r.span.events + [o.log for o in own]
            if is_inference(attrs, events):
                self.calls.append((Call(attrs, events, r.span, ("record:startTimeUnixNano", r.span.start)), r))
                self.joined[len(self.calls) - 1] += [o.m for o in own]
                taken.update(id(o) for o in own)
        for r in self.recs:
            if r.log is not None and r.log.name == DETAILS and id(r) not in taken:
                self.calls.append((Call(r.log.fields, [], None, _log_time(r.m.row)), r))
                taken.add(id(r))
        return taken

    def _end(self, i: int) -> int:
        call = self.calls[i][0]
        return (call.span.end or call.span.start or 0) if call.span is not None else call.time[1] or 0

    def _place_log(self, r: Rec) -> list[Any]:
        """A log record's place: its call (evaluations, message events), else the last call."""
        target = self.target(r.log)
        if target is None:
            if r.log.span in self.broken:
                return [Refuse(r.m, Reason.WRONG_TYPE, f"the span it names was refused: {self.broken[r.log.span]}")]
            return [Refuse(r.m, Reason.UNMATCHED_JOIN, f"a {r.log.name or 'log'} record naming span {r.log.span}, "
                                                       "which is in no source file: add the file holding that span "
                                                       "to data/_kb/")]
        if r.log.name in (EVALUATION, USER_FEEDBACK):
            self.evals[target].append(r.log)
            self.joined[target].append(r.m)
        else:
            self.joined[target if r.log.name in CALL_EVENTS else self.last].append(r.m)
        return []

    def _span_evaluations(self, r: Rec) -> None:
        """Evaluations recorded as span events, which name the span holding them."""
        for e in r.span.events:
            if e.name in (EVALUATION, USER_FEEDBACK):
                target = self.target(e)
                self.evals[target].append(e)
                self.joined[target].append(r.m)

    def target(self, ev: Event) -> int | None:
        """Which call an event belongs to (see the module docstring); None: its span is in no file."""
        if ev.span is None:
            rid = _str(ev.fields.get("gen_ai.response.id"))
            hits = [i for i, (c, _) in enumerate(self.calls) if rid and c.attrs.get("gen_ai.response.id") == rid]
            return hits[-1] if hits else self.last
        if ev.span not in self.spans:
            return None
        for i, (call, _) in enumerate(self.calls):
            if call.span is not None and call.span.id == ev.span:
                return i
        under = [i for i, (call, _) in enumerate(self.calls)
                 if any(a.id == ev.span for a in self.ancestors(call.span))]
        return max(under, key=self._end) if under else self.last

    def ancestors(self, span: Span | None):
        seen: set[str] = set()
        parent = span.parent if span else None
        while parent and parent in self.spans and parent not in seen:
            seen.add(parent)
            yield self.spans[parent].span
            parent = self.spans[parent].span.parent

    def _outer_error(self, span: Span | None) -> str | None:
        for a in self.ancestors(span):
            err = _error(a.status, a.attrs)
            if err is not None:
                return f"the enclosing span {a.name or a.id!r} ended in error: {err}"
        return None

    def _task_name(self, call: Call, rec: Rec) -> str | None:
        for attrs in [call.attrs, *(a.attrs for a in self.ancestors(call.span))]:
            if _str(attrs.get("gen_ai.agent.name")):
                return attrs["gen_ai.agent.name"]
        return (rec.m.extra or {}).get("service")

    def _emit(self) -> list[Any]:
        out: list[Any] = []
        failed: list[tuple[int, RowError]] = []
        emitted: set[int] = set()
        for i, (call, rec) in enumerate(self.calls):
            members = _unique(m for m in self.joined[i] if m is not rec.m)
            try:
                evs = build(call, self.gctx.row_context(rec.m), self.evals[i], task_name=self._task_name(call, rec),
                            outer_error=self._outer_error(call.span) if i == self.last else None)
            except RowError as e:
                out.append(Refuse(rec.m, e.reason, e.detail))
                failed.append((i, e))
                continue
            out += [Emit(ev, rec.m, members, ev.pop(PART_KEY, None)) for ev in evs]
            emitted.update(id(m) for m in members)
        primaries = {id(rec.m) for _, rec in self.calls}
        for i, e in failed:  # what would have joined a refused call goes with it, unless it joined another
            out += [Refuse(m, e.reason, f"the GenAI span it belongs with was refused: {e.detail}")
                    for m in _unique(self.joined[i]) if id(m) not in emitted and id(m) not in primaries]
        return out


def _unique(members) -> tuple[Any, ...]:
    """Members in order, each once (a Member holds dicts: not hashable)."""
    seen: dict[int, Any] = {}
    for m in members:
        seen.setdefault(id(m), m)
    return tuple(seen.values())


def _no_call(r: Rec) -> str:
    what = f"span {r.span.name or r.span.id!r}" if r.span is not None else f"a {r.log.name or 'log'} record"
    return (f"{what}: its trace has no GenAI inference span (gen_ai.operation.name chat, text_completion or "
            "generate_content) in any source file, so there is no model call to join it to")
