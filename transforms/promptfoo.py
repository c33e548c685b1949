"""promptfoo eval results: one evidence record per result (one prompt × provider × test case).

Shapes read (record paths `results.results[]`, `results[]`, `data.results.results[]`; the ones
a document matches are used):

    promptfoo eval -o results.json / promptfoo export   (results v3, promptfoo >= 0.5x)
        {"evalId", "results": {"version": 3, "timestamp", "prompts", "results": [<result>], "stats"},
         "config", "shareableUrl", "metadata": {"evaluationCreatedAt", "exportedAt", "promptfooVersion", ...}}
    the older results file (~/.promptfoo/output, v2 imports)
        {"version", "createdAt", "results": {"version": 2, "timestamp", "results": [...], "table", "stats"}, "config"}
    a shared eval  {"data": <the older results file>}
    an eval summary written on its own (the node package, early CLIs)
        {"version", "timestamp", "results": [<result>], "stats", "table"}
    promptfoo eval -o results.jsonl: one <result> per line (no time of its own: configure one)

    <result> {"id", "testIdx", "promptIdx", "prompt": {"raw", "label"} | "<text>", "vars",
              "provider": {"id", "label"} | "<id>", "testCase": {"description", "vars", "assert", "threshold"},
              "response": {"output": text | object, "tokenUsage": {"prompt", "completion", "total", "cached"},
                           "finishReason", "cached", "isRefusal", "guardrails", "error", "metadata"},
              "latencyMs", "success", "score", "namedScores", "error", "failureReason": 0 | 1 | 2,
              "gradingResult": {"pass", "score", "reason", "namedScores", "comment",
                                "componentResults": [{"pass", "score", "reason", "assertion":
                                                      {"type", "metric", "value", "threshold", "weight"}}]}}

Mapping. The prompt is `prompt.raw`, the rendered prompt (a chat prompt — JSON text of
`[{role, content}]` — becomes the conversation, and its answered turn the prompt; a red-team
strategy's `response.metadata.redteamFinalPrompt`, the prompt really sent, wins). The answer is
`response.output`: text, or an object — a list of tool calls (OpenAI `tool_calls`, Anthropic
`tool_use` blocks), a message `{content, tool_calls}`, a legacy `function_call`, or structured
output, which is kept as JSON text. Model and provider come from `provider.id`
("openai:chat:gpt-4o" → provider openai, model gpt-4o); tokens from `response.tokenUsage`;
latency from `latencyMs` (milliseconds; a cached response's latency is the cache read, so only
`response.latencyMs` is kept for it); `finishReason` is the stop reason; `isRefusal`, a
`content_filter` finish and a flagged guardrail are safety flags. task_id is the test's
description, else a hash of its vars; task_name the test's description.

Quality. `error` is set on assertion failures too (e.g. "Latency 5794ms is greater than
threshold 3000ms"), so only `failureReason` 2 makes it a call error (older files without
failureReason: an error on the response, or an error with no grading). Every component
assertion becomes a named score (its `metric`, else its type; repeats get "#2", ...), automated,
higher is better (1 = passed). Assertions of type `latency`, `cost` and `trace-span-duration`
measure the call's performance, not the answer: they are kept as scores with `used: false`
(a `[signals.<name>]` table for them, with use = true, counts them) and never fail the answer — so a correct answer
that was merely slow still passes. The verdict comes from the quality assertions (every
other type: equals, contains, regex, is-json, javascript, python, llm-rubric, model-graded-*,
similar, factuality, g-eval, red-team graders, ...): pass when all pass — or, with the test's
`threshold`, when their score reaches it — else fail. eval_score is `gradingResult.score`
when every assertion is a quality one, else the weighted mean (assertion `weight`) of the
quality assertions' scores. A manual rating in promptfoo's web UI (a component of type
`human`) is a human score: approved = its pass, human_rating = its score. `namedScores` not
already given by an assertion's metric (derived metrics, scores returned by a script) are kept
as scores, not counted. A test without assertions has no quality signal.

Refused: a result without a prompt or an answer (and no error), and outputs or prompts
replaced by promptfoo's PROMPTFOO_STRIP_* options ("[output stripped]"). Time: the eval's
`metadata.evaluationCreatedAt`, `results.timestamp`, `createdAt`, then `metadata.exportedAt`
(results carry no time of their own).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from refinery import chat_formats as cf
from refinery import transform as t
from refinery.canonical import sig_hash
from refinery.containers import PROBE_RECORDS
from refinery.reasons import Reason
from refinery.transform import RowError, TransformSpec, dated, missing, wrong_type

SPEC = TransformSpec(name="promptfoo", patterns=(), format="json", kind="eval",
                     description="promptfoo eval results (promptfoo eval -o results.json|jsonl, promptfoo export)",
                     record_paths=("results.results[]", "results[]", "data.results.results[]"))

#: Assertion types that measure the call (time, money), not the answer.
PERFORMANCE = frozenset({"latency", "cost", "trace-span-duration"})
HUMAN = "human"
STRIPPED = ("[prompt stripped]", "[output stripped]")
#: The provider-kind part of an id such as "openai:chat:gpt-4o" (not part of the model name).
_PROVIDER_KINDS = {"chat", "completion", "completions", "messages", "responses", "embedding", "embeddings",
                   "assistant", "realtime"}
_CUSTOM_PROVIDERS = ("file://", "http://", "https://", "python:", "exec:", "golang:", "ruby:", "js:")


# --- recognising the format -------------------------------------------------------------------


def _is_result(rec: Any) -> bool:
    """A promptfoo result: a prompt, a pass/fail and a score, with a response or a grading."""
    if not isinstance(rec, dict) or type(rec.get("success")) is not bool:
        return False
    prompt = rec.get("prompt")
    has_prompt = isinstance(prompt, str) or (isinstance(prompt, dict) and ("raw" in prompt or "label" in prompt))
    graded = "gradingResult" in rec or "failureReason" in rec or "response" in rec
    tested = "vars" in rec or "testCase" in rec or "provider" in rec
    return has_prompt and graded and tested and "score" in rec


def _summary(doc: Any) -> tuple[dict | None, bool]:
    """The eval summary `{results: [...], ...}` inside a document, whichever wrapping it has, and
    whether the wrapping alone says promptfoo (an eval id, or the config beside a dated summary)."""
    if not isinstance(doc, dict):
        return None, False
    wrapper = doc["data"] if isinstance(doc.get("data"), dict) else doc  # a shared eval
    res = wrapper.get("results")
    if isinstance(res, dict) and isinstance(res.get("results"), list):
        return res, "evalId" in wrapper or ("config" in wrapper and "timestamp" in res and "stats" in res)
    if isinstance(res, list) and ("stats" in wrapper or "table" in wrapper or "timestamp" in wrapper):
        return wrapper, False
    return None, False


def detect(probe):
    summary, wrapped = _summary(probe.document)
    if summary is not None:
        dicts = [r for r in summary["results"][:PROBE_RECORDS] if isinstance(r, dict)]
        hits = sum(map(_is_result, dicts))
        # An export's wrapping is enough with a single result in it (the rest may be broken); a bare
        # summary must look like promptfoo's results through and through.
        if hits and (wrapped or hits * 5 >= len(dicts) * 3):
            return f"a promptfoo eval (results v{summary.get('version', '?')}) holding prompt/provider/grading results"
        if not summary["results"] and wrapped:
            return "a promptfoo eval export with no results"
        return None
    if probe.mostly(_is_result):
        return "records are promptfoo eval results (prompt, provider, response, gradingResult)"
    return None


# --- small readers ------------------------------------------------------------------------------


def _obj(value: Any, field: str) -> dict:
    """An optional object field: {} when absent or null."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong_type(field, "an object", value)
    return value


