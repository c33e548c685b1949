"""Langfuse exports: traces, their observations and their scores, joined by trace id.

    single-trace export (the UI's "download trace", `*.trace.json`)
        {"trace": {id, name, timestamp, sessionId, userId, input, output, metadata, latency (s),
                   scores: [<score>]},
         "observations": [<observation>, ...]}
    trace        {id, timestamp, name, sessionId, userId, input, output, metadata, tags, release,
                  [latency (s), scores[], observations[]]}          (no traceId)
    observation  {id, traceId, type: GENERATION|SPAN|EVENT|AGENT|TOOL|..., parentObservationId, name,
                  startTime, endTime, completionStartTime, model, modelParameters, input, output,
                  level: DEBUG|DEFAULT|WARNING|ERROR, statusMessage, usageDetails | usage |
                  inputUsage/outputUsage, latency (ms in the UI export)}
    score        {id, traceId, observationId, name, value, stringValue,
                  dataType: NUMERIC|BOOLEAN|CATEGORICAL, source: ANNOTATION|API|EVAL, comment,
                  authorUserId}

Files: the single-trace export (record paths `trace` and `observations[]`; a JSONL of them
works too), JSON/JSONL files of traces, observations and scores — mixed in one file or split
over several (traces.jsonl, observations.jsonl, scores.jsonl) —, a JSON array of them, and the
public API's list envelope `{data: [...], meta}` (record path `data[]`). A trace record that
embeds its observations and scores (the API's trace detail) is read too: in a JSON array or
envelope the embedded observations are part of the trace record; in JSONL the reader hands each
one over as a record of its own, with the trace as its document. Records are told apart by their
keys: an observation has traceId and a type, a score traceId, name, value and dataType or
source, a trace id and timestamp and no traceId.

Mapping. Every record is joined by trace id. Each GENERATION observation (one LLM call) is one
evidence record: its input (chat messages, an OpenAI/Anthropic request, Responses-API input
items with function_call / function_call_output, OTel GenAI message events, a string — JSON
text of any of these is parsed) is the conversation, whose answered turn is the prompt; its
output (an assistant message, a chat.completion, a Responses object, an Anthropic Message, a
choice, a string; other JSON is kept as JSON text) is the answer. Model: `model`, else the
answer's, else modelParameters.model; the Responses `instructions` become the system message.
Provider: the OTel attributes in metadata (gen_ai.system, llm.system, ...), else the answer's
shape. Tokens: usageDetails.input/output, else usage (when its unit is tokens), else
inputUsage/outputUsage, else the answer's usage. Latency: endTime - startTime in ms, else the
observation's `latency` field, which the UI export writes in milliseconds (trace.latency is in
seconds). Errors: level ERROR with its statusMessage, or an error object in the output. Time:
the generation's startTime, else its trace's timestamp (`parent:timestamp`). task_name = the
trace's name, task_id = the trace id.

Scores: a score on a generation (observationId) goes to that generation's evidence; a
trace-level score (no observationId, or one embedded in trace.scores[]) and a score on another
observation go to the trace's last generation (by endTime/startTime, then reading order), into
which the trace record and the non-generation observations are joined too (an ERROR level among
them is that evidence's error). NUMERIC is read on 0..1 (a [signals.<name>] scale reads other
scales; out-of-scale values are kept, not normalised), BOOLEAN as a bool, CATEGORICAL as a grade
(C/I, pass/fail, ...); source ANNOTATION, API (and the older REVIEW) are by a human, EVAL is
automated. Human BOOLEAN scores and human thumbs/approve grades are the approval (approver: the
authorUserId, else "langfuse:<source>"); a pass/fail label is the verdict. A trace with no
generation (or none that can be read) is evidence itself (kind "trace": trace input → trace
output).

Refused: a generation with no input (missing_field); a record that is none of the three, or a
score with no name (missing_field); a score with no traceId (a session or dataset-run score); a score naming an
observation in no file, and a score or observation whose trace is in no file and that has no
generation to join (unmatched_join). A generation whose trace is missing stands on its own.

Limits: a score's comment, the trace's sessionId/userId/tags, completionStartTime (time to first
token), costs and the other modelParameters have no place in the evidence and are not kept; only
the first choice of a multi-choice output is read; the UI batch export's score columns (one
column per score name) are not read; an observation embedded in a trace record that cannot be
read is left out while the trace's other evidence stands.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from refinery import chat_formats as cf
from refinery import transform as t
from refinery.containers import PROBE_RECORDS
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, Refuse, RowError, TransformSpec, dated

SPEC = TransformSpec(name="langfuse", patterns=(), format="json", kind="generation",
                     description="Langfuse exports: traces, observations and scores joined by trace id",
                     record_paths=("trace", "observations[]", "data[]"))

OBSERVATION_TYPES = frozenset({"GENERATION", "SPAN", "EVENT", "AGENT", "TOOL", "CHAIN", "RETRIEVER", "EVALUATOR",
                               "EMBEDDING", "GUARDRAIL"})
SCORE_TYPES = frozenset({"NUMERIC", "BOOLEAN", "CATEGORICAL"})
SCORE_SOURCES = frozenset({"ANNOTATION", "API", "EVAL", "REVIEW"})
#: Keys only a Langfuse trace carries (camelCase ids, its UI and API fields): what tells a trace
#: from any other record with an id and a timestamp.
TRACE_KEYS = frozenset({"sessionId", "userId", "projectId", "htmlPath", "bookmarked", "public", "release",
                        "observations", "scores", "totalCost", "environment", "tags"})
HUMAN_SOURCES = frozenset({"ANNOTATION", "API", "REVIEW"})
VERDICTS = {"pass": "pass", "passed": "pass", "fail": "fail", "failed": "fail"}
RESPONSES_ITEMS = frozenset({"function_call", "function_call_output", "reasoning", "message"})
#: What a generation with neither start nor end time sorts as: before every timed one.
NO_TIME = datetime.min.replace(tzinfo=UTC)
PROVIDER_KEYS = ("gen_ai.system", "gen_ai.provider.name", "llm.system", "llm.provider", "ls_provider")


# --- telling the records apart ---------------------------------------------------------------


def _is_observation(r: Any) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("traceId"), str) and isinstance(r.get("type"), str)
            and r["type"] in OBSERVATION_TYPES and "startTime" in r)


def _is_score(r: Any) -> bool:
    return (isinstance(r, dict) and "traceId" in r and isinstance(r.get("name"), str)
            and ("value" in r or "stringValue" in r)
            and (r.get("dataType") in SCORE_TYPES or r.get("source") in SCORE_SOURCES))


def _is_trace(r: Any) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("id"), str) and "timestamp" in r and "traceId" not in r
            and len(TRACE_KEYS & r.keys()) >= 2 and bool({"name", "input", "output"} & r.keys()))


def _is_record(r: Any) -> bool:
    return _is_observation(r) or _is_score(r) or _is_trace(r)


def _is_single_trace(doc: Any) -> bool:
    """{trace, observations}: a trace beside a list of observations (or none yet)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("observations"), list):
        return False
    trace, obs = doc.get("trace"), doc["observations"]
    return (isinstance(trace, dict) and isinstance(trace.get("id"), str) and "timestamp" in trace
            and "traceId" not in trace and (not obs or _is_observation(obs[0]) or _is_trace(trace)))


