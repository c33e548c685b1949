"""The transform contract, and the helpers transform modules use.

A transform module in `transforms/` defines

    SPEC = TransformSpec(name=..., patterns=(...), format="jsonl" | "csv", kind=...)

    def transform(row: dict, ctx: RowContext) -> dict | Refusal: ...

and returns an evidence dict built with `new_evidence(...)`, or refuses the row — by
returning a `Refusal` or raising `RowError` (the field helpers below raise it for missing
fields and wrong types). The materializer adds `id`, `source` and `provenance`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson

from refinery.reasons import Reason


@dataclass(frozen=True)
class TransformSpec:
    name: str
    patterns: tuple[str, ...]
    """fnmatch globs on the file's path relative to data/_kb (e.g. "runs*.csv")."""
    format: Literal["jsonl", "csv"]
    kind: str
    description: str = ""


class Refusal(NamedTuple):
    reason: Reason
    detail: str


class RowError(Exception):
    """Raised inside a transform to refuse the current row."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class RowContext:
    """What a transform may know about where the row comes from."""

    source: str
    source_file: str
    line_offset: int = 0


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
    return RowError(Reason.MISSING_FIELD, f"field '{field}' is missing or empty")


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
    dt = dt.astimezone(UTC) if dt.tzinfo else dt
    base = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    return f"{base}.{dt.microsecond:06d}Z" if dt.microsecond else f"{base}Z"


_CANONICAL_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z").fullmatch


def parse_timestamp(value: Any, field: str = "timestamp") -> str:
    """ISO 8601 (naive = UTC) or epoch s/ms/µs/ns → 'YYYY-MM-DDTHH:MM:SS[.ffffff]Z'."""
    if value is None or value == "":
        raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}' is missing, so the row cannot be dated")
    t = type(value)
    epoch: float | None = None
    if t is int or t is float:
        epoch = float(value)
    elif t is str:
        s = value.strip()
        if _CANONICAL_TS(s):  # already UTC "YYYY-MM-DDTHH:MM:SS[.ffffff]Z": just check it is a real time
            try:
                datetime.fromisoformat(s)
                return s
            except ValueError:
                raise RowError(Reason.BAD_TIMESTAMP, f"field '{field}': {s!r} is not a valid time") from None
        if s.replace(".", "", 1).isdigit():
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


# --- tool calls and messages --------------------------------------------------------------


def tool_call(raw: Any) -> dict[str, Any]:
    """Normalise one tool call to {id, name, arguments, problem}, keeping what was wrong.

    Accepts `{"name", "arguments"}` (object or JSON string) and the OpenAI shape
    `{"id", "type": "function", "function": {"name", "arguments"}}`.
    """
    if not isinstance(raw, dict):
        return {"id": None, "name": None, "arguments": raw, "problem": "not_an_object"}
    call_id = raw.get("id")
    call_id = call_id if isinstance(call_id, str) else None
    body = raw["function"] if isinstance(raw.get("function"), dict) else raw
    problem = None
    name = body.get("name")
    if not isinstance(name, str) or not name:
        if isinstance(body.get("tool"), str):
            name, problem = body["tool"], "tool_key_instead_of_name"
        else:
            name, problem = None, "missing_name"
    args = body.get("arguments", body.get("args"))
    if isinstance(args, str):
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            problem = problem or "arguments_not_json"
    if problem is None and args is not None and not isinstance(args, dict):
        problem = "arguments_not_object"
    return {"id": call_id, "name": name, "arguments": args, "problem": problem}


_ROLES = {"system", "user", "assistant", "tool"}


def messages(row: dict, field: str = "messages") -> list[dict[str, Any]] | None:
    """Normalise a chat transcript: roles checked, tool calls normalised, extra keys dropped."""
    value = get(row, field)
    if value is None:
        return None
    if type(value) is not list:
        raise wrong_type(field, "a list of messages", value)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise wrong_type(f"{field}[{i}]", "a message object", m)
        role = m.get("role")
        if role not in _ROLES:
            raise RowError(Reason.WRONG_TYPE, f"field '{field}[{i}].role': unknown role {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is not None and not isinstance(content, str):
            raise wrong_type(f"{field}[{i}].content", "a string", content)
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise wrong_type(f"{field}[{i}].tool_calls", "a list", calls)
        name = m.get("name")
        call_id = m.get("tool_call_id")
        out.append({
            "role": role,
            "content": content,
            "name": name if isinstance(name, str) else None,
            "tool_calls": [tool_call(c) for c in calls] if calls else None,
            "tool_call_id": call_id if isinstance(call_id, str) else None,
        })
    return out


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


# --- building the record ------------------------------------------------------------------


def new_signals(
    *, eval_score: float | None = None, expected: str | None = None, approved: bool | None = None,
    approver: str | None = None, human_rating: float | None = None, verdict: str | None = None,
    error: str | None = None, exit_status: int | None = None, tool_call_count: int | None = None,
    stop_reason: str | None = None, safety_flags: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "eval_score": eval_score, "expected": expected, "approved": approved, "approver": approver,
        "human_rating": human_rating, "verdict": verdict, "error": error, "exit_status": exit_status,
        "tool_call_count": tool_call_count, "stop_reason": stop_reason,
        "safety_flags": safety_flags or [],
    }


def new_evidence(
    kind: str, *, recorded_at: str, task_id: str | None = None, task_name: str | None = None,
    prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
    response: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
    model: str | None = None, provider: str | None = None, latency_ms: float | None = None,
    prompt_tokens: int | None = None, completion_tokens: int | None = None,
    signals: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An evidence dict in EvidenceRecord's field order; the materializer fills the envelope."""
    return {
        "schema_version": 1, "id": None, "source": None, "kind": kind,
        "task_id": task_id, "task_name": task_name, "prompt": prompt, "messages": messages,
        "response": response, "tool_calls": tool_calls or [], "model": model,
        "provider": provider, "latency_ms": latency_ms, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "signals": signals or new_signals(),
        "recorded_at": recorded_at, "provenance": None,
    }
