"""Anthropic Messages API logs: a request's conversation and the Message that answered it.

    request   {"model", "system", "messages": [{"role", "content": str | [blocks]}], "tools", "max_tokens"}
    response  {"id", "type": "message", "role": "assistant", "model",
               "content": [{"type": "text", "text"} | {"type": "tool_use", "id", "name", "input"}],
               "stop_reason": "end_turn" | "tool_use" | "max_tokens" | "refusal" | ..., "usage": {...}}

Read from `{request, response}` records, HTTP recordings (`{request: {method, url, body},
response: {status_code, body}}`, one call each, often a JSON array of a session's calls), and
bare Message objects (no prompt then). Tool results come back as user messages of
`tool_result` blocks (`tool_use_id`, `content`, `is_error`): they become tool messages, so
the prompt is the conversation up to the user's last own words and the answer is everything
after it — the tool calls, their results and the final text. An HTTP error (429, 529, an
`{"type": "error"}` body) is an error signal; `max_tokens` is a truncation, `refusal` a safety
flag. A response body that is a server-sent-event stream, not a Message, is refused.
Messages responses carry no time: a record's own `timestamp`/`created_at`, else the fallback.
"""

from refinery import chat_formats as cf
from refinery.reasons import Reason
from refinery.transform import RowError, TransformSpec, dated, missing, number

SPEC = TransformSpec(name="anthropic_messages", patterns=(), format="json", kind="chat_completion",
                     description="Anthropic Messages request/response logs and HTTP recordings")


def _is_call(rec):
    if not isinstance(rec, dict):
        return False
    if cf.is_anthropic_message(rec):
        return True
    ex = cf.exchange(rec)
    resp = ex.response
    anthropic_error = isinstance(resp, dict) and resp.get("type") == "error"
    asked = ex.request is not None and isinstance(ex.request.get("messages"), list) and (
        "max_tokens" in ex.request or "anthropic" in str(rec.get("request", {}).get("url", "")))
    return cf.is_anthropic_message(resp) or (asked and (anthropic_error or (ex.status or 0) >= 400))


def detect(probe):
    if probe.mostly(_is_call):
        return "records hold Anthropic Messages (type: message, content blocks) with their requests"
    return None


def transform(row, ctx):
    if cf.is_anthropic_message(row):
        ex = cf.Exchange(None, row, None)
    else:
        ex = cf.exchange(row)
    if isinstance(ex.response, str):
        raise RowError(Reason.WRONG_TYPE, "response body is text (a server-sent event stream?), not a Message: "
                                          "log the final message instead")
    prompt = cf.request_messages(ex.request)
    if ex.request is not None and prompt is None:
        raise missing("request.messages")
    error = cf.error_text(ex.response, ex.status)
    answer = None
    if error is None:
        if not isinstance(ex.response, dict):
            raise missing("response")
        answer = cf.anthropic_answer(ex.response)
    recorded_at, when = dated(ctx, ("record:timestamp", row.get("timestamp")),
                              ("record:created_at", row.get("created_at")))
    model = (answer.model if answer else None) or (
        ex.request.get("model") if ex.request and isinstance(ex.request.get("model"), str) else None)
    return cf.call_evidence(SPEC.kind, prompt, answer, recorded_at=recorded_at, recorded_at_from=when,
                            provider="anthropic", model=model, error=error,
                            latency_ms=number(row, "latency_ms"))
