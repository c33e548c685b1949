"""LangSmith runs and feedback: the runs of one trace joined into one evidence record per LLM call.

    run       {"id", "trace_id", "parent_run_id", "dotted_order", "run_type": "llm" | "chain" | "tool" |
               "retriever" | "prompt" | "parser" | "embedding", "name", "start_time", "end_time" (ISO or
               epoch ms), "inputs", "outputs", "error", "status", "session_id" | "session_name",
               "extra": {"metadata": {"ls_provider", "ls_model_name", "usage_metadata"}, "invocation_params"},
               "events", "feedback_stats", "prompt_tokens", "completion_tokens", ...}
    feedback  {"id", "run_id", ["trace_id"], "key", "score", "value", "comment", "correction",
               "feedback_source": {"type": "api" | "app" | "model" | ..., "user_id", "user_name"}, "created_at"}

Where they come from: the SDK's wire records — a run is sent as a create (`post`: inputs,
start_time) and later an update (`patch`: outputs, end_time, error) with the same `id`, in batch
bodies `{"post": [...], "patch": [...]}` (one per line, or one document) —, run exports (JSONL,
or a JSON array, or a `POST /runs/query` answer `{"runs": [...]}`), and feedback records
(`POST /feedback` bodies, or exports of them). Recognised by content.

The join. Records are grouped by trace: a run by its `trace_id` (else the first segment of its
`dotted_order`, else its own id — a root's trace id is its id); a feedback record by its
`trace_id` when it has one, else through its `run_id`: every run is also known by its id, and
the materializer puts the feedback in the group of the trace that run belongs to, whichever
file the run is in. In a group, the records of one run id are
merged — creates before updates, later fields win, but an absent or empty field never erases a
present one — and:

- every `llm` run becomes one evidence record: its inputs (OpenAI/Anthropic request kwargs,
  LangChain serialised messages `{"lc": 1, "id": [..., "HumanMessage"], "kwargs": {...}}` — one
  list per prompt —, `{"type": "human", "content"}` messages, `prompts`, Responses `input`) are
  the conversation, its outputs (a chat.completion, a Responses object, an Anthropic Message,
  a LangChain LLMResult `generations` with its AIMessage, a message, a text) the answer with its
  tool calls (LangChain's `tool_calls` and `invalid_tool_calls`, OpenAI's, Anthropic's), stop
  reason and refusal; tokens from the answer's usage, else `usage_metadata`,
  `llm_output.token_usage`, `extra.metadata.usage_metadata`, the run's `prompt_tokens`; model
  and provider from the answer, `extra.metadata.ls_model_name` / `ls_provider`,
  `extra.invocation_params`; latency = end_time − start_time in ms; the run's `error` (its
  first line: the rest is a traceback) or `status: "error"` is the error. Several choices or
  generations make parts choice-0, choice-1, ...
- a trace with no llm run becomes one evidence record from its root run (kind "trace"): the
  root's inputs as the prompt, its outputs as the answer.
- every other run is joined into an evidence record: the root into the trace's last llm run
  (the one whose answer ended the trace — a root's error is the trace's failure and rejects it),
  any other run into the llm run that started last before it (the call whose tool request it
  ran), or the first llm run when it came before all of them (its output fed that call).
- feedback is joined into the evidence its run is in: feedback on the root or on the llm run
  itself judges that answer — `score` (number or bool), else a categorical `value`, becomes a
  named score with the feedback key as its name, by "automated" when `feedback_source.type` is
  "model" or "auto_eval", else by "human" (mean → eval_score / human_rating); a human thumbs
  (a bool score, a thumbs value, a "thumb" key scored 0/1) is the approval, with the source's
  user as approver; a `correction` means the answer was not right as given: the corrected
  answer becomes `signals.expected`, and the answer is disapproved (human) or fails (verdict
  "fail", a model's correction). `feedback_stats` of those runs adds the keys no feedback
  record carries (author unknown). Feedback on another run (a tool, a retriever) is kept as a
  named score that is not counted (`used: false`): it judges a step, not the answer.

Quarantined as unmatched_join: feedback whose run is in no source file, an update
(`patch`) whose create is in no file, and the runs of a trace with no llm run whose root run is
in no file. Times: the run's `start_time` (else `end_time`, else its `dotted_order`).

Limits: a LangChain batch call with several prompts is read for its first prompt only; nested
`child_runs` (a run read with its children) are not unfolded — export the runs flat; feedback
`comment` has no place in the evidence, nor has a `value` that is an object; a child step's
error (a tool that raised) is not the call's error; evaluation-result exports (`{run, example,
evaluation_results}`) are not read; multipart/zstd batch bodies must be decoded to JSON first.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson

from refinery import chat_formats as cf
from refinery import transform as t
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, Refuse, RowError, TransformSpec, dated, wrong_type

SPEC = TransformSpec(name="langsmith", patterns=(), format="json", kind="chat_completion",
                     description="LangSmith runs (create/update records, run exports) and feedback, joined by trace",
                     record_paths=("post[]", "patch[]", "runs[]"))

#: The evidence of a trace that has no llm run: its root run's inputs and outputs.
TRACE_KIND = "trace"
RUN_TYPES = frozenset({"llm", "chain", "tool", "retriever", "prompt", "parser", "embedding"})
#: feedback_source.type values that mean a program gave the feedback, not a person.
AUTOMATED_SOURCES = frozenset({"model", "auto_eval"})
THUMBS = frozenset({"thumbs_up", "thumbs_down", "up", "down", "👍", "👎"})
_DOTTED = re.compile(r"(\d{8})T(\d{6})(\d{0,6})Z(.+)")


# --- recognising records ----------------------------------------------------------------------


def _is_run(r: Any) -> bool:
    """A run record: an id and a run_type, or (an update) an id, trace_id and dotted_order."""
    if not isinstance(r, dict) or not isinstance(r.get("id"), str) or "run_id" in r:
        return False
    if r.get("run_type") in RUN_TYPES:
        return any(k in r for k in ("trace_id", "dotted_order", "start_time", "inputs"))
    return isinstance(r.get("trace_id"), str) and isinstance(r.get("dotted_order"), str) \
        and bool(_DOTTED.fullmatch(r["dotted_order"].split(".")[0]))


def _is_feedback(r: Any) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("run_id"), str) and isinstance(r.get("key"), str)
            and any(k in r for k in ("feedback_source", "score", "value", "correction")))


def _is_batch(r: Any) -> bool:
    """A batch body {"post": [runs], "patch": [runs]} or a runs query answer {"runs": [runs]}."""
    if not isinstance(r, dict):
        return False
    lists = [r[k] for k in ("post", "patch", "runs") if k in r]
    return bool(lists) and all(isinstance(v, list) for v in lists) and any(
        _is_run(x) for v in lists for x in v[:8])


def detect(probe):
    if probe.mostly(_is_batch):
        return "documents are LangSmith run batches ({post: [runs], patch: [runs]} or {runs: [...]})"
    if probe.mostly(_is_run):
        return "records are LangSmith runs (id, run_type, trace_id / dotted_order)"
    if probe.mostly(_is_feedback):
        return "records are LangSmith feedback (run_id, key, score / value, feedback_source)"
    if probe.mostly(lambda r: _is_run(r) or _is_feedback(r) or _is_batch(r)):
        return "records are LangSmith runs and feedback"
    return None


# --- the join ---------------------------------------------------------------------------------


def _dotted_segments(row: dict) -> list[tuple[str, str]]:
    """(start time as ISO, run id) of each segment of a run's dotted_order, root first."""
    dotted = row.get("dotted_order")
    if not isinstance(dotted, str):
        return []
    out = []
    for seg in dotted.split("."):
        m = _DOTTED.fullmatch(seg)
        if not m:
            return []
        d, hms, frac = m.group(1), m.group(2), m.group(3)
        iso = f"{d[:4]}-{d[4:6]}-{d[6:]}T{hms[:2]}:{hms[2:4]}:{hms[4:]}" + (f".{frac.ljust(6, '0')}" if frac else "")
        out.append((iso + "Z", m.group(4)))
    return out