def _num(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) and value == value else None


def _tokens(usage: dict, key: str) -> int | None:
    value = usage.get(key)
    return int(value) if type(value) is int or (type(value) is float and value == int(value)) else None


# --- the prompt ---------------------------------------------------------------------------------


def _prompt_messages(row: dict, response: dict) -> list[dict[str, Any]]:
    meta = response.get("metadata") if isinstance(response.get("metadata"), dict) else {}
    final = meta.get("redteamFinalPrompt")
    prompt = row.get("prompt")
    if isinstance(final, str) and final:
        raw, field = final, "response.metadata.redteamFinalPrompt"
    elif isinstance(prompt, str):
        raw, field = prompt, "prompt"
    elif isinstance(prompt, dict):
        raw, field = prompt.get("raw"), "prompt.raw"
        if raw is None:  # an old result without the rendered prompt: its label, if it is not a template
            label = prompt.get("label", prompt.get("display"))
            if isinstance(label, str) and "{{" not in label:
                raw, field = label, "prompt.label"
    elif prompt is None:
        raise missing("prompt.raw")
    else:
        raise wrong_type("prompt", "an object {raw, label} or text", prompt)
    if raw is None or raw == "":
        raise missing("prompt.raw")
    if not isinstance(raw, str):
        raise wrong_type(field, "text", raw)
    if raw in STRIPPED:
        raise RowError(Reason.MISSING_FIELD, f"field '{field}' was stripped at export (PROMPTFOO_STRIP_PROMPT_TEXT): "
                                             "export again without it")
    return _chat(raw, field) or [{"role": "user", "content": raw, "name": None, "tool_calls": None,
                                  "tool_call_id": None}]


