"""inspect_ai eval logs: one evidence record per sample and epoch.

Two containers hold the same content:

    .json   {"version", "status", "eval": {task, model, created, run_id, ...}, "error",
             "plan", "results", "stats", "samples": [<sample>, ...]}
    .eval   a zip: header.json (the same, without samples) and samples/<id>_epoch_<n>.json

    sample  {"id", "epoch", "input": str | [messages], "target": str | [str],
             "messages": [{"role": system|user|assistant|tool, "content": str | [parts],
                           "tool_calls": [{"id", "function", "arguments", "parse_error"}],
                           "tool_call_id", "function", "error"}],
             "output": {"model", "choices": [{"message", "stop_reason"}],
                        "usage": {"input_tokens", "output_tokens"}, "time", "error"},
             "scores": {<scorer>: {"value": "C"|"I"|"P"|"N"|number|bool|{...}, "answer", "explanation"}},
             "error": {"message", "traceback"}, "total_time", "working_time", "started_at",
             "events" (or "transcript": {"events", "content"}), "attachments", "model_usage"}

Recognised by content: a JSON document with `version`, `status` and an `eval` that names a
task and a model, or an archive whose header.json has such an `eval` (or, for a log still
being written, `_journal/start.json` beside `samples/` members: its samples then come without
model and task). A log without samples (written with `--no-log-samples`) is refused.

Mapping. Message bodies stored once and referenced as "attachment://<hash>"
(`attachments`) or, in logs of 2024, "tc://<hash>" (`transcript.content`) are resolved
first; a reference to a body that is not there refuses the sample. The prompt is the
conversation up to its last user message and the response the answer after it
(`answered_turn`), with the answer's tool calls in inspect's shape (a `parse_error` makes the
call malformed) and tool messages named by their `function`; a sample without messages uses
`input` and `output.choices[0].message`. Model and provider come from the eval's
"provider/model" (else `output.model`), the task name from `eval.task`, task_id from the
sample id. Stop reason: the output choice's (`max_tokens`, `model_length` are truncations;
`content_filter` and a refusal part are safety flags). Tokens: `output.usage` (the answer's
call). Latency: `total_time` seconds (else `output.time`) in ms. Every scorer becomes a named
automated score (a dict value one score per key, `scorer/key`); C/I/P/N grades normalise
through named_score; verdict pass when every scorer says correct (normalised 1.0), fail when
any says incorrect (0.0). Errors: the sample's `error`, `output.error`, and an eval whose
status is "error". Time: the sample's `started_at`, else its first event's timestamp, else
the eval's `created` (all converted to UTC).

Limits: `model_usage` (all calls of the sample, the grader's included) and `working_time`
are not mapped; a sample stopped by a message/token/time `limit` keeps the stop reason of its
last output; reasoning and server-side tool-use content parts are left out of the text; the
`events` are read only for the time, not replayed.
"""

from __future__ import annotations

from typing import Any

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, answered_turn, combine_scores, dated, get, integer, messages, missing, new_evidence,
    new_signals, number, text, wrong_type,
)

SPEC = TransformSpec(name="inspect_ai", patterns=(), format="json", kind="eval_sample",
                     description="inspect_ai eval logs (.json and .eval): one evidence per sample and epoch",
                     record_paths=("samples[]", "samples/*.json"))

#: How inspect refers to a message body stored once per sample (the second is the 2024 name).
REF_PREFIXES = ("attachment://", "tc://")
_SAFETY_STOPS = {"content_filter"}


# --- detection ------------------------------------------------------------------------------


def _is_eval_spec(spec: Any) -> bool:
    return (isinstance(spec, dict) and isinstance(spec.get("task"), str) and isinstance(spec.get("model"), str)
            and ("created" in spec or "run_id" in spec))


def detect(probe):
    if probe.container == "zip":
        if isinstance(probe.header, dict) and _is_eval_spec(probe.header.get("eval")):
            return "archive whose header.json is an inspect eval spec (eval.task, eval.model)"
        if "_journal/start.json" in probe.members and any(m.startswith("samples/") for m in probe.members):
            return "archive with inspect's _journal/start.json and samples/ members (a log still being written)"
        return None
    doc = probe.document
    if isinstance(doc, dict) and _is_eval_spec(doc.get("eval")) and "version" in doc and "status" in doc:
        return "document with an inspect eval spec (eval.task, eval.model) and a status"
    return None