def _trace_of(row: dict) -> str:
    if isinstance(row.get("trace_id"), str) and row["trace_id"]:
        return row["trace_id"]
    segments = _dotted_segments(row)
    return segments[0][1] if segments else row["id"]


def join_key(row, ctx):
    if _is_feedback(row):
        if isinstance(row.get("trace_id"), str) and row["trace_id"]:
            return Keyed(f"trace:{row['trace_id']}", "feedback")
        return Keyed(f"run:{row['run_id']}", "feedback", via=True)  # its run says which trace
    if isinstance(row.get("id"), str) and row["id"] and "run_id" not in row and any(
            k in row for k in ("run_type", "trace_id", "dotted_order")):
        # An update is told by where it sits: a batch body's patch[] list.
        return Keyed(f"trace:{_trace_of(row)}", "patch" if ".patch[" in (ctx.record or "") else "run",
                     aliases=(f"run:{row['id']}",))
    return None


def transform(row, ctx):  # runs and feedback are joined; this runs only for records join_key declines
    if isinstance(row, dict) and "run_id" in row and not isinstance(row.get("run_id"), str):
        raise RowError(Reason.MISSING_FIELD, "field 'run_id' is missing or null: feedback on no run (a project or "
                                             "an experiment comparison) has no answer to attach to")
    raise RowError(Reason.MISSING_FIELD, "not a LangSmith run (needs id and run_type, trace_id or dotted_order) "
                                         "nor feedback (needs run_id and key)")