def detect(probe):
    doc = probe.document
    if _is_single_trace(doc):
        return "a Langfuse single-trace export {trace, observations}"
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and isinstance(doc.get("meta"), dict):
        rows = [r for r in doc["data"][:PROBE_RECORDS] if isinstance(r, dict)]
        if rows and sum(map(_is_record, rows)) * 5 >= len(rows) * 3:
            return "a Langfuse API list {data: [traces, observations or scores], meta}"
        return None
    if probe.mostly(_is_single_trace):
        return "lines are Langfuse single-trace exports {trace, observations}"
    if probe.mostly(_is_record):
        kinds = sorted({k for r in probe.records for k, ok in (("traces", _is_trace(r)), (
            "observations", _is_observation(r)), ("scores", _is_score(r))) if ok})
        return "records are Langfuse " + " and ".join(kinds) + " (traceId, observation types, score dataType)"
    return None


# --- keys ------------------------------------------------------------------------------------


def join_key(row, ctx):
    where = ctx.record or ""
    host = ctx.document if isinstance(ctx.document, dict) else {}
    if where.endswith("$.trace"):
        return Keyed(f"trace:{_trace_id(row, 'trace.id')}", "trace")
    if ".observations[" in where:  # inside a single-trace export, or inside a trace record (API detail)
        wrapper = isinstance(host.get("trace"), dict)
        trace = host["trace"] if wrapper else host
        tid = row.get("traceId") or trace.get("id")
        if not isinstance(tid, str) or not tid:
            raise t.missing("traceId")
        _observation_type(row)
        # A trace that holds its observations is no record of its own here: it travels with them.
        extra = None if wrapper else {k: v for k, v in trace.items() if k != "observations"}
        return Keyed(f"trace:{tid}", "observation", extra)
    if "traceId" in row and "type" in row:
        _observation_type(row)
        return Keyed(f"trace:{_trace_id(row, 'traceId')}", "observation")
    if "traceId" in row and "name" in row and ("value" in row or "stringValue" in row):
        if row["traceId"] is None:
            raise RowError(Reason.MISSING_FIELD, f"score {row.get('name')!r} has no traceId: a session- or "
                                                 "dataset-run-level score belongs to no trace, so to no answer")
        t.text(row, "name", required=True)
        return Keyed(f"trace:{_trace_id(row, 'traceId')}", "score")
    if "traceId" not in row and isinstance(row.get("id"), str) and "timestamp" in row:
        return Keyed(f"trace:{_trace_id(row, 'id')}", "trace")
    raise RowError(Reason.MISSING_FIELD, "not a Langfuse record: a trace needs id and timestamp, an observation "
                                         "traceId and type, a score traceId, name and value")