# --- reading a sample -----------------------------------------------------------------------


def _attachment_pool(row: dict) -> dict[str, str]:
    pool: dict[str, str] = {}
    for bodies in (get(row, "transcript.content"), row.get("attachments")):
        if isinstance(bodies, dict):
            pool.update((k, v) for k, v in bodies.items() if isinstance(v, str))
    return pool


def _resolve(value: Any, pool: dict[str, str], field: str) -> Any:
    """`value` with every attachment reference replaced by the body it names."""
    if isinstance(value, str):
        for prefix in REF_PREFIXES:
            if value.startswith(prefix):
                body = pool.get(value[len(prefix):])
                if body is None:
                    raise RowError(Reason.MISSING_FIELD,
                                   f"field '{field}': {value[:60]!r} names a body that is not in the sample's "
                                   "attachments (or transcript.content); read the log with inspect and write "
                                   "it again, or restore the missing attachments")
                return body
        return value
    if isinstance(value, list):
        return [_resolve(v, pool, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _resolve(v, pool, f"{field}.{k}") for k, v in value.items()}
    return value


def _plain(m: Any) -> Any:
    """An inspect message in the shape `messages()` reads: a failed tool's error as its content
    when it returned none, server-side tool-use parts left out (they are not the client's calls)."""
    if not isinstance(m, dict):
        return m
    out = dict(m)
    content = m.get("content")
    if isinstance(content, list):
        out["content"] = [p for p in content if not (isinstance(p, dict) and p.get("type") == "tool_use")]
    err = m.get("error")
    if m.get("role") == "tool" and not content and isinstance(err, dict) and isinstance(err.get("message"), str):
        out["content"] = f"Error ({err.get('type') or 'tool'}): {err['message']}"
    return out


def _conversation(row: dict, pool: dict[str, str]) -> list[dict[str, Any]]:
    raw = row.get("messages")
    field = "messages"
    if raw is None or raw == []:  # older or partial samples: the input, then the output's message
        field, inp = "input", row.get("input")
        if inp is None or inp == "" or inp == []:
            raise missing("messages")
        raw = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp
        if not isinstance(raw, list):
            raise wrong_type("input", "a string or a list of chat messages", inp)
        answer = get(row, "output.choices.0.message")
        raw = [*raw, *([answer] if isinstance(answer, dict) else [])]
    if not isinstance(raw, list):
        raise wrong_type(field, "a list of chat messages", raw)
    raw = _resolve([_plain(m) for m in raw], pool, field)
    msgs = messages(row, field, raw) or []
    _mark_parse_errors(raw, msgs)
    return msgs


def _mark_parse_errors(raw: list[Any], msgs: list[dict[str, Any]]) -> None:
    """A tool call inspect could not parse keeps `parse_error`: the call is malformed."""
    if len(raw) != len(msgs):
        return
    for r, m in zip(raw, msgs):
        calls = r.get("tool_calls") if isinstance(r, dict) else None
        if not m["tool_calls"] or not isinstance(calls, list):
            continue
        for rc, c in zip(calls, m["tool_calls"]):
            if isinstance(rc, dict) and rc.get("parse_error") and c["problem"] is None:
                c["problem"] = "arguments_not_json"


def _expected(row: dict) -> str | None:
    target = row.get("target")
    if isinstance(target, list) and all(isinstance(t, str) for t in target):
        target = "\n".join(t for t in target if t)
    if target is None or target == "":
        return None
    if not isinstance(target, str):
        raise wrong_type("target", "a string or a list of strings", target)
    return target


def _scores(row: dict, ctx) -> list[dict[str, Any]]:
    raw = row.get("scores")
    if raw is None and isinstance(row.get("score"), dict):  # logs before named scorers
        raw = {"score": row["score"]}
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise wrong_type("scores", "an object {scorer: {value, answer, explanation}}", raw)
    out = []
    for name, score in raw.items():
        value = score.get("value") if isinstance(score, dict) else score
        if isinstance(value, dict):  # one scorer, several metrics
            out += [ctx.score(f"{name}/{key}", v, by="automated") for key, v in value.items()]
        else:
            out.append(ctx.score(name, value, by="automated"))
    return out


def _verdict(scores: list[dict[str, Any]]) -> str | None:
    counted = [s for s in scores if s["used"]]
    if any(s["normalized"] == 0.0 for s in counted):
        return "fail"
    if counted and all(s["normalized"] == 1.0 for s in counted):
        return "pass"
    return None


def _error_message(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("message")
    return value if isinstance(value, str) and value else None


def _errors(row: dict, log: dict) -> str | None:
    found = [_error_message(row.get("error")), _error_message(get(row, "output.error"))]
    if log.get("status") == "error":
        found.append("eval status error" + (f": {m}" if (m := _error_message(log.get("error"))) else ""))
    found = [e for e in found if e]
    return "; ".join(found) if found else None


def _safety_flags(stop: str | None, answer: Any) -> list[str]:
    """The provider's content filter, and a refusal the model marked in its answer's text part."""
    flags = ["content_filter"] if stop in _SAFETY_STOPS else []
    parts = answer.get("content") if isinstance(answer, dict) else None
    if isinstance(parts, list) and any(isinstance(p, dict) and p.get("refusal") is True for p in parts):
        flags.append("refusal")
    return flags


def _model(log: dict, row: dict) -> tuple[str | None, str | None]:
    """(model, provider) from the eval's "provider/model", else the output's model."""
    name = text(log, "eval.model")
    if name and "/" in name:
        provider, model = name.split("/", 1)
        return model, provider
    out_model = get(row, "output.model")
    return name or (out_model if isinstance(out_model, str) and out_model else None), None


def _first_event_time(row: dict) -> tuple[str, Any]:
    for field in ("events", "transcript.events"):
        events = get(row, field)
        if isinstance(events, list) and events and isinstance(events[0], dict):
            return f"record:{field}[0].timestamp", events[0].get("timestamp")
    return "record:events[0].timestamp", None


def _sample_id(row: dict) -> str:
    sid = row.get("id")
    if sid is None or sid == "":
        raise missing("id")
    if isinstance(sid, bool) or not isinstance(sid, (int, str)):
        raise wrong_type("id", "a sample id (a string or an integer)", sid)
    return str(sid)


def transform(row, ctx):
    log = ctx.document if isinstance(ctx.document, dict) else {}
    if isinstance(row.get("eval"), dict) and "epoch" not in row:  # the log itself: no samples[] in it
        raise RowError(Reason.MISSING_FIELD, "field 'samples' is missing or empty: this inspect log holds no "
                                             "samples (written with --no-log-samples?); nothing to import")
    task_id = _sample_id(row)
    pool = _attachment_pool(row)
    msgs = _conversation(row, pool)
    turn = answered_turn(msgs)
    choice = get(row, "output.choices.0")
    stop = choice.get("stop_reason") if isinstance(choice, dict) else None
    stop = stop if isinstance(stop, str) and stop else None
    answer = choice.get("message") if isinstance(choice, dict) else None
    scores = _scores(row, ctx)
    eval_score, human_rating = combine_scores(scores)
    seconds = number(row, "total_time")
    if seconds is None:
        seconds = number(row, "output.time")
    event_label, event_time = _first_event_time(row)
    recorded_at, when = dated(ctx, ("record:started_at", row.get("started_at")), (event_label, event_time),
                              ("parent:eval.created", get(log, "eval.created")))
    model, provider = _model(log, row)
    return new_evidence(
        SPEC.kind, recorded_at=recorded_at, recorded_at_from=when, task_id=task_id,
        task_name=text(log, "eval.task"), prompt=turn.prompt, messages=msgs or None, response=turn.response,
        tool_calls=turn.tool_calls, model=model, provider=provider,
        latency_ms=None if seconds is None else round(seconds * 1000.0, 3),
        prompt_tokens=integer(row, "output.usage.input_tokens"),
        completion_tokens=integer(row, "output.usage.output_tokens"),
        signals=new_signals(
            eval_score=eval_score, human_rating=human_rating, expected=_expected(row), verdict=_verdict(scores),
            error=_errors(row, log), tool_call_count=len(turn.tool_calls), stop_reason=stop,
            safety_flags=_safety_flags(stop, answer), scores=scores),
    )
