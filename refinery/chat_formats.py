"""The vendors' request and response shapes, read into refinery's messages.

Shared by the importers of chat logs, Batch files and HTTP recordings: an OpenAI
chat.completion or Responses object, an Anthropic Message, a request's messages (with
`instructions` / `system` / `input`), and an HTTP exchange `{request: {body}, response:
{status_code, body}}` unwrapped into its request and response bodies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from refinery import transform as t
from refinery.reasons import Reason
from refinery.transform import RowError


class Exchange(NamedTuple):
    request: dict[str, Any] | None
    """the request body (model, messages, ...)"""
    response: Any
    """the response body (a chat.completion, a Message, an error object, or text)"""
    status: int | None
    """the HTTP status, when the log has one"""


def _body(part: Any) -> Any:
    if isinstance(part, dict) and "body" in part and ("status_code" in part or "method" in part or "url" in part
                                                      or "headers" in part):
        body = part["body"]
        if isinstance(body, str):
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                return body
        return body
    return part


def exchange(rec: dict[str, Any]) -> Exchange:
    """A logged call's request and response bodies, whichever wrapping the log uses."""
    req = rec.get("request", rec.get("input"))
    resp = rec.get("response", rec.get("output"))
    status = None
    if isinstance(resp, dict) and isinstance(resp.get("status_code"), int):
        status = resp["status_code"]
    elif isinstance(rec.get("status_code"), int):
        status = rec["status_code"]
    req_body = _body(req)
    return Exchange(req_body if isinstance(req_body, dict) else None, _body(resp), status)


def error_text(body: Any, status: int | None) -> str | None:
    """Why a call failed, from an HTTP status or an error object; None when it did not."""
    err = body.get("error") if isinstance(body, dict) else None
    if err:
        if isinstance(err, dict):
            kind, msg = err.get("type") or err.get("code"), err.get("message")
            text = ": ".join(str(x) for x in (kind, msg) if x)
        else:
            text = str(err)
        return f"HTTP {status}: {text}" if status else text
    if status is not None and status >= 400:
        return f"HTTP {status}"
    return None


def request_messages(req: dict[str, Any] | None, field: str = "request") -> list[dict[str, Any]] | None:
    """The conversation a request sent: `messages` (+ Anthropic's `system`), or the Responses
    API's `instructions` + `input` (a string or a list of items, possibly JSON text)."""
    if not isinstance(req, dict):
        return None
    msgs: list[dict[str, Any]] = []
    system = req.get("system", req.get("instructions"))
    if isinstance(system, list):
        system = t.content_text(system)
    if isinstance(system, str) and system:
        msgs.append(t.message("system", system))
    if isinstance(req.get("messages"), list):
        msgs += t.messages(req, "messages", req["messages"]) or []
    elif "input" in req:
        inp = req["input"]
        if isinstance(inp, str):
            msgs.append(t.message("user", inp))
        elif isinstance(inp, list):
            items = [i for i in inp if isinstance(i, dict) and i.get("type", "message") == "message"]
            msgs += t.messages({}, f"{field}.input", items) or []
        else:
            return None
    elif isinstance(req.get("prompt"), str):
        msgs.append(t.message("user", req["prompt"]))
    else:
        return msgs or None
    return msgs



class Answer(NamedTuple):
    message: dict[str, Any]
    """the assistant message (content, tool_calls)"""
    stop_reason: str | None
    refusal: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created: Any
    id: str | None


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return None


