"""The importer (transform) contract, and the helpers importer modules use.

An importer module in `transforms/` defines

    SPEC = TransformSpec(name=..., patterns=(...), format="json" | "csv", kind=...)

    def transform(row: dict, ctx: RowContext) -> dict | list[dict] | Refusal: ...

and returns an evidence dict built with `new_evidence(...)` (a list of them when one row holds
several answers, e.g. a preference pair: each built with a distinct `part`), or refuses the
row — by returning a `Refusal` or raising `RowError` (the field helpers below raise it for
missing fields and wrong types). The materializer adds `id`, `source` and `provenance`.

Optionally, the module also defines

    def detect(probe: refinery.containers.Probe) -> str | None

which recognises the format from a file's content (its first records, or the document) and
says why — so files are claimed as operators' tools name them — and, for formats whose
signals live in other records or files,

    def join_key(row, ctx) -> Keyed | None            # which group a record belongs to
    def assemble(group: list[Member], ctx) -> list[Emit | Refuse]

The materializer spills keyed records to disk in hash buckets and hands each group (all
records with the same key, from every file the importer claims, in reading order) to
`assemble`, which emits evidence with its primary record and the records joined into it. A
member that ends up in no Emit and no Refuse is quarantined as unmatched_join.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as _field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson

from refinery.normalize import last_user_index
from refinery.reasons import Reason


@dataclass(frozen=True)
class TransformSpec:
    name: str
    patterns: tuple[str, ...]
    """fnmatch globs on the file's path relative to data/_kb (e.g. "runs*.csv"); a name claim
    (`.gz` is looked through). Empty for an importer that claims by content only."""
    format: Literal["json", "jsonl", "csv"]
    """the records it reads: json objects (from JSONL, JSON documents, archives, gzip of them;
    "jsonl" is the older name) or csv rows"""
    kind: str
    description: str = ""
    record_paths: tuple[str, ...] = ()
    """where records sit inside a JSON document (`samples[]`, `results.results[]`,
    `resourceSpans[].scopeSpans[].spans[]`), or, in an archive, which members are records
    (`samples/*.json`). A document none of them matches is a record itself."""


class Refusal(NamedTuple):
    reason: Reason
    detail: str


class RowError(Exception):
    """Raised inside a transform to refuse the current row. `field`: the field whose absence
    refused it, when that is the reason (so a CSV without the column can be named once)."""

    def __init__(self, reason: Reason, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


@dataclass
class FieldHits:
    """How many records of a file a declarative mapping read (`records`), how many its filter
    kept (`kept`), and in how many each of its fields (or filter paths) found a value — so a
    path that matches nothing in any record is said, not left to the quarantine counts."""

    records: int = 0
    kept: int = 0
    found: Counter[str] = _field(default_factory=Counter)


@dataclass
class RowContext:
    """What a transform may know about where the row comes from."""

    source: str
    source_file: str
    line_offset: int = 0
    record: str | None = None
    """where the record sits in its document or archive (None for a whole line or CSV row)"""
    parents: tuple[Any, ...] = ()
    """the objects enclosing the record in its document, outermost first (an archive's header.json)"""
    fallback_time: str | None = None
    """`recorded_at` of the file's [sources.<name>] table: the time of rows that carry none"""
    fallback_origin: str | None = None
    score_rules: dict[str, Any] | None = None
    """refinery.toml [signals.<name>]: how to read named scores (direction, scale, author)"""
    dropped: Any = None
    """a Counter of optional fields dropped for a wrong type (the row kept), when the caller counts them"""
    hits: FieldHits | None = None
    """for a declarative mapping, when the caller counts them: which of its paths found a value"""

    def score(self, name: str, value: Any, **kw: Any) -> dict[str, Any]:
        """`named_score` with the workspace's [signals] rules."""
        return named_score(name, value, rules=self.score_rules, **kw)

    @property
    def document(self) -> Any:
        """The whole document the record sits in (None for a line or CSV row)."""
        return self.parents[0] if self.parents else None


class Keyed(NamedTuple):
    """A record's join group: `key` (e.g. "trace:abc"), its `role` in the group, and `extra`:
    anything from its document the assembly needs (the document is not spilled with it).

    A record that knows its group only through another record — LangSmith feedback names its
    run, not the run's trace — gives that name as `key` with `via=True`; the record it names
    lists the name in `aliases` (a run: `aliases=("run:<id>",)`). The materializer resolves
    the alias on disk, bucket by bucket, and puts the record in the aliased group; an alias no
    record lists leaves it in a group of its own (its partner is in no file)."""

    key: str
    role: str
    extra: Any = None
    aliases: tuple[str, ...] = ()
    via: bool = False


class Member(NamedTuple):
    """One record of a join group, as `assemble` sees it."""

    role: str
    row: dict[str, Any]
    extra: Any
    file: int
    """index of its source file in the run"""
    offset: int
    record: str | None
    sig: str


class Emit(NamedTuple):
    """Evidence made by `assemble`: from `primary`, with the records in `joined` merged into it."""

    evidence: dict[str, Any]
    primary: Member
    joined: tuple[Member, ...] = ()
    part: str | None = None


class Refuse(NamedTuple):
    member: Member
    reason: Reason
    detail: str


@dataclass
class GroupContext:
    """What `assemble` may know: each member's file and that file's fallback time."""

    sources: list[Any]
    """the run's source files, by index (refinery.sources.SourceFile)"""
    fallbacks: dict[int, tuple[str, str]]
    """file index → (recorded_at, origin) from its [sources.<name>] table"""
    score_rules: dict[str, Any] | None = None

    def score(self, name: str, value: Any, **kw: Any) -> dict[str, Any]:
        return named_score(name, value, rules=self.score_rules, **kw)

    def source_file(self, m: Member) -> str:
        return self.sources[m.file].ws_rel

    def row_context(self, m: Member) -> RowContext:
        src = self.sources[m.file]
        fb = self.fallbacks.get(m.file)
        return RowContext(src.source, src.ws_rel, m.offset, m.record, (),
                          fb[0] if fb else None, fb[1] if fb else None, self.score_rules)


Detector = Callable[[Any], "str | None"]


# --- reading fields -----------------------------------------------------------------------

_MISSING = object()


def get(row: dict, path: str) -> Any:
    """The value at a column name or dotted JSON path; None when absent."""
    value = row.get(path, _MISSING)
    if value is not _MISSING:
        return value
    if "." not in path:
        return None
    cur: Any = row
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
        if cur is _MISSING:
            return None
    return cur


def _describe(value: Any) -> str:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{type(value).__name__} {shown}"


def missing(field: str) -> RowError:
    return RowError(Reason.MISSING_FIELD, f"field '{field}' is missing or empty", field)


def wrong_type(field: str, expected: str, value: Any) -> RowError:
    return RowError(Reason.WRONG_TYPE, f"field '{field}': expected {expected}, got {_describe(value)}")


def text(row: dict, field: str, required: bool = False) -> str | None:
    value = get(row, field)
    if value is None or value == "":
        if required:
            raise missing(field)
        return None
    if type(value) is not str:
        raise wrong_type(field, "a string", value)
    return value


def text_or_empty(row: dict, field: str) -> str | None:
    """Like `text`, but an empty string is kept (an empty answer is a signal, not a gap)."""
    value = get(row, field)
    if value is None:
        return None
    if type(value) is not str:
        raise wrong_type(field, "a string", value)
    return value


def number(row: dict, field: str, required: bool = False) -> float | None:
    value = get(row, field)
    if value is None or value == "":
        if required:
            raise missing(field)
        return None
    t = type(value)
    if t is float or t is int:
        return float(value)
    if t is str:
        try:
            f = float(value)
        except ValueError:
            raise wrong_type(field, "a number", value) from None
        if f != f or f in (float("inf"), float("-inf")):
            raise wrong_type(field, "a finite number", value)
        return f
    raise wrong_type(field, "a number", value)


def unit_score(row: dict, field: str) -> float | None:
    """A score in 0..1; one in 0..100 is divided by 100. Anything else is a wrong type."""
    score = number(row, field)
    if score is not None:
        if score > 1.0:
            score /= 100.0
        if not 0.0 <= score <= 1.0:
            raise RowError(Reason.WRONG_TYPE, f"field '{field}': {get(row, field)!r} is outside 0..1 and 0..100")
    return score


def integer(row: dict, field: str, required: bool = False) -> int | None:
    f = number(row, field, required)
    if f is None:
        return None
    if f != int(f):
        raise wrong_type(field, "an integer", get(row, field))
    return int(f)


_TRUE = {"true", "yes", "y", "1", "approved"}
_FALSE = {"false", "no", "n", "0", "rejected"}


def boolean(row: dict, field: str) -> bool | None:
    value = get(row, field)
    if value is None or value == "":
        return None
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if type(value) is str:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise wrong_type(field, "a boolean", value)


def string_list(row: dict, field: str) -> list[str]:
    value = get(row, field)
    if value is None or value == "":
        return []
    if type(value) is str:  # CSV: "a;b" or "a,b"
        return [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
    if type(value) is list and all(type(v) is str for v in value):
        return list(value)
    raise wrong_type(field, "a list of strings", value)


# --- timestamps ---------------------------------------------------------------------------


def format_utc(dt: datetime) -> str:
    """Always six fractional digits: fixed width, so the text sorts like the time, and pyarrow's
    JSON reader (hence `datasets.load_dataset("json")`) leaves it a string instead of reading
    whole-second spellings back as datetimes."""
    dt = dt.astimezone(UTC) if dt.tzinfo else dt
    base = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    return f"{base}.{dt.microsecond:06d}Z"


def now_utc() -> str:
    return format_utc(datetime.now(UTC))


_CANONICAL_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z").fullmatch


def parse_timestamp(value: Any, field: str = "timestamp") -> str:
    """ISO 8601 (naive = UTC) or epoch s/ms/µs/ns → 'YYYY-MM-DDTHH:MM:SS.ffffffZ'."""
    if value is None or value == "":
        raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}' is missing, so the row cannot be dated", field)
    t = type(value)
    epoch: float | None = None
    if t is int or t is float:
        epoch = float(value)
    elif t is str:
        s = value.strip()
        if m := _CANONICAL_TS(s):  # UTC "YYYY-MM-DDTHH:MM:SS[.ffffff]Z": just check it is a real time
            try:
                datetime.fromisoformat(s)
                return s if m[1] else f"{s[:-1]}.000000Z"
            except ValueError:
                raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}': {s!r} is not a valid time") from None
        if s.isascii() and s.replace(".", "", 1).isdigit():
            epoch = float(s)
        else:
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                raise RowError(Reason.BAD_TIMESTAMP,
                               f"field '{field}': cannot parse {s[:40]!r} as ISO 8601") from None
            if not 1970 <= dt.year <= 9999:
                raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}': year {dt.year} out of range")
            return format_utc(dt)
    else:
        raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}': expected a timestamp, got {_describe(value)}")
    # Epoch seconds until ~5138 AD; larger values are milliseconds, microseconds, nanoseconds.
    if epoch >= 1e17:
        epoch /= 1e9
    elif epoch >= 1e14:
        epoch /= 1e6
    elif epoch >= 1e11:
        epoch /= 1e3
    try:
        return format_utc(datetime.fromtimestamp(epoch, UTC))
    except (OverflowError, OSError, ValueError):
        raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}': epoch {value!r} out of range") from None