def _trace_id(row: dict, field: str) -> str:
    value = t.get(row, field.removeprefix("trace."))
    if value is None or value == "":
        raise t.missing(field)
    if not isinstance(value, str):
        raise t.wrong_type(field, "a string", value)
    return value


def _observation_type(row: dict) -> str:
    typ = row.get("type")
    if not isinstance(typ, str) or not typ:
        raise t.missing("type")
    return typ.upper()


def transform(row, ctx):  # every Langfuse record is joined; this runs only for records join_key declines
    raise RowError(Reason.MISSING_FIELD, "not a Langfuse record: a trace needs id and timestamp, an observation "
                                         "traceId and type, a score traceId, name and value")


# --- one trace's records -----------------------------------------------------------------------


class Obs(NamedTuple):
    row: dict[str, Any]
    member: t.Member | None
    """its own record; None for an observation embedded in a trace record"""
    host: t.Member
    """the record that carries it: its own, or the trace record it is embedded in"""
    index: int
    """reading order"""


class Score(NamedTuple):
    row: dict[str, Any]
    member: t.Member | None
    """its own record; None for a score embedded in a trace record"""


class Trace(NamedTuple):
    key: str
    trace: dict[str, Any] | None
    """the trace record (or the trace an observation travelled with); None when in no file"""
    trace_members: list[t.Member]
    observations: list[Obs]
    scores: list[Score]
    duplicates: dict[int, list[t.Member]]
    """id(record kept) → records of the same observation or score read again (another file)"""