def _chat(raw: str, field: str) -> list[dict[str, Any]] | None:
    """A chat prompt: promptfoo sends JSON text of `[{role, content}, ...]` as the conversation."""
    if not raw.lstrip().startswith("["):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
        return None
    try:
        return t.messages({}, field, value)
    except RowError:  # not roles refinery knows: keep the prompt as the text it is
        return None


# --- the answer ---------------------------------------------------------------------------------


def _looks_like_call(item: Any) -> bool:
    return isinstance(item, dict) and (
        item.get("type") in ("function", "tool_use", "function_call") or isinstance(item.get("function"), dict)
        or ("name" in item and ("arguments" in item or "input" in item)))


def _answer_message(output: Any) -> dict[str, Any]:
    """The assistant message of `response.output`: text, tool calls, or structured output as JSON."""
    field = "response.output"
    if isinstance(output, str):
        msg = {"role": "assistant", "content": output}
    elif isinstance(output, list) and output and all(_looks_like_call(c) or (
            isinstance(c, dict) and c.get("type") == "text") for c in output):
        blocks = [c for c in output if isinstance(c, dict) and c.get("type") == "text"]
        calls = [_call(c) for c in output if _looks_like_call(c)]
        msg = {"role": "assistant", "content": "".join(str(b.get("text", "")) for b in blocks) or None,
               "tool_calls": calls}
    elif isinstance(output, dict) and ("tool_calls" in output or "function_call" in output
                                       or ("role" in output and "content" in output)):
        calls = list(output.get("tool_calls") or [])
        if isinstance(output.get("function_call"), dict):
            calls.append(output["function_call"])
        content = output.get("content")
        msg = {"role": "assistant", "content": content if isinstance(content, (str, list)) or content is None
               else orjson.dumps(content).decode(), "tool_calls": [_call(c) for c in calls] or None}
    elif isinstance(output, dict) and _looks_like_call(output):
        msg = {"role": "assistant", "content": None, "tool_calls": [_call(output)]}
    else:  # structured output (a JSON object, a number, ...): the answer is its JSON text
        msg = {"role": "assistant", "content": orjson.dumps(output).decode()}
    return t.messages({}, field, [msg])[0]