#: The time of a record that carries none, has no document, parent or partner time, and whose
#: source has no configured fallback: a fixed date, never "now", marked "undated" in the evidence.
UNDATED_AT = "1970-01-01T00:00:00.000000Z"
UNDATED = "undated"


def dated(ctx: RowContext, *options: tuple[str, Any], required: bool = False) -> tuple[str, str]:
    """(recorded_at, where it came from) from the first of `options` — (label, value) pairs
    such as ("record:created", row.get("created")) or ("document:createdAt", ...) — that has a
    value; a value that is there but not a time refuses the row. With none: the source's
    configured fallback (`recorded_at` in its [sources.<name>] table), else UNDATED_AT marked
    "undated" (run-all says how many and how to date them) — never "now", which would make two
    runs on the same bytes differ. With `required` (the stream promises a time on every row),
    a row without one and without a configured fallback is refused as bad_timestamp."""
    for label, value in options:
        if value is None or value == "":
            continue
        return parse_timestamp(value, label.split(":", 1)[-1]), label
    if ctx.fallback_time is not None:
        return ctx.fallback_time, ctx.fallback_origin or "fallback"
    if required:
        names = [label.split(":", 1)[-1] for label, _ in options]
        tried = ", ".join(f"'{n}'" for n in names) or "its time field"
        raise RowError(Reason.BAD_TIMESTAMP, f"field {tried} is missing, so the row cannot be dated (or set "
                                             "recorded_at in its [sources.<name>] table of refinery.toml)",
                       names[0] if len(names) == 1 else None)
    return UNDATED_AT, UNDATED