def _gather(group: list[t.Member]) -> Trace:
    traces = [m for m in group if m.role == "trace"]
    trace = traces[0].row if traces else next((m.extra for m in group if isinstance(m.extra, dict)), None)
    tid = next((m.row["traceId"] for m in group if isinstance(m.row.get("traceId"), str)), None)
    tr = Trace(tid or (trace or {}).get("id"), trace, traces, [], [], {})
    seen: dict[str, Obs | Score] = {}
    for m in group:
        if m.role == "observation":
            _keep(tr, seen, "observation", Obs(m.row, m, m, len(tr.observations)))
        elif m.role == "score":
            _keep(tr, seen, "score", Score(m.row, m))
    for tm in traces:  # what a trace record embeds, unless the same records were read on their own
        for row in tm.row.get("observations") or ():
            if isinstance(row, dict):
                _keep(tr, seen, "observation", Obs(row, None, tm, len(tr.observations)))
    for row in (trace or {}).get("scores") or ():  # score ids (the API's trace list) carry nothing
        if isinstance(row, dict):
            _keep(tr, seen, "score", Score(row, None))
    return tr


def _keep(tr: Trace, seen: dict[str, Obs | Score], kind: str, item: Obs | Score) -> None:
    """Add an observation or score once: the same id read again (another file, or embedded in
    the trace record too) is joined into the first one's evidence, not read twice."""
    ident = item.row.get("id")
    first = seen.get(f"{kind}:{ident}") if isinstance(ident, str) else None
    if first is None:
        if isinstance(ident, str):
            seen[f"{kind}:{ident}"] = item
        (tr.observations if kind == "observation" else tr.scores).append(item)
    elif item.member is not None and first.member is not None:
        tr.duplicates.setdefault(id(first.member), []).append(item.member)


# --- assembling ----------------------------------------------------------------------------------


class Built(NamedTuple):
    obs: Obs
    pieces: dict[str, Any]
    """what the evidence is made of, before its scores are known"""
    when: datetime | None
    """its end (else start) time, to find the trace's last generation"""


def assemble(group, ctx):
    tr = _gather(group)
    gens = [o for o in tr.observations if _obs_type(o.row) == "GENERATION"]
    built: list[Built] = []
    out: list[Emit | Refuse] = []
    refused: dict[Any, tuple[Reason, str]] = {}
    for o in gens:
        try:
            built.append(Built(o, _call(o, tr, ctx), _end(o.row)))
        except RowError as e:
            refused[o.row.get("id")] = (e.reason, e.detail)
            out += _refuse(tr, o.member, e.reason, e.detail)
    last = max(built, key=lambda b: (b.when or NO_TIME, b.obs.index), default=None)
    obs_ids = {o.row.get("id") for o in tr.observations}
    gen_of = {b.obs.row.get("id"): b for b in built}
    attached: dict[int, list[Score]] = {id(b): [] for b in built}
    to_host: list[Score] = []
    for s in tr.scores:
        target = s.row.get("observationId")
        if target in gen_of:
            attached[id(gen_of[target])].append(s)
        elif target in refused:
            reason, detail = refused[target]
            out += _refuse(tr, s.member, reason, f"its generation {target} was refused: {detail}")
        elif target is None or target in obs_ids:
            to_host.append(s)
        else:
            out += _refuse(tr, s.member, Reason.UNMATCHED_JOIN, f"score {s.row.get('name')!r} is on observation "
                                                                f"{target!r}, which is in no source file")
    others = [o for o in tr.observations if _obs_type(o.row) != "GENERATION"]
    host_joins = [*tr.trace_members, *(o.member for o in others if o.member is not None)]
    for b in built:
        is_last = b is last
        scores = attached[id(b)] + (to_host if is_last else [])
        joined = [s.member for s in scores if s.member is not None]
        if is_last:
            joined += host_joins
        joined += [d for m in [b.obs.member, *joined] if m is not None for d in tr.duplicates.get(id(m), ())]
        ev = _evidence(b.pieces, scores, others if is_last else [], ctx)
        obs_id = b.obs.row.get("id")  # embedded observations may lack an id: their place names them then
        part = None if b.obs.member is not None else (
            f"observation {obs_id}" if isinstance(obs_id, str) and obs_id else f"observation #{b.obs.index}")
        out.append(Emit(ev, b.obs.host, tuple(m for m in joined if m is not b.obs.host), part))
    if last is None:
        out += _without_generation(tr, others, to_host, gens, refused, ctx)
    return out


