"""OpenAI chat-completions logs: a logged request and its response, one call per record.

    {"request": {"model", "messages", "tools"},
     "response": {"id", "created" (epoch s), "model",
                  "choices": [{"message": {"content", "tool_calls", "refusal"}, "finish_reason"}],
                  "usage": {"prompt_tokens", "completion_tokens"}}}

Also an HTTP recording of the same call — `{"request": {"method", "url", "body": {...}},
"response": {"status_code", "body": {...}}}` — `input`/`output` in place of request/response,
a Responses-API object as the response, and a bare chat.completion (no prompt then). Recognised
by content: records holding a request's messages and a chat.completion (or Responses) object.

The prompt is the conversation up to its last user message; the response is the answer (its
text and tool calls, with string arguments parsed). A response with several choices becomes one
evidence record per choice (parts choice-0, choice-1, ...). No feedback field: an HTTP error,
`finish_reason` length / content_filter and `refusal` are the failure signals.
"""

from refinery import chat_formats as cf
from refinery.transform import TransformSpec, dated, get, missing, number, text

SPEC = TransformSpec(name="openai_chat", patterns=("openai_chat*.jsonl",), format="json",
                     kind="chat_completion", description="OpenAI chat-completions request/response log")


def _is_call(rec):
    if not isinstance(rec, dict) or "custom_id" in rec:  # a Batch line: openai_batch's
        return False
    ex = cf.exchange(rec)
    answered = cf.is_openai_completion(ex.response) or cf.is_openai_response(ex.response)
    asked = ex.request is not None and ("messages" in ex.request or "input" in ex.request)
    # a failed call: OpenAI's error body is {"error": {...}}; Anthropic's says "type": "error"
    failed = (isinstance(ex.response, dict) and isinstance(ex.response.get("error"), dict)
              and ex.response.get("type") != "error")
    return (answered and (asked or ex.request is None)) or (asked and failed and "model" in ex.request)


def detect(probe):
    recs = probe.records
    if probe.mostly(_is_call):
        bare = all(cf.exchange(r).request is None for r in recs if _is_call(r))
        return ("records are chat.completion objects" if bare
                else "records hold a request's messages and its chat.completion response")
    return None


def transform(row, ctx):
    ex = cf.exchange(row)
    if ex.request is None and ex.response is None and "choices" in row:
        ex = cf.Exchange(None, row, None)
    prompt = cf.request_messages(ex.request)
    if ex.request is not None and prompt is None:
        raise missing("request.messages")
    error = cf.error_text(ex.response, ex.status)
    answers = []
    if error is None:
        if not isinstance(ex.response, dict):
            raise missing("response")
        answers = cf.openai_answers(ex.response)
    created = answers[0].created if answers else None
    # a chat.completion always carries `created`: one without it is damaged (unless the source is dated)
    recorded_at, when = dated(ctx, ("record:response.created", created), ("record:timestamp", row.get("timestamp")),
                              ("record:created_at", row.get("created_at")),
                              required=bool(answers) and cf.is_openai_completion(ex.response))
    model = (answers[0].model if answers else None) or text(row, "request.model") or \
        (ex.request.get("model") if ex.request and isinstance(ex.request.get("model"), str) else None)
    latency = number(row, "latency_ms")
    if latency is None and get(row, "duration") is not None:
        latency = number(row, "duration") * 1000.0  # seconds, as most loggers write it
    common = dict(recorded_at=recorded_at, recorded_at_from=when, provider="openai", model=model, error=error,
                  latency_ms=latency)
    if not answers:
        return cf.call_evidence(SPEC.kind, prompt, None, **common)
    if len(answers) == 1:
        return cf.call_evidence(SPEC.kind, prompt, answers[0], **common)
    return [cf.call_evidence(SPEC.kind, prompt, a, part=f"choice-{i}", **common) for i, a in enumerate(answers)]