# --- tool calls and messages --------------------------------------------------------------


def tool_call(raw: Any) -> dict[str, Any]:
    """Normalise one tool call to {id, name, arguments, problem}, keeping what was wrong.

    Accepts `{"name", "arguments"}` (object or JSON string), the OpenAI shape `{"id", "type":
    "function", "function": {"name", "arguments": "<JSON>"}}`, Anthropic's `{"type": "tool_use",
    "id", "name", "input"}` and inspect_ai's `{"id", "function": "<name>", "arguments"}`.
    """
    if not isinstance(raw, dict):
        return {"id": None, "name": None, "arguments": raw, "problem": "not_an_object"}
    call_id = raw.get("id")
    call_id = call_id if isinstance(call_id, str) else None
    body = raw["function"] if isinstance(raw.get("function"), dict) else raw
    problem = None
    name = body.get("name")
    if (not isinstance(name, str) or not name) and isinstance(raw.get("function"), str) and raw["function"]:
        name = raw["function"]
    if not isinstance(name, str) or not name:
        if isinstance(body.get("tool"), str):
            name, problem = body["tool"], "tool_key_instead_of_name"
        else:
            name, problem = None, "missing_name"
    args = body["arguments"] if "arguments" in body else body.get("args", body.get("input"))
    if isinstance(args, str):
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            problem = problem or "arguments_not_json"
    if problem is None and args is not None and not isinstance(args, dict):
        problem = "arguments_not_object"
    return {"id": call_id, "name": name, "arguments": args, "problem": problem}