def _refuse(tr: Trace, member: t.Member | None, reason: Reason, detail: str) -> list[Refuse]:
    """A record refused, with its copies read from other files (an embedded one has no record)."""
    if member is None:
        return []
    return [Refuse(m, reason, detail) for m in (member, *tr.duplicates.get(id(member), ()))]


def _without_generation(tr: Trace, others: list[Obs], scores: list[Score], gens: list[Obs],
                        refused: dict[Any, tuple[Reason, str]], ctx) -> list[Emit | Refuse]:
    """A trace none of whose generations became evidence: the trace itself is the evidence
    (its input → its output), or, when it cannot be, its records are refused with why."""
    pending = [*tr.trace_members, *(o.member for o in others if o.member is not None),
               *(s.member for s in scores if s.member is not None)]
    pending += [d for m in list(pending) for d in tr.duplicates.get(id(m), ())]
    if not pending:
        return []
    if tr.trace is None:
        why = (f"its trace's generations were refused ({'; '.join(d for _, d in refused.values())})" if gens else
               f"trace {tr.key!r} is in no source file and has no generation to join it to: add the traces export "
               "(or the single-trace export) to data/_kb/")
        reason = next(iter(refused.values()))[0] if gens else Reason.UNMATCHED_JOIN
        return [Refuse(m, reason, why) for m in pending]
    primary = tr.trace_members[0] if tr.trace_members else pending[0]
    try:
        ev = _trace_evidence(tr, primary, scores, others, ctx)
    except RowError as e:
        return [Refuse(m, e.reason, e.detail if m is primary else f"its trace was refused: {e.detail}")
                for m in pending]
    return [Emit(ev, primary, tuple(m for m in pending if m is not primary))]


# --- one LLM call ------------------------------------------------------------------------------------


def _call(o: Obs, tr: Trace, ctx) -> dict[str, Any]:
    row = o.row
    oid = row.get("id")
    where = f"observation {oid}" if isinstance(oid, str) else "observation"
    msgs = conversation(row.get("input"), "input")
    if not msgs:
        raise RowError(Reason.MISSING_FIELD, f"field 'input' of GENERATION {where} is missing or empty: no prompt "
                                             "to learn from")
    output = _parsed(row.get("output"))
    error = cf.error_text(output, None) if isinstance(output, dict) else None
    answer = None if error is not None and not _has_answer(output) else reply(output, "output")
    msgs = _with_instructions(msgs, row, output)
    rctx = ctx.row_context(o.host)
    trace = tr.trace or {}
    recorded_at, when = dated(rctx, ("record:startTime", row.get("startTime")),
                              ("parent:timestamp", trace.get("timestamp")))
    pt, ct = _tokens(row)
    model = _text(row.get("model")) or (answer.model if answer else None) or _text(
        (row.get("modelParameters") or {}).get("model") if isinstance(row.get("modelParameters"), dict) else None)
    if answer is not None:
        answer = answer._replace(prompt_tokens=pt if pt is not None else answer.prompt_tokens,
                                 completion_tokens=ct if ct is not None else answer.completion_tokens)
    return {"msgs": msgs, "answer": answer, "recorded_at": recorded_at, "when": when, "model": model,
            "provider": _provider(row, output), "latency": _latency_ms(row), "error": _level_error(row) or error,
            "tokens": (pt, ct), "trace_id": tr.key, "task_name": _text(trace.get("name"))}