def _call(raw: Any) -> Any:
    """The Responses API names a call's id `call_id`; everything else `tool_call` reads."""
    if isinstance(raw, dict) and raw.get("type") == "function_call" and "call_id" in raw and "id" not in raw:
        return {**raw, "id": raw["call_id"]}
    return raw


# --- model and provider -------------------------------------------------------------------------


def _provider(row: dict) -> tuple[str | None, str | None]:
    """(provider, model) from `provider.id`: "openai:gpt-5" → ("openai", "gpt-5"),
    "anthropic:messages:claude-sonnet-4" → ("anthropic", "claude-sonnet-4"); a custom provider
    (file://, http://, python:, exec:) names no model, so its label (if any) stands for it."""
    p = row.get("provider")
    if isinstance(p, str):
        pid, label = p, None
    elif isinstance(p, dict):
        pid, label = p.get("id"), p.get("label")
    elif p is None:
        return None, None
    else:
        raise wrong_type("provider", "an object {id, label} or an id", p)
    label = label if isinstance(label, str) and label else None
    if not isinstance(pid, str) or not pid:
        return None, label
    if pid.startswith(_CUSTOM_PROVIDERS):
        return pid.split(":", 1)[0], label
    head, sep, rest = pid.partition(":")
    if not sep:
        return head, None
    kind, sep2, after = rest.partition(":")
    if sep2 and kind in _PROVIDER_KINDS and after:
        rest = after
    return head, rest or None


# --- quality ------------------------------------------------------------------------------------


class Check(NamedTuple):
    name: str
    value: Any
    passed: bool | None
    weight: float
    role: str
    """quality | performance | human | unknown (a verdict we cannot split into the two)"""


def _role(assertion: dict) -> str:
    kind = assertion.get("type")
    kind = kind if isinstance(kind, str) else ""
    if kind == HUMAN:
        return "human"
    return "performance" if kind.removeprefix("not-") in PERFORMANCE else "quality"


def _check(comp: Any, field: str) -> Check:
    if not isinstance(comp, dict):
        raise wrong_type(field, "an object", comp)
    assertion = _obj(comp.get("assertion"), f"{field}.assertion")
    name = assertion.get("metric") if isinstance(assertion.get("metric"), str) and assertion.get("metric") else (
        assertion.get("type") if isinstance(assertion.get("type"), str) else "assertion")
    weight = _num(assertion.get("weight"))
    passed = comp.get("pass") if type(comp.get("pass")) is bool else None
    value = comp.get("score") if type(comp.get("score")) in (int, float, bool) else passed
    return Check(name, value, passed, 1.0 if weight is None else weight, _role(assertion))


def _checks(row: dict, grading: dict | None, failed_call: bool) -> tuple[list[Check], bool]:
    """Every assertion's outcome, and whether they are the whole grading (no other assertion hides
    in the overall score)."""
    if grading:
        comps = grading.get("componentResults")
        if comps is not None and not isinstance(comps, list):
            raise wrong_type("gradingResult.componentResults", "a list", comps)
        if comps:
            return [_check(c, f"gradingResult.componentResults[{i}]") for i, c in enumerate(comps)], True
        if isinstance(grading.get("assertion"), dict):  # one assertion, graded on its own
            return [_check(grading, "gradingResult")], True
        if grading.get("reason") == "No assertions":
            return [], True
    if failed_call:  # the assertions never ran: promptfoo's pass=false says nothing about an answer
        return [], True
    # No per-assertion outcome (stripped at export, or an old file): the overall one, read by what
    # the test case asserted.
    kinds = [_role(a) for a in (_obj(row.get("testCase"), "testCase").get("assert") or []) if isinstance(a, dict)]
    passed = (grading or {}).get("pass", row.get("success"))
    score = (grading or {}).get("score", row.get("score"))
    if grading is None and not kinds:
        return [], True
    passed = passed if type(passed) is bool else None
    role = "quality" if all(k == "quality" for k in kinds) or passed is True else "unknown"
    return [Check("score", score if type(score) in (int, float) else passed, passed, 1.0, role)], False