class _Run:
    """One run of a trace: its records merged (a plain class: refinery loads importer modules
    outside sys.modules, where @dataclass cannot resolve their annotations)."""

    __slots__ = ("id", "row", "members")

    def __init__(self, run_id: str, row: dict[str, Any], members: list[t.Member]):
        self.id = run_id
        self.row = row
        """the merged record (create, then updates)"""
        self.members = members
        """its records, the create first (the primary of its evidence)"""

    @property
    def run_type(self) -> Any:
        return self.row.get("run_type")

    @property
    def name(self) -> str | None:
        return self.row["name"] if isinstance(self.row.get("name"), str) else None

    @property
    def started(self) -> str:
        """A sort key: the start time as canonical UTC text ("~": unknown, last)."""
        try:
            return t.parse_timestamp(self.row["start_time"], "start_time") if self.row.get("start_time") else \
                (_dotted_segments(self.row) or [("~", "")])[-1][0]
        except RowError:
            return "~"


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == {} or v == []


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """An update over a run: later fields win, absent or empty ones never erase; `extra` merges
    key by key (an update's metadata does not drop the create's runtime)."""
    out = dict(base)
    for k, v in update.items():
        if _empty(v) and k in out:
            continue
        if k == "extra" and isinstance(v, dict) and isinstance(out.get(k), dict):
            v = _merge(out[k], v)
        out[k] = v
    return out


def _runs(members: list[t.Member]) -> tuple[dict[str, _Run], list[Refuse]]:
    by_id: dict[str, list[t.Member]] = {}
    for m in members:
        by_id.setdefault(m.row["id"], []).append(m)
    runs, refused = {}, []
    for run_id, ms in by_id.items():
        ms = sorted(ms, key=lambda m: m.role == "patch")  # creates first, else reading order
        if ms[0].role == "patch":
            refused += [Refuse(m, Reason.UNMATCHED_JOIN, f"an update (patch) of run {run_id}: its create (post) record "
                                                         "with the inputs is in no source file") for m in ms]
            continue
        row: dict[str, Any] = {}
        for m in ms:
            row = _merge(row, m.row)
        runs[run_id] = _Run(run_id, row, ms)
    return runs, refused