def _evidence(p: dict[str, Any], scores: list[Score], others: list[Obs], ctx) -> dict[str, Any]:
    sig = _signals(scores, ctx)
    error = p["error"] or next((e for e in map(_level_error, (o.row for o in others)) if e), None)
    ev = cf.call_evidence(SPEC.kind, p["msgs"], p["answer"], recorded_at=p["recorded_at"],
                          recorded_at_from=p["when"], provider=p["provider"], model=p["model"], error=error,
                          task_id=p["trace_id"], task_name=p["task_name"], latency_ms=p["latency"], signals=sig)
    if p["answer"] is None:
        ev["prompt_tokens"], ev["completion_tokens"] = p["tokens"]
    return ev


def _trace_evidence(tr: Trace, primary: t.Member, scores: list[Score], others: list[Obs], ctx) -> dict[str, Any]:
    trace = tr.trace
    msgs = conversation(trace.get("input"), "trace.input") or []
    output = _parsed(trace.get("output"))
    if not msgs and output is None:
        raise RowError(Reason.MISSING_FIELD, f"trace {tr.key!r} has no usable generation and no input or "
                                             "output: nothing to learn from")
    answer = reply(output, "trace.output")
    own = any(m is primary for m in tr.trace_members)
    recorded_at, when = dated(ctx.row_context(primary), ("record:timestamp" if own else "parent:timestamp",
                                                         trace.get("timestamp")))
    latency = t.number(trace, "latency")
    error = next((e for e in map(_level_error, (o.row for o in others)) if e), None)
    return cf.call_evidence("trace", msgs, answer, recorded_at=recorded_at, recorded_at_from=when, provider=None,
                            error=error, task_id=tr.key, task_name=_text(trace.get("name")),
                            latency_ms=None if latency is None else round(latency * 1000.0, 3),  # seconds
                            signals=_signals(scores, ctx))


# --- reading inputs and outputs --------------------------------------------------------------------


def _parsed(value: Any) -> Any:
    """JSON text (Langfuse stores a trace's input/output so, and many SDKs an observation's) parsed;
    anything else as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "[", '"'):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _render(value: Any) -> str:
    """Structured input or output as text: a lone string field's string, else JSON text."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), str):
        return next(iter(value.values()))
    return orjson.dumps(value).decode()


def _msg(role: str, content: str | None, calls: list[dict[str, Any]] | None = None,
         call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    return t.message(role, content, calls, call_id, name)


def conversation(value: Any, field: str) -> list[dict[str, Any]] | None:
    """The messages an input holds: a chat list, a request ({messages}, {instructions, input}),
    Responses input items, a string (the user's), or other JSON (as the user's text)."""
    value = _parsed(value)
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str):
        return [_msg("user", value)]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]  # LangChain's chat-model callback logs a batch of one conversation
    if isinstance(value, list):
        if all(isinstance(i, dict) and ("role" in i or i.get("type") in RESPONSES_ITEMS) for i in value):
            return items(value, field)
        return [_msg("user", _render(value))]
    if isinstance(value, dict):
        if isinstance(value.get("input"), list):  # a Responses request: instructions + input items
            system = value.get("instructions")
            head = [_msg("system", system)] if isinstance(system, str) and system else []
            return head + items(value["input"], f"{field}.input")
        if any(k in value for k in ("messages", "system", "instructions", "prompt")) and (
                msgs := cf.request_messages(value, field)):
            return msgs
        if "role" in value:
            return t.messages({}, field, [value])
        return [_msg("user", _render(value))]
    return [_msg("user", _render(value))]