def _quality(row: dict, grading: dict | None, failed_call: bool, ctx) -> dict[str, Any]:
    """Signals from the assertions: named scores, verdict, eval_score, and a human rating."""
    checks, complete = _checks(row, grading, failed_call)
    rules = ctx.score_rules or {}
    scores, counted, seen = [], [], {}
    for c in checks:
        s = ctx.score(c.name, c.value, by="human" if c.role == "human" else "automated", higher_is_better=True)
        if c.role in ("performance", "unknown") and c.name not in rules and c.name.lower() not in rules:
            s["used"] = False  # kept for what it says about the call, not counted against the answer
        seen[c.name] = seen.get(c.name, 0) + 1
        if seen[c.name] > 1:
            s["name"] = f"{c.name}#{seen[c.name]}"
        scores.append(s)
        if c.role != "human" and s["used"]:  # a performance check counts only where [signals] says use = true
            counted.append((c, s))
    metric_names = {c.name for c in checks}
    for name, value in _named_scores(row, grading):
        if name not in metric_names:
            s = ctx.score(name, value, by="automated", higher_is_better=True)
            s["used"] = False  # derived metrics are the operator's own arithmetic: shown, not counted
            scores.append(s)
            metric_names.add(name)
    eval_score = _eval_score(counted, grading, complete and len(counted) == len(checks))
    verdict = None
    if counted:
        threshold = _num(_obj(row.get("testCase"), "testCase").get("threshold"))
        if threshold is not None and eval_score is not None:
            verdict = "pass" if eval_score >= threshold else "fail"
        elif all(c.passed is not None for c, _ in counted):
            verdict = "pass" if all(c.passed for c, _ in counted) else "fail"
    human = [c for c in checks if c.role == "human"]
    _, rating = t.combine_scores(scores)
    return {"eval_score": eval_score, "verdict": verdict, "scores": scores, "human_rating": rating,
            "approved": human[-1].passed if human else None,
            "approver": "promptfoo manual rating" if human else None}


def _eval_score(counted: list, grading: dict | None, all_counted: bool) -> float | None:
    """promptfoo's own score when every assertion counts, else the weighted mean of those that do."""
    overall = _num((grading or {}).get("score"))
    if all_counted and counted and overall is not None and 0.0 <= overall <= 1.0:
        return round(overall, 6)
    weighed = [(s["normalized"], c.weight) for c, s in counted if s["normalized"] is not None and c.weight > 0]
    total = sum(w for _, w in weighed)
    return round(sum(v * w for v, w in weighed) / total, 6) if total else None


def _named_scores(row: dict, grading: dict | None) -> list[tuple[str, Any]]:
    out: dict[str, Any] = {}
    for where in (row.get("namedScores"), (grading or {}).get("namedScores")):
        if isinstance(where, dict):
            for k, v in where.items():
                out.setdefault(k, v)
    return list(out.items())


# --- errors and flags ---------------------------------------------------------------------------


def _error(row: dict, response: dict, grading: dict | None) -> str | None:
    """A call error — not an assertion failure, which promptfoo also writes into `error`."""
    reason = row.get("failureReason")
    message = row.get("error") or response.get("error")
    message = message if isinstance(message, str) and message else None
    if reason is None:  # files from before failureReason: an error on the call, or one nothing graded
        if response.get("error") or (message and not grading):
            return message or "promptfoo reported an error"
        return None
    if type(reason) is not int or reason not in (0, 1, 2):
        raise wrong_type("failureReason", "0, 1 or 2", reason)
    if reason == 2:
        return message or "promptfoo reported an error (failureReason 2)"
    return None