def assemble(group, ctx):
    feedback = [m for m in group if m.role == "feedback"]
    run_members = [m for m in group if m.role != "feedback"]
    runs, out = _runs(run_members)
    if not runs:
        return out + [Refuse(m, Reason.UNMATCHED_JOIN, _no_run_detail(m, bool(run_members))) for m in feedback]
    ordered = sorted(runs.values(), key=lambda r: (r.started, r.row.get("dotted_order") or "", r.id))
    trace = _trace_of(ordered[0].row)
    root = runs.get(trace)
    llms = [r for r in ordered if r.run_type == "llm"]
    if not llms and root is None:
        detail = (f"trace {trace} has no llm run, and its root run {trace} is in no source file: add the file with "
                  "the root run (its inputs and outputs are the trace's answer)")
        return out + [Refuse(m, Reason.UNMATCHED_JOIN, detail) for r in ordered for m in r.members] + [
            Refuse(m, Reason.UNMATCHED_JOIN, detail) for m in feedback]
    heads = llms or [root]
    owner = _owners(ordered, heads, root)
    placed: dict[str, list[tuple[t.Member, bool]]] = {h.id: [] for h in heads}
    for m in feedback:
        target = runs.get(m.row["run_id"])
        if target is None:
            out.append(Refuse(m, Reason.UNMATCHED_JOIN, f"feedback {m.row['key']!r} on run {m.row['run_id']}: no such "
                                                        f"run in trace {trace} in any source file"))
            continue
        head = owner[target.id]
        placed[head].append((m, target is root or target.id == head))
    steps: dict[str, list[_Run]] = {h.id: [] for h in heads}
    for r in ordered:
        if r.id != owner[r.id]:
            steps[owner[r.id]].append(r)
    for head in heads:
        out += _emit(head, root, steps[head.id], placed[head.id], ctx)
    return out


def _no_run_detail(m: t.Member, had_runs: bool) -> str:
    run_id, key = m.row["run_id"], m.row["key"]
    if had_runs:
        return f"feedback {key!r} on run {run_id}: the run's only records are updates whose create is in no file"
    return (f"feedback {key!r} on run {run_id}: run {run_id} is in no source file — add the file holding the "
            "runs to data/_kb/")


def _owners(ordered: list[_Run], heads: list[_Run], root: _Run | None) -> dict[str, str]:
    """run id → the id of the evidence head it is joined into."""
    owner: dict[str, str] = {}
    head_ids = {h.id for h in heads}
    last = None
    for r in ordered:
        if r.id in head_ids:
            owner[r.id] = last = r.id
        elif r is root:
            owner[r.id] = heads[-1].id
        else:
            owner[r.id] = last or heads[0].id
    return owner


def _emit(head: _Run, root: _Run | None, joined_runs: list[_Run], feedback: list[tuple[t.Member, bool]],
          ctx) -> list[Emit | Refuse]:
    out: list[Emit | Refuse] = []
    good: list[tuple[t.Member, bool]] = []
    for m, counted in feedback:
        problem = _feedback_problem(m.row)
        if problem is not None:
            out.append(Refuse(m, Reason.WRONG_TYPE, problem))
        else:
            good.append((m, counted))
    root_joined = root is not None and any(r is root for r in joined_runs)
    stat_runs = [head, root] if root_joined else [head]
    primary, rest = head.members[0], head.members[1:]
    joined = (*rest, *(m for r in joined_runs for m in r.members), *(m for m, _ in good))
    try:
        signals = _signals(good, stat_runs, ctx)
        trace_error = _error(root.row) if root_joined else None
        evidence = _evidence(head, root, signals, trace_error, ctx)
    except RowError as e:
        out.append(Refuse(primary, e.reason, e.detail))
        out += [Refuse(m, e.reason, f"joined into run {head.id}, which was refused: {e.detail}") for m in joined]
        return out
    for part, ev in evidence:
        out.append(Emit(ev, primary, joined, part))
    return out


# --- the evidence of one run ------------------------------------------------------------------