def items(value: list[Any], field: str) -> list[dict[str, Any]]:
    """Chat messages and Responses-API input items: a function_call is the assistant's tool call,
    a function_call_output the tool's answer (cf.request_messages keeps only message items)."""
    if all(isinstance(i, dict) and "role" in i and i.get("type", "message") == "message" for i in value):
        return t.messages({}, field, value)
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise t.wrong_type(f"{field}[{i}]", "a message or a Responses input item", item)
        kind = item.get("type")
        if kind == "function_call":
            call = t.tool_call({"id": item.get("call_id") or item.get("id"), "name": item.get("name"),
                                "arguments": item.get("arguments")})
            if call["id"] and call["name"]:
                names[call["id"]] = call["name"]
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant" and prev["tool_calls"] and prev["content"] is None:
                prev["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append(_msg("assistant", None, [call]))
        elif kind == "function_call_output":
            call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
            result = item.get("output")
            try:
                content = t.content_text(result)
            except TypeError:
                content = orjson.dumps(result).decode()
            out.append(_msg("tool", content, call_id=call_id, name=names.get(call_id or "")))
        elif "role" in item:
            one = {k: v for k, v in item.items() if k != "type"}
            out += _one_message(one, f"{field}[{i}]")
        # reasoning and other non-message items carry no turn of the conversation
    return out


def _one_message(item: dict[str, Any], field: str) -> list[dict[str, Any]]:
    try:
        return t.messages({}, field, [item])
    except RowError as e:  # name the item, not "[0]" of a one-item list
        raise RowError(e.reason, e.detail.replace(f"{field}[0]", field)) from None


def _has_answer(output: Any) -> bool:
    return isinstance(output, dict) and bool(output.get("choices") or output.get("output") or output.get("content"))


def reply(value: Any, field: str) -> cf.Answer | None:
    """The answer an output holds, whichever shape the SDK logged."""
    value = _parsed(value)
    if value is None:
        return None
    if isinstance(value, str):
        return _answer(_msg("assistant", value))
    if isinstance(value, dict):
        if cf.is_openai_completion(value) or cf.is_openai_response(value):
            return cf.openai_answers(value, field)[0]
        if cf.is_anthropic_message(value):
            return cf.anthropic_answer(value, field)
        if isinstance(value.get("message"), dict):  # a choice, or an OTel gen_ai.choice event
            stop = value.get("finish_reason", value.get("stop_reason"))
            return _answer(_assistant(value["message"], f"{field}.message"), stop if isinstance(stop, str) else None)
        if "role" in value or "content" in value or "tool_calls" in value:
            return _answer(_assistant(value, field))
        return _answer(_msg("assistant", _render(value)))
    if isinstance(value, list) and value and all(isinstance(i, dict) and "role" in i for i in value):
        said = [m for m in items(value, field) if m["role"] == "assistant"]
        if said:
            return _answer(said[-1])
    return _answer(_msg("assistant", _render(value)))


def _assistant(message: dict[str, Any], field: str) -> dict[str, Any]:
    keep = {k: v for k, v in message.items() if k in ("content", "tool_calls", "name", "function_call")}
    msg = t.messages({}, field, [{"role": "assistant", **keep}])[0]
    if isinstance(keep.get("function_call"), dict) and not msg["tool_calls"]:  # the legacy single call
        msg["tool_calls"] = [t.tool_call(keep["function_call"])]
    return msg


def _answer(message: dict[str, Any], stop: str | None = None) -> cf.Answer:
    return cf.Answer(message, stop, None, None, None, None, None, None)


def _with_instructions(msgs: list[dict[str, Any]], row: dict[str, Any], output: Any) -> list[dict[str, Any]]:
    """The Responses API keeps the system prompt in `instructions`, outside the input items."""
    if any(m["role"] == "system" for m in msgs):
        return msgs
    params = row.get("modelParameters") if isinstance(row.get("modelParameters"), dict) else {}
    for source in (output, params):
        if isinstance(source, dict) and isinstance(source.get("instructions"), str) and source["instructions"]:
            return [_msg("system", source["instructions"]), *msgs]
    return msgs


# --- call facts --------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _obs_type(row: dict[str, Any]) -> str:
    typ = row.get("type")
    return typ.upper() if isinstance(typ, str) else ""


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(t.parse_timestamp(value))
    except (RowError, ValueError):
        return None


def _end(row: dict[str, Any]) -> datetime | None:
    return _time(row.get("endTime")) or _time(row.get("startTime"))


def _latency_ms(row: dict[str, Any]) -> float | None:
    start, end = _time(row.get("startTime")), _time(row.get("endTime"))
    if start is not None and end is not None and end >= start:
        return round((end - start).total_seconds() * 1000.0, 3)
    latency = row.get("latency")
    if isinstance(latency, (int, float)) and not isinstance(latency, bool) and latency >= 0:
        return float(latency)  # the UI export writes an observation's latency in milliseconds
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        return None
    return int(value)


def _tokens(row: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens: usageDetails, else usage (in tokens), else the flat counts."""
    details = row.get("usageDetails")
    if isinstance(details, dict) and details:
        return (_count(details.get("input", details.get("prompt_tokens", details.get("input_tokens")))),
                _count(details.get("output", details.get("completion_tokens", details.get("output_tokens")))))
    usage = row.get("usage")
    if isinstance(usage, dict) and usage.get("unit") in (None, "TOKENS"):
        pt = _count(usage.get("input", usage.get("promptTokens")))
        ct = _count(usage.get("output", usage.get("completionTokens")))
        if pt or ct:
            return pt, ct
    # The flat counts are 0 where nothing was recorded; only a non-zero pair says something.
    pt, ct = _count(row.get("inputUsage", row.get("promptTokens"))), _count(
        row.get("outputUsage", row.get("completionTokens")))
    return (pt, ct) if pt or ct else (None, None)


def _provider(row: dict[str, Any], output: Any) -> str | None:
    meta = _parsed(row.get("metadata"))
    if isinstance(meta, dict):
        attrs = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
        for source in (attrs, meta):
            for key in PROVIDER_KEYS:
                if _text(source.get(key)):
                    return source[key].lower()
    if cf.is_openai_completion(output) or cf.is_openai_response(output):
        return "openai"
    if cf.is_anthropic_message(output):
        return "anthropic"
    return None


def _level_error(row: dict[str, Any]) -> str | None:
    if str(row.get("level") or "").upper() != "ERROR":
        return None
    what = f"{_obs_type(row) or 'observation'} {row.get('name') or row.get('id')}"
    message = _text(row.get("statusMessage"))
    return f"{what}: {message}" if message else f"{what}: level ERROR (no status message)"


# --- scores ------------------------------------------------------------------------------------------


def _score_value(row: dict[str, Any]) -> Any:
    kind = str(row.get("dataType") or "").upper()
    value, label = row.get("value"), row.get("stringValue")
    if kind == "BOOLEAN":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        return label.strip().lower() == "true" if isinstance(label, str) else None
    if kind == "CATEGORICAL" or (value is None and isinstance(label, str)):
        return label if isinstance(label, str) else value
    return value


def _author(row: dict[str, Any]) -> str | None:
    source = str(row.get("source") or "").upper()
    return "human" if source in HUMAN_SOURCES else "automated" if source == "EVAL" else None


def _signals(scores: list[Score], ctx) -> dict[str, Any]:
    named, approvals, verdicts = [], [], []
    for s in scores:
        row = s.row
        if not isinstance(row.get("name"), str) or not row["name"]:
            continue  # only an embedded score can get here (join_key refuses a nameless one)
        value = _score_value(row)
        ns = ctx.score(row["name"], value, by=_author(row))
        named.append(ns)
        label = value.strip().lower() if isinstance(value, str) else None
        if label in VERDICTS:
            verdicts.append(VERDICTS[label])
        elif ns["by"] == "human" and ns["normalized"] in (0.0, 1.0) and (
                isinstance(value, bool) or (label is not None and label in t.GRADES)):
            who = _text(row.get("authorUserId")) or f"langfuse:{str(row.get('source') or 'score').upper()}"
            approvals.append((ns["normalized"] == 1.0, who))
    eval_score, rating = t.combine_scores(named)
    approved = approver = None
    if approvals:
        approved = all(ok for ok, _ in approvals)
        approver = next(who for ok, who in approvals if ok == approved)
    verdict = "fail" if "fail" in verdicts else "pass" if verdicts else None
    return {"eval_score": eval_score, "human_rating": rating, "approved": approved, "approver": approver,
            "verdict": verdict, "scores": named}