def _flags(response: dict, stop: str | None) -> list[str]:
    flags = []
    if response.get("isRefusal") is True:
        flags.append("refusal")
    if stop == "content_filter":
        flags.append("content_filter")
    guard = response.get("guardrails")
    if isinstance(guard, dict) and any(guard.get(k) is True for k in ("flagged", "flaggedOutput", "flaggedInput")):
        flags.append("guardrails")
    return flags


# --- the record ---------------------------------------------------------------------------------


def _document_times(doc: Any) -> list[tuple[str, Any]]:
    """The eval's times, best first: when it ran, then when it was exported."""
    out = []
    for prefix, wrapper in (("", doc), ("data.", doc.get("data") if isinstance(doc, dict) else None)):
        if not isinstance(wrapper, dict):
            continue
        meta = wrapper.get("metadata") if isinstance(wrapper.get("metadata"), dict) else {}
        nested = isinstance(wrapper.get("results"), dict)
        summary = wrapper["results"] if nested else wrapper
        out += [(f"document:{prefix}metadata.evaluationCreatedAt", meta.get("evaluationCreatedAt")),
                (f"document:{prefix}{'results.' if nested else ''}timestamp", summary.get("timestamp")),
                (f"document:{prefix}createdAt", wrapper.get("createdAt")),
                (f"document:{prefix}metadata.exportedAt", meta.get("exportedAt"))]
    return out


def _task(row: dict) -> tuple[str | None, str | None]:
    test = _obj(row.get("testCase"), "testCase")
    desc = test.get("description") if isinstance(test.get("description"), str) else None
    desc = desc or (row.get("description") if isinstance(row.get("description"), str) else None) or None
    variables = row.get("vars") if isinstance(row.get("vars"), dict) else test.get("vars")
    if desc:
        return desc, desc
    if isinstance(variables, dict) and variables:
        return f"vars:{sig_hash(variables)[:16]}", None
    return None, None


def transform(row, ctx):
    response = _obj(row.get("response"), "response")
    grading = row.get("gradingResult")
    if grading is not None and not isinstance(grading, dict):
        raise wrong_type("gradingResult", "an object", grading)
    if type(row.get("success")) is not bool:
        raise missing("success") if row.get("success") is None else wrong_type("success", "true or false",
                                                                                row["success"])
    prompt = _prompt_messages(row, response)
    error = _error(row, response, grading)
    output = response.get("output")
    if isinstance(output, str) and output in STRIPPED:
        raise RowError(Reason.MISSING_FIELD, "field 'response.output' was stripped at export "
                                             "(PROMPTFOO_STRIP_RESPONSE_OUTPUT): export again without it")
    if output is None and error is None:
        raise missing("response.output")
    stop = response.get("finishReason") if isinstance(response.get("finishReason"), str) else None
    usage = response.get("tokenUsage") if isinstance(response.get("tokenUsage"), dict) else (
        row.get("tokenUsage") if isinstance(row.get("tokenUsage"), dict) else {})
    answer = None if output is None else cf.Answer(
        _answer_message(output), stop, None, None, _tokens(usage, "prompt"), _tokens(usage, "completion"), None,
        None)
    provider, model = _provider(row)
    # A cached answer's latencyMs times the cache read; the provider's own latency (if kept) is the call's.
    latency = _num(response.get("latencyMs")) if response.get("cached") is True else (
        _num(row.get("latencyMs")) if row.get("latencyMs") is not None else _num(response.get("latencyMs")))
    task_id, task_name = _task(row)
    recorded_at, when = dated(ctx, *_document_times(ctx.document))
    signals = _quality(row, grading, error is not None, ctx)
    signals["safety_flags"] = _flags(response, stop)
    ev = cf.call_evidence(SPEC.kind, prompt, answer, recorded_at=recorded_at, recorded_at_from=when,
                          provider=provider, model=model, error=error, task_id=task_id, task_name=task_name,
                          latency_ms=latency, signals=signals)
    if answer is None and stop is not None:
        ev["signals"]["stop_reason"] = stop
    return ev