def _evidence(run: _Run, root: _Run | None, signals: dict[str, Any], trace_error: str | None,
              ctx) -> list[tuple[str | None, dict[str, Any]]]:
    row = run.row
    inputs = row.get("inputs")
    if inputs is None or inputs == {}:
        raise RowError(Reason.MISSING_FIELD, f"field 'inputs' of run {run.id} is missing or empty: the call's "
                                             "prompt was not recorded")
    prompt = _prompt_messages(inputs)
    lead, answers = _answers(row.get("outputs"), prompt)
    error = _error(row) or (f"the trace failed: {trace_error}" if trace_error else None)
    usage = _usage(row)
    answers = [a._replace(prompt_tokens=a.prompt_tokens if a.prompt_tokens is not None else usage[0],
                          completion_tokens=a.completion_tokens if a.completion_tokens is not None else usage[1])
               for a in answers]
    rctx = ctx.row_context(run.members[0])
    segments = _dotted_segments(row)
    recorded_at, when = dated(rctx, ("record:start_time", row.get("start_time")),
                              ("record:end_time", row.get("end_time")),
                              ("record:dotted_order", segments[-1][0] if segments else None))
    is_llm = run.run_type == "llm"
    common = dict(recorded_at=recorded_at, recorded_at_from=when, provider=_provider(row) if is_llm else None,
                  model=_model(row, inputs, answers) if is_llm else None, error=error, task_id=run.id,
                  task_name=(root.name if root is not None else None) or run.name, latency_ms=_latency(row))
    kind = SPEC.kind if is_llm else TRACE_KIND
    msgs = [*prompt, *lead]
    if not answers:
        return [(None, _with_tokens(cf.call_evidence(kind, msgs, None, signals=dict(signals), **common), usage))]
    if len(answers) == 1:
        return [(None, cf.call_evidence(kind, msgs, answers[0], signals=dict(signals), **common))]
    return [(f"choice-{i}", cf.call_evidence(kind, msgs, a, signals=dict(signals), **common))
            for i, a in enumerate(answers)]


def _with_tokens(ev: dict[str, Any], usage: tuple[int | None, int | None]) -> dict[str, Any]:
    ev["prompt_tokens"], ev["completion_tokens"] = usage
    return ev


def _error(row: dict[str, Any]) -> str | None:
    """The run's error: its first line (the SDK appends the whole traceback), or its status."""
    err = row.get("error")
    if not _empty(err):
        text = err if isinstance(err, str) else orjson.dumps(err).decode()
        return next((line for line in text.splitlines() if line.strip()), text)
    if row.get("status") == "error":
        return "run status: error"
    return None