def openai_answers(body: dict[str, Any], field: str = "response") -> list[Answer]:
    """Every choice of a chat.completion (or the output of a Responses object)."""
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    pt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    ct = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    model, created, rid = body.get("model"), body.get("created", body.get("created_at")), body.get("id")
    model = model if isinstance(model, str) else None
    rid = rid if isinstance(rid, str) else None
    if isinstance(body.get("output"), list):  # the Responses API
        texts, calls, refusal = [], [], None
        for item in body["output"]:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for p in item.get("content") or ():
                    if isinstance(p, dict) and p.get("type") == "output_text" and isinstance(p.get("text"), str):
                        texts.append(p["text"])
                    elif isinstance(p, dict) and p.get("type") == "refusal":
                        refusal = p.get("refusal")
            elif item.get("type") == "function_call":
                calls.append(t.tool_call({"id": item.get("call_id"), "name": item.get("name"),
                                          "arguments": item.get("arguments")}))
        status = body.get("status")
        stop = "stop" if status == "completed" else ("length" if (body.get("incomplete_details") or {}).get(
            "reason") == "max_output_tokens" else status)
        return [Answer(t.message("assistant", "".join(texts) if texts else None, calls), stop, refusal, model, pt, ct,
                       created, rid)]
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise t.missing(f"{field}.choices")
    out = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise t.wrong_type(f"{field}.choices[{i}]", "an object", choice)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        if not message and isinstance(choice.get("text"), str):  # a legacy completion
            message = {"content": choice["text"]}
        msg = t.messages({}, f"{field}.choices[{i}].message", [{
            "role": "assistant", **{k: v for k, v in message.items() if k in ("content", "tool_calls", "name")}}])[0]
        fc = message.get("function_call")
        if isinstance(fc, dict) and not msg["tool_calls"]:  # the legacy single function call
            msg["tool_calls"] = [t.tool_call(fc)]
        refusal = message.get("refusal")
        finish = choice.get("finish_reason")
        out.append(Answer(msg, finish if isinstance(finish, str) else None,
                          refusal if isinstance(refusal, str) and refusal else None, model, pt, ct, created, rid))
    return out


def anthropic_answer(body: dict[str, Any], field: str = "response") -> Answer:
    """An Anthropic Message: text blocks as the content, tool_use blocks as tool calls."""
    content = body.get("content")
    if not isinstance(content, list):
        raise t.wrong_type(f"{field}.content", "a list of content blocks", content)
    msg = t.messages({}, field, [{"role": "assistant", "content": content}])[0]
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    stop = body.get("stop_reason")
    model = body.get("model")
    rid = body.get("id")
    refusal = "refused" if stop == "refusal" else None
    return Answer(msg, stop if isinstance(stop, str) else None, refusal, model if isinstance(model, str) else None,
                  _int(usage.get("input_tokens")), _int(usage.get("output_tokens")), None,
                  rid if isinstance(rid, str) else None)


def is_openai_completion(body: Any) -> bool:
    return isinstance(body, dict) and (body.get("object") in ("chat.completion", "text_completion")
                                       or isinstance(body.get("choices"), list))


def is_openai_response(body: Any) -> bool:
    return isinstance(body, dict) and body.get("object") == "response" and isinstance(body.get("output"), list)


def is_anthropic_message(body: Any) -> bool:
    return isinstance(body, dict) and body.get("type") == "message" and isinstance(body.get("content"), list)


def failure_flags(answer: Answer) -> list[str]:
    flags = ["refusal"] if answer.refusal else []
    if answer.stop_reason in ("content_filter", "refusal", "SAFETY"):
        flags.append("content_filter")
    return flags


def not_a_call(what: str) -> RowError:
    return RowError(Reason.WRONG_TYPE, what)


def call_evidence(kind: str, prompt_msgs: list[dict[str, Any]] | None, answer: Answer | None, *,
                  recorded_at: str, recorded_at_from: str, provider: str | None, model: str | None = None,
                  error: str | None = None, task_id: str | None = None, task_name: str | None = None,
                  latency_ms: float | None = None, part: str | None = None,
                  signals: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evidence of one LLM call: the conversation sent (its answered turn is the prompt),
    the answer (text, tool calls, stop reason, refusal), model, tokens and failure signals."""
    msgs = [*(prompt_msgs or []), *([answer.message] if answer else [])]
    turn = t.answered_turn(msgs)
    flags = failure_flags(answer) if answer else []
    if answer is not None and answer.refusal and error is None:
        error = f"refusal: {answer.refusal}"
    sig = dict(signals or {})
    return t.new_evidence(
        kind, recorded_at=recorded_at, recorded_at_from=recorded_at_from, task_id=task_id or (
            answer.id if answer else None), task_name=task_name,
        prompt=turn.prompt, messages=msgs or None, response=turn.response, tool_calls=turn.tool_calls,
        model=model or (answer.model if answer else None), provider=provider, latency_ms=latency_ms,
        prompt_tokens=answer.prompt_tokens if answer else None,
        completion_tokens=answer.completion_tokens if answer else None, part=part,
        signals=t.new_signals(error=error, tool_call_count=len(turn.tool_calls),
                              stop_reason=answer.stop_reason if answer else None,
                              safety_flags=flags + sig.pop("safety_flags", []), **sig),
    )