_ROLES = {"system", "user", "assistant", "tool"}
#: Other names for the four roles in the formats operators have.
ROLE_ALIASES = {"developer": "system", "human": "user", "ai": "assistant", "model": "assistant",
                "bot": "assistant", "gpt": "assistant", "function": "tool", "ipython": "tool"}
_TEXT_PARTS = {"text", "input_text", "output_text"}


def content_text(content: Any) -> str | None:
    """Text of a message's content: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for p in content:
            if isinstance(p, str):
                texts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") in _TEXT_PARTS:
                value = p.get("text", p.get("value"))  # LLaMA-Factory's parts say "value"
                if isinstance(value, str):
                    texts.append(value)
        return "".join(texts) if texts or not content else None  # only tool/image parts: no text
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    raise TypeError


def messages(row: dict, field: str = "messages", value: Any = _MISSING) -> list[dict[str, Any]] | None:
    """Normalise a chat transcript: roles checked (aliases such as developer or human mapped),
    content parts joined, tool calls normalised in every vendor's shape, Anthropic tool_result
    blocks turned into tool messages, extra keys dropped."""
    if value is _MISSING:
        value = get(row, field)
    if value is None:
        return None
    if type(value) is not list:
        raise wrong_type(field, "a list of messages", value)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise wrong_type(f"{field}[{i}]", "a message object", m)
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if role not in _ROLES:
            raise RowError(Reason.WRONG_TYPE, f"field '{field}[{i}].role': unknown role {m.get('role')!r}")
        raw_content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise wrong_type(f"{field}[{i}].tool_calls", "a list", calls)
        calls = list(calls or [])
        results: list[dict[str, Any]] = []
        if raw_content is None and isinstance(m.get("parts"), list):  # OpenTelemetry GenAI's message shape
            raw_content, calls, results = _otel_parts(m["parts"], calls)
        if isinstance(raw_content, list):
            calls += [p for p in raw_content if isinstance(p, dict) and p.get("type") == "tool_use"]
            results = [p for p in raw_content if isinstance(p, dict) and p.get("type") == "tool_result"]
        try:
            content = content_text(raw_content)
        except TypeError:
            raise wrong_type(f"{field}[{i}].content", "a string", raw_content) from None
        name = m.get("name")
        if not isinstance(name, str) and role == "tool" and isinstance(m.get("function"), str):
            name = m["function"]  # inspect_ai names the tool of a tool message "function"
        call_id = m.get("tool_call_id")
        if not (results and not content and not calls):  # a message of tool results only becomes them
            out.append({
                "role": role,
                "content": content,
                "name": name if isinstance(name, str) else None,
                "tool_calls": [tool_call(c) for c in calls] if calls else None,
                "tool_call_id": call_id if isinstance(call_id, str) else None,
            })
        for r in results:
            try:
                text_ = content_text(r.get("content"))
            except TypeError:
                text_ = orjson.dumps(r.get("content")).decode()
            use_id = r.get("tool_use_id")
            out.append({"role": "tool", "content": text_, "name": None, "tool_calls": None,
                        "tool_call_id": use_id if isinstance(use_id, str) else None})
    return out


def _otel_parts(parts: list[Any], calls: list[Any]) -> tuple[list[Any] | None, list[Any], list[dict[str, Any]]]:
    """OpenTelemetry GenAI message parts (`{type: text, content}`, `{type: tool_call, id, name,
    arguments}`, `{type: tool_call_response, id, response}`) as content parts, calls, results."""
    content, results = [], []
    for p in parts:
        if not isinstance(p, dict):
            continue
        kind = p.get("type")
        if kind == "text" and isinstance(p.get("content"), str):
            content.append({"type": "text", "text": p["content"]})
        elif kind == "tool_call":
            calls = [*calls, {"id": p.get("id"), "name": p.get("name"), "arguments": p.get("arguments")}]
        elif kind == "tool_call_response":
            response = p.get("response", p.get("result"))
            results.append({"type": "tool_result", "tool_use_id": p.get("id"),
                            "content": response if isinstance(response, str) else orjson.dumps(response).decode()})
    return content or None, calls, results


def message(role: str, content: str | None, tool_calls: list[dict[str, Any]] | None = None,
            tool_call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    """One normalised message (the shape `messages()` returns), for importers that build them."""
    return {"role": role, "content": content, "name": name, "tool_calls": tool_calls or None,
            "tool_call_id": tool_call_id}


def first_user_text(msgs: list[dict[str, Any]] | None) -> str | None:
    for m in msgs or ():
        if m["role"] == "user" and m["content"]:
            return m["content"]
    return None


def last_assistant_text(msgs: list[dict[str, Any]] | None) -> str | None:
    for m in reversed(msgs or ()):
        if m["role"] == "assistant" and m["content"] is not None:
            return m["content"]
    return None


def all_tool_calls(msgs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [c for m in msgs or () if m["tool_calls"] for c in m["tool_calls"]]


class Turn(NamedTuple):
    """The answered turn of a conversation."""

    prompt: str | None
    """the conversation up to and including the last user message: that message's text when it
    is the only one, else the whole exchange rendered with role labels"""
    response: str | None
    """the last assistant text after the last user message"""
    tool_calls: list[dict[str, Any]]
    """the tool calls made after the last user message (the answer's), not earlier turns'"""


_LABEL = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def answered_turn(msgs: list[dict[str, Any]] | None) -> Turn:
    """Split a conversation at its last user message: the prompt is everything up to it, the
    answer everything after — never the first user turn paired with a later answer."""
    msgs = msgs or []
    last_user = last_user_index(msgs, default=-1)
    before, after = msgs[:last_user + 1], msgs[last_user + 1:]
    said = [m for m in before if m["role"] != "system"]
    if not said:
        prompt = None
    elif len(said) == 1:
        prompt = said[0]["content"] or None
    else:
        from refinery.normalize import render_tool_calls

        parts = []
        for m in said:
            text_ = m["content"] or ""
            if m["tool_calls"]:
                text_ = "\n".join(filter(None, [text_, render_tool_calls(m["tool_calls"])]))
            label = _LABEL[m["role"]] + (f" ({m['name']})" if m["role"] == "tool" and m["name"] else "")
            parts.append(f"{label}: {text_}")
        prompt = "\n\n".join(parts)
    return Turn(prompt, last_assistant_text(after), all_tool_calls(after))


# --- quality signals ------------------------------------------------------------------------

#: Score names where a lower value is the better one, unless [signals.<name>] says otherwise.
LOWER_IS_BETTER = frozenset({
    "toxicity", "toxic", "hallucination", "hallucinations", "bias", "harm", "harmfulness", "harmful",
    "jailbreak", "pii", "pii_leak", "error", "errors", "error_rate", "latency", "cost", "perplexity",
    "contradiction", "insensitivity", "misogyny", "criminality", "maliciousness", "profanity",
})
#: Categorical grades, as 0..1 (inspect_ai's C/I/P/N, pass/fail, thumbs, ...).
GRADES = {"c": 1.0, "correct": 1.0, "pass": 1.0, "passed": 1.0, "good": 1.0, "yes": 1.0, "true": 1.0,
          "thumbs_up": 1.0, "up": 1.0, "positive": 1.0, "accept": 1.0, "accepted": 1.0, "approved": 1.0,
          "p": 0.5, "partial": 0.5, "partially_correct": 0.5, "neutral": 0.5,
          "i": 0.0, "incorrect": 0.0, "fail": 0.0, "failed": 0.0, "bad": 0.0, "no": 0.0, "false": 0.0,
          "thumbs_down": 0.0, "down": 0.0, "negative": 0.0, "reject": 0.0, "rejected": 0.0, "n": 0.0,
          "wrong": 0.0}


@dataclass(frozen=True)
class ScoreRule:
    """How to read a named score: its direction and scale (refinery.toml [signals.<name>])."""

    higher_is_better: bool | None = None
    scale: tuple[float, float] | None = None
    by: Literal["human", "automated"] | None = None
    use: bool | None = None


def named_score(name: str, value: Any, *, by: str | None = None, scale: tuple[float, float] | None = None,
                higher_is_better: bool | None = None, use: bool | None = None, default_by: str | None = None,
                rules: dict[str, ScoreRule] | None = None) -> dict[str, Any]:
    """A quality signal with its name, raw value, scale and direction, normalised to 0..1
    (1 = best). Booleans and grades (C/I, pass/fail, ...) map to 1/0; a number is read on its
    scale (given, configured, or 0..1 when it fits; otherwise it is kept but not normalised).

    What the importer states about the score (its scale, direction, author — facts of the
    format, e.g. a promptfoo assertion's score is always 1 = passed) wins over refinery.toml
    [signals.<name>], which fills in what the format leaves open (`default_by`: the author to
    assume when neither the format nor the config says); whether a score is used is the
    operator's call when the table says so (`use`)."""
    rule = (rules or {}).get(name) or (rules or {}).get(name.lower()) or ScoreRule()
    if higher_is_better is None:
        higher_is_better = rule.higher_is_better
    if higher_is_better is None:
        higher_is_better = name.lower().replace("-", "_").replace(" ", "_") not in LOWER_IS_BETTER
    scale = scale or rule.scale
    by = by or rule.by or default_by
    used = rule.use if rule.use is not None else (use if use is not None else True)
    norm: float | None = None
    if isinstance(value, bool):
        norm = float(value)
    elif isinstance(value, (int, float)) and value == value and value not in (float("inf"), float("-inf")):
        lo, hi = scale if scale else (0.0, 1.0)
        if hi > lo and lo <= value <= hi:
            norm = (float(value) - lo) / (hi - lo)
    elif isinstance(value, str):
        norm = GRADES.get(value.strip().lower())
        if norm is None:
            try:
                return named_score(name, float(value), by=by, scale=scale, higher_is_better=higher_is_better,
                                   use=use, default_by=default_by, rules=rules) | {"value": value}
            except ValueError:
                pass
    else:
        value = None if not isinstance(value, (int, float)) else value
    if norm is not None and not higher_is_better:
        norm = 1.0 - norm
    return {"name": name, "value": value, "scale": list(scale) if scale else None,
            "higher_is_better": higher_is_better, "normalized": None if norm is None else round(norm, 6),
            "by": by if by in ("human", "automated") else None, "used": used}


def combine_scores(scores: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(eval_score, human_rating): the mean normalised automated scores and human scores (a score
    whose author is unknown counts as automated; one configured `use = false` is not counted)."""
    auto = [s["normalized"] for s in scores if s["normalized"] is not None and s["by"] != "human" and s["used"]]
    human = [s["normalized"] for s in scores if s["normalized"] is not None and s["by"] == "human" and s["used"]]
    mean = (lambda xs: round(sum(xs) / len(xs), 6) if xs else None)
    return mean(auto), mean(human)


# --- building the record ------------------------------------------------------------------


def new_signals(
    *, eval_score: float | None = None, expected: str | None = None, approved: bool | None = None,
    approver: str | None = None, human_rating: float | None = None, verdict: str | None = None,
    error: str | None = None, exit_status: int | None = None, tool_call_count: int | None = None,
    stop_reason: str | None = None, safety_flags: list[str] | None = None,
    scores: list[dict[str, Any]] | None = None, preference: str | None = None,
) -> dict[str, Any]:
    """Signals in the model's field order. `trust` is the materializer's to set (from the
    source's [sources.<name>] table), never a row's."""
    return {
        "eval_score": eval_score, "expected": expected, "approved": approved, "approver": approver,
        "human_rating": human_rating, "verdict": verdict, "error": error, "exit_status": exit_status,
        "tool_call_count": tool_call_count, "stop_reason": stop_reason,
        "safety_flags": safety_flags or [], "scores": scores or [], "preference": preference, "trust": None,
    }


def new_evidence(
    kind: str, *, recorded_at: str, recorded_at_from: str = "record", task_id: str | None = None,
    task_name: str | None = None, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
    response: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
    model: str | None = None, provider: str | None = None, latency_ms: float | None = None,
    prompt_tokens: int | None = None, completion_tokens: int | None = None,
    signals: dict[str, Any] | None = None, part: str | None = None,
) -> dict[str, Any]:
    """An evidence dict in EvidenceRecord's field order; the materializer fills the envelope.

    `recorded_at_from` says where the time came from ("record:<field>", "document:<field>",
    "parent:<field>", "partner:<field>", or the configured fallback); `part` names this answer
    when one record makes several evidence records (e.g. "chosen" / "rejected")."""
    ev = {
        "schema_version": 2, "id": None, "source": None, "kind": kind,
        "task_id": task_id, "task_name": task_name, "prompt": prompt, "messages": messages,
        "response": response, "tool_calls": tool_calls or [], "model": model,
        "provider": provider, "latency_ms": latency_ms, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "signals": signals or new_signals(),
        "recorded_at": recorded_at, "recorded_at_from": recorded_at_from, "provenance": None,
    }
    if part is not None:
        ev[PART_KEY] = part
    return ev


#: Where `new_evidence` keeps the part name until the materializer moves it into the provenance.
PART_KEY = "_part"