def _latency(row: dict[str, Any]) -> float | None:
    start, end = row.get("start_time"), row.get("end_time")
    if _empty(start) or _empty(end):
        return None
    a = datetime.fromisoformat(t.parse_timestamp(start, "start_time"))
    b = datetime.fromisoformat(t.parse_timestamp(end, "end_time"))
    ms = (b - a).total_seconds() * 1000.0
    return round(ms, 3) if ms >= 0 else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _usage(row: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from wherever LangSmith put them, best first."""
    outputs = row.get("outputs") if isinstance(row.get("outputs"), dict) else {}
    llm_output = outputs.get("llm_output") if isinstance(outputs.get("llm_output"), dict) else {}
    meta = _dict(_dict(row.get("extra")).get("metadata"))
    for usage in (outputs.get("usage_metadata"), llm_output.get("token_usage"), llm_output.get("usage"),
                  meta.get("usage_metadata"), row):
        if isinstance(usage, dict):
            pt = _int(usage.get("input_tokens", usage.get("prompt_tokens")))
            ct = _int(usage.get("output_tokens", usage.get("completion_tokens")))
            if pt is not None or ct is not None:
                return pt, ct
    return None, None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _provider(row: dict[str, Any]) -> str | None:
    extra = _dict(row.get("extra"))
    provider = _dict(extra.get("metadata")).get("ls_provider")
    if isinstance(provider, str) and provider:
        return provider
    kind = _dict(extra.get("invocation_params")).get("_type")  # LangChain's "openai-chat", "anthropic-chat"
    if isinstance(kind, str) and kind:
        return kind.split("-")[0]
    if cf.is_anthropic_message(row.get("outputs")):
        return "anthropic"
    return None


def _model(row: dict[str, Any], inputs: Any, answers: list[cf.Answer]) -> str | None:
    """The model that answered (its dated snapshot, from the answer), else the one asked for."""
    if answers and answers[0].model:
        return answers[0].model
    outputs = _dict(row.get("outputs"))
    extra = _dict(row.get("extra"))
    params = _dict(extra.get("invocation_params"))
    for v in (outputs.get("model"), _dict(outputs.get("llm_output")).get("model_name"),
              _dict(extra.get("metadata")).get("ls_model_name"), params.get("model"), params.get("model_name"),
              _dict(inputs).get("model")):
        if isinstance(v, str) and v:
            return v
    return None


# --- messages in LangSmith's shapes -----------------------------------------------------------

#: LangChain message classes (the last item of a serialised message's "id"), and message
#: "type"s of messages_to_dict / LangGraph state, as roles.
_CLASS_ROLES = {"HumanMessage": "user", "AIMessage": "assistant", "SystemMessage": "system", "ToolMessage": "tool",
                "FunctionMessage": "tool", "ChatMessage": None}
_TYPE_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool",
               "developer": "system", "chat": None}


def _plain_message(raw: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A message in any of LangSmith's shapes → ({role, content, tool_calls, tool_call_id, name},
    the body it came from — a LangChain message's kwargs, where response_metadata lives)."""
    if not isinstance(raw, dict):
        raise wrong_type(where, "a message object", raw)
    if raw.get("lc") == 1 and isinstance(raw.get("id"), list) and raw["id"]:  # LangChain serialised
        cls = str(raw["id"][-1]).removesuffix("Chunk")
        body = _dict(raw.get("kwargs"))
        role = _CLASS_ROLES.get(cls, cls)
    elif "role" in raw:
        return raw, raw
    elif isinstance(raw.get("type"), str):
        body = raw["data"] if isinstance(raw.get("data"), dict) else raw
        role = _TYPE_ROLES.get(raw["type"], raw["type"])
    else:
        raise RowError(Reason.WRONG_TYPE, f"field '{where}': a message needs a role, a type or a LangChain id")
    if role is None:  # a ChatMessage names its own role
        role = body.get("role")
    calls = body.get("tool_calls") or _dict(body.get("additional_kwargs")).get("tool_calls") or []
    calls = [*calls, *(body.get("invalid_tool_calls") or [])] if isinstance(calls, list) else calls
    content = body.get("content")
    if calls and isinstance(content, list):  # Anthropic's tool_use blocks repeat the calls
        content = [p for p in content if not (isinstance(p, dict) and p.get("type") == "tool_use")]
    return {"role": role, "content": content, "tool_calls": calls or None, "tool_call_id": body.get("tool_call_id"),
            "name": body.get("name")}, body


def _normalise(raws: list[Any], where: str) -> list[dict[str, Any]]:
    plain = [_plain_message(m, f"{where}[{i}]")[0] for i, m in enumerate(raws)]
    return t.messages({}, where, plain) or []


def _render(value: Any) -> str | None:
    """Inputs or outputs that are no conversation, as text: the one string they hold, else JSON."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}  # {"output": null}: nothing was returned
    if value is None or value == {} or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(value) == 1 and strings:
            return strings[0]
        if isinstance(value.get("output"), str):
            return value["output"]
    return orjson.dumps(value).decode()


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "name": None, "tool_calls": None, "tool_call_id": None}


def _prompt_messages(inputs: Any) -> list[dict[str, Any]]:
    """The conversation a run was given."""
    if not isinstance(inputs, dict):
        text = _render(inputs)
        return [_user(text)] if text else []
    msgs = inputs.get("messages")
    if isinstance(msgs, list):
        where = "inputs.messages"
        if msgs and all(isinstance(m, list) for m in msgs):  # LangChain: one list per prompt of a batch
            msgs, where = msgs[0], "inputs.messages[0]"
        out = []
        system = inputs.get("system")
        system = t.content_text(system) if isinstance(system, list) else system
        if isinstance(system, str) and system:  # Anthropic's request kwargs
            out.append({**_user(system), "role": "system"})
        return out + _normalise(msgs, where)
    if msgs is not None:
        raise wrong_type("inputs.messages", "a list of messages", msgs)
    prompts = inputs.get("prompts")
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], str):  # a LangChain completion model
        return [_user(prompts[0])]
    if isinstance(inputs.get("input"), (str, list)) or isinstance(inputs.get("prompt"), str):
        asked = cf.request_messages(inputs, "inputs")  # the Responses API's input / instructions, a prompt
        if asked:
            return asked
    text = _render(inputs)
    return [_user(text)] if text else []


def _answers(outputs: Any, prompt: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[cf.Answer]]:
    """(messages that came before the answer, the answers) of a run's outputs."""
    if _empty(outputs):
        return [], []
    if not isinstance(outputs, dict):
        return [], [_text_answer(_render(outputs))]
    if cf.is_openai_completion(outputs) or cf.is_openai_response(outputs):
        return [], cf.openai_answers(outputs, "outputs")
    if cf.is_anthropic_message(outputs):
        return [], [cf.anthropic_answer(outputs, "outputs")]
    if isinstance(outputs.get("generations"), list):
        return [], _generation_answers(outputs)
    for key in ("message", "output"):
        if isinstance(outputs.get(key), dict) and _looks_like_message(outputs[key]):
            return [], [_message_answer(outputs[key], {}, f"outputs.{key}")]
    if isinstance(outputs.get("messages"), list):  # a graph's state: the conversation so far
        said = _normalise(outputs["messages"], "outputs.messages")
        if said[:len(prompt)] == prompt:
            said = said[len(prompt):]
        if said and said[-1]["role"] == "assistant":
            return said[:-1], [_answer(said[-1])]
        return said, []
    text = _render(outputs)
    return [], [_text_answer(text)] if text is not None else []


def _looks_like_message(v: dict[str, Any]) -> bool:
    return (v.get("lc") == 1 and isinstance(v.get("id"), list)) or "role" in v or v.get("type") in _TYPE_ROLES


def _answer(msg: dict[str, Any], stop: str | None = None, refusal: str | None = None, model: str | None = None,
            pt: int | None = None, ct: int | None = None, rid: str | None = None) -> cf.Answer:
    return cf.Answer(msg, stop, refusal, model, pt, ct, None, rid)


def _text_answer(text: str | None) -> cf.Answer:
    return _answer({"role": "assistant", "content": text, "name": None, "tool_calls": None, "tool_call_id": None})


def _message_answer(raw: Any, info: dict[str, Any], where: str, usage: dict[str, Any] | None = None,
                    model: str | None = None, text: Any = None) -> cf.Answer:
    """An AI message (LangChain's, with response_metadata and usage_metadata, or a plain one)."""
    plain, body = _plain_message(raw, where)
    if _empty(plain.get("content")) and isinstance(text, str) and text:
        plain = {**plain, "content": text}
    msg = t.messages({}, where, [{**plain, "role": "assistant"}])[0]
    meta = _dict(body.get("response_metadata"))
    stop = next((v for v in (info.get("finish_reason"), meta.get("finish_reason"), meta.get("stop_reason"),
                             meta.get("done_reason")) if isinstance(v, str) and v), None)
    refusal = _dict(body.get("additional_kwargs")).get("refusal")
    um = _dict(body.get("usage_metadata"))
    tu = _dict(meta.get("token_usage")) or _dict(meta.get("usage"))
    usage = usage or {}
    pt = next((v for v in (_int(usage.get("prompt_tokens")), _int(usage.get("input_tokens")), _int(
        um.get("input_tokens")), _int(tu.get("prompt_tokens")), _int(tu.get("input_tokens"))) if v is not None), None)
    ct = next((v for v in (_int(usage.get("completion_tokens")), _int(usage.get("output_tokens")), _int(
        um.get("output_tokens")), _int(tu.get("completion_tokens")), _int(tu.get("output_tokens"))) if v is not None),
        None)
    model = model or next((v for v in (meta.get("model_name"), meta.get("model")) if isinstance(v, str) and v), None)
    rid = meta.get("id") if isinstance(meta.get("id"), str) else None
    return _answer(msg, stop, refusal if isinstance(refusal, str) and refusal else None, model, pt, ct, rid)


def _generation_answers(outputs: dict[str, Any]) -> list[cf.Answer]:
    """A LangChain LLMResult: {"generations": [[{text, message, generation_info}]], "llm_output"}."""
    gens, where = outputs["generations"], "outputs.generations"
    if gens and all(isinstance(g, list) for g in gens):  # one list per prompt of a batch
        gens, where = gens[0], "outputs.generations[0]"
    llm_output = _dict(outputs.get("llm_output"))
    usage = _dict(llm_output.get("token_usage")) or _dict(llm_output.get("usage"))
    model = llm_output.get("model_name") or llm_output.get("model")
    model = model if isinstance(model, str) and model else None
    out = []
    for i, g in enumerate(gens):
        if not isinstance(g, dict):
            raise wrong_type(f"{where}[{i}]", "a generation object", g)
        info = _dict(g.get("generation_info"))
        raw = g.get("message") if isinstance(g.get("message"), dict) else {"role": "assistant", "content": g.get(
            "text")}
        out.append(_message_answer(raw, info, f"{where}[{i}].message", usage, model, g.get("text")))
    return out


# --- feedback ---------------------------------------------------------------------------------


def _feedback_problem(row: dict[str, Any]) -> str | None:
    score = row.get("score")
    if score is not None and not isinstance(score, (int, float)):
        return f"field 'score' of feedback {row['key']!r}: expected a number or a boolean, got {score!r:.40}"
    source = row.get("feedback_source")
    if source is not None and not isinstance(source, dict):
        return f"field 'feedback_source': expected an object {{type, ...}}, got {source!r:.40}"
    return None


def _author(row: dict[str, Any]) -> str:
    kind = _dict(row.get("feedback_source")).get("type")
    return "automated" if kind in AUTOMATED_SOURCES else "human"


def _approver(row: dict[str, Any]) -> str:
    source = _dict(row.get("feedback_source"))
    for k in ("user_name", "user_id"):
        if isinstance(source.get(k), str) and source[k]:
            return source[k]
    return f"langsmith feedback {row['key']!r} ({source.get('type') or 'unknown source'})"


def _is_thumbs(row: dict[str, Any]) -> bool:
    score, value = row.get("score"), row.get("value")
    if isinstance(score, bool) or (isinstance(value, str) and value.strip().lower() in THUMBS):
        return True
    return "thumb" in row["key"].lower() and score in (0, 1)


def _correction_text(correction: Any) -> str:
    if isinstance(correction, str):
        return correction
    if isinstance(correction, dict):
        strings = [v for v in correction.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    return orjson.dumps(correction).decode()


def _signals(feedback: list[tuple[t.Member, bool]], stat_runs: list[_Run], ctx) -> dict[str, Any]:
    """Named scores, approval, verdict and the corrected answer from the feedback on an answer.
    Feedback not `counted` (on a step of the trace, not the answer) is kept but not counted."""
    scores, approvals, expected, verdict = [], [], None, None
    keys: dict[str, set[str]] = {}
    for m, counted in feedback:
        row = m.row
        keys.setdefault(row["run_id"], set()).add(row["key"])
        by = _author(row)
        value = row.get("score")
        if value is None and isinstance(row.get("value"), (str, int, float)):
            value = row["value"]  # a categorical feedback: its value is the grade
        if value is not None:  # a step's score is kept, not counted — unless [signals.<key>] use = true
            scores.append(ctx.score(row["key"], value, by=by, use=None if counted else False))
        correction = row.get("correction")
        if not counted:
            continue
        if not _empty(correction):
            expected = _correction_text(correction)
            if by == "human":
                approvals.append((False, _approver(row)))
            else:
                verdict = "fail"
        if by == "human" and value is not None and _is_thumbs(row) and scores[-1]["normalized"] is not None:
            approvals.append((scores[-1]["normalized"] >= 0.5, _approver(row)))
    for run in stat_runs:  # a run export's aggregates: only the keys no feedback record carries
        for key, stat in _dict(run.row.get("feedback_stats")).items():
            avg = stat.get("avg") if isinstance(stat, dict) else stat
            if key not in keys.get(run.id, set()) and isinstance(avg, (int, float)):
                scores.append(ctx.score(key, avg))
    eval_score, human_rating = t.combine_scores(scores)
    no = next((who for ok, who in approvals if not ok), None)
    return {"scores": scores, "eval_score": eval_score, "human_rating": human_rating, "expected": expected,
            "verdict": verdict, "approved": None if not approvals else no is None,
            "approver": no if no is not None else (approvals[0][1] if approvals else None)}
