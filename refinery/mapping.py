"""Declarative transforms: onboard a stream from refinery.toml, without code.

    [mappings.support_bot]
    match = "support_bot*.jsonl"
    kind = "chat"
    [mappings.support_bot.fields]
    recorded_at = "ts"
    prompt = "input.question"      # a column name or a dotted JSON path
    response = "output.text"
    score = "grade"
    approver = "reviewed_by"

Version 2 adds, for formats that are not built in (see the README, "Bring your own traces"):

- documents: `record_paths = ["resourceSpans[].scopeSpans[].spans[]"]`;
- lookups by key inside lists: `attributes[key=gen_ai.request.model].value.stringValue`;
- a row filter: `filter = {type = "GENERATION"}` (other rows are quarantined as filtered_out);
- the answer as messages (`response_messages`) and its tool calls (`tool_calls`), a `system` text,
  role renaming (`roles = {human = "user"}`) and message keys (`message_keys = {role = "from"}`);
- value conversions: a field may be `{path = "...", convert = ["json", "seconds_to_ms"]}`, the
  first present of several paths (`["a", "b"]`), joined texts (`{join = ["a", "b"]}`), or the
  milliseconds between two times (`{start = "startTime", end = "endTime"}`);
- named scores with scale and direction (`[mappings.<name>.scores.toxicity] field = "tox",
  higher_is_better = false`).

A wrong-typed *optional* field does not cost the row: it is dropped and counted (run-all says
how many per field); a missing or wrong-typed prompt/messages, or an unparseable time, still
refuses the row with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from refinery import transform as t
from refinery.config import FieldExpr, Mapping
from refinery.reasons import Reason
from refinery.transform import FieldHits, RowContext, RowError, TransformSpec

_MISSING = object()
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]|\[([^=\]]+)=([^\]]*)\]|\.")


def parse_path(path: str) -> list[tuple[str, Any]]:
    """`a.b[2].attrs[key=gen_ai.x].value` → [("key", "a"), ("key", "b"), ("index", 2),
    ("key", "attrs"), ("match", ("key", "gen_ai.x")), ("key", "value")]. Raises ValueError."""
    if not path or path.strip() != path:
        raise ValueError(f"path {path!r}: empty or padded with spaces")
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if not m or m.end() == pos:
            raise ValueError(f"path {path!r}: cannot read it at {path[pos:]!r} (use a.b, a[0], a[key=value])")
        if m.group(1) is not None:
            steps.append(("key", m.group(1)))
        elif m.group(2) is not None:
            steps.append(("index", int(m.group(2))))
        elif m.group(3) is not None:
            steps.append(("match", (m.group(3).strip(), m.group(4).strip())))
        pos = m.end()
    if not steps:
        raise ValueError(f"path {path!r}: no field in it")
    return steps


def lookup(row: Any, path: str) -> Any:
    """The value at `path` in `row`, or None. A whole column name (even with dots) wins."""
    if isinstance(row, dict) and path in row:
        return row[path]
    cur = row
    for kind, arg in parse_path(path):
        if kind == "key":
            if not isinstance(cur, dict) or arg not in cur:
                return None
            cur = cur[arg]
        elif kind == "index":
            if not isinstance(cur, list) or arg >= len(cur):
                return None
            cur = cur[arg]
        else:
            key, want = arg
            if not isinstance(cur, list):
                return None
            cur = next((x for x in cur if isinstance(x, dict) and str(x.get(key)) == want), None)
            if cur is None:
                return None
    return cur


def otel_value(v: Any) -> Any:
    """Unwrap an OTLP AnyValue ({stringValue}, {intValue: "12"}, {arrayValue: {values}}, ...)."""
    if isinstance(v, dict) and len(v) == 1:
        (k, x), = v.items()
        if k == "intValue":
            return int(x) if isinstance(x, (int, str)) and str(x).lstrip("-").isdigit() else x
        if k in ("stringValue", "doubleValue", "boolValue", "bytesValue"):
            return x
        if k == "arrayValue":
            values = x.get("values") if isinstance(x, dict) else None
            return [otel_value(i) for i in values] if isinstance(values, list) else None
        if k == "kvlistValue":
            values = x.get("values") if isinstance(x, dict) else None
            return {kv["key"]: otel_value(kv.get("value")) for kv in values
                    if isinstance(kv, dict) and isinstance(kv.get("key"), str)} if isinstance(values, list) else None
    if isinstance(v, dict) and "value" in v and "key" in v:  # an attribute {key, value}
        return otel_value(v["value"])
    return v


def _convert(value: Any, how: str, field: str) -> Any:
    if value is None:
        return None
    if how == "json":
        if not isinstance(value, str):
            return value  # already parsed
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise t.wrong_type(field, "JSON text", value) from None
    if how in ("seconds_to_ms", "ns_to_ms", "us_to_ms"):
        n = t.number({"v": value}, "v")
        return n * {"seconds_to_ms": 1000.0, "ns_to_ms": 1e-6, "us_to_ms": 1e-3}[how]
    if how == "otel_value":
        return otel_value(value)
    if how == "string":
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if how == "number":
        return t.number({"v": value}, "v")
    if how == "first":
        return value[0] if isinstance(value, list) and value else (None if isinstance(value, list) else value)
    if how == "lower":
        return value.lower() if isinstance(value, str) else value
    raise ValueError(how)


def _resolve(row: Any, spec: Any, field: str, hits: FieldHits | None = None) -> Any:
    """The value of one field (a FieldExpr) in a row; `hits` counts the field when its path
    finds a value (before conversions)."""
    if spec is None:
        return None
    if spec.start is not None:
        start, end = lookup(row, spec.start), lookup(row, spec.end)
        if start in (None, "") or end in (None, ""):
            return None
        if hits is not None:
            hits.found[field] += 1
        from datetime import datetime

        a = datetime.fromisoformat(t.parse_timestamp(start, spec.start))
        b = datetime.fromisoformat(t.parse_timestamp(end, spec.end))
        value: Any = max((b - a).total_seconds() * 1000.0, 0.0)
    elif spec.join is not None:
        parts = [v for p in spec.join if (v := lookup(row, p)) not in (None, "")]
        value = spec.sep.join(p if isinstance(p, str) else orjson.dumps(p).decode() for p in parts) or None
    else:
        paths = [spec.path] if isinstance(spec.path, str) else spec.path
        if len(paths) == 1:
            value = lookup(row, paths[0])  # "" stays "": an empty answer is a signal, not a gap
        else:
            value = next((v for p in paths if (v := lookup(row, p)) not in (None, "")), None)
    if hits is not None and value is not None:
        hits.found[field] += 1
    for how in spec.conversions():
        value = _convert(value, how, field)
    return value


def mapping_spec(name: str, m: Mapping) -> TransformSpec:
    fmt = m.format or ("csv" if m.match.lower().removesuffix(".gz").endswith(".csv") else "json")
    return TransformSpec(name=f"mapping:{name}", patterns=(m.match,), format=fmt, kind=m.kind,
                         record_paths=tuple(m.record_paths),
                         description=f"declarative mapping [mappings.{name}] in refinery.toml")


def mapping_transform(m: Mapping, rules: dict[str, Any] | None = None) -> Callable[[dict, RowContext], Any]:
    f = m.fields
    approved_values = {v.lower() for v in m.approved_values}
    filters = [(path, {str(v) for v in (want if isinstance(want, list) else [want])})
               for path, want in sorted(m.filter.items())]
    role_key, content_key = m.message_keys.get("role", "role"), m.message_keys.get("content", "content")

    def messages_of(value: Any, field: str) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise t.wrong_type(field, "a list of messages", value)
        if m.roles or role_key != "role" or content_key != "content":
            renamed = []
            for msg in value:
                if isinstance(msg, dict):
                    role = msg.get(role_key)
                    msg = {**msg, "role": m.roles.get(role, role) if isinstance(role, str) else role,
                           "content": msg.get(content_key)}
                renamed.append(msg)
            value = renamed
        return t.messages({}, field, value)

    def transform(row: dict, ctx: RowContext) -> dict[str, Any]:
        hits = ctx.hits
        if hits is not None:
            hits.records += 1
        for path, allowed in filters:
            got = lookup(row, path)
            if hits is not None and got is not None:
                hits.found[f"filter:{path}"] += 1
            if str(got) not in allowed:
                return t.Refusal(Reason.FILTERED_OUT, f"{path} is {got!r}, the mapping keeps only "
                                                      f"{' / '.join(sorted(allowed))}")
        if hits is not None:
            hits.kept += 1

        def required(field: str) -> Any:
            try:
                return _resolve(row, getattr(f, field), field, hits)
            except RowError:
                raise
            except (ValueError, TypeError) as e:
                raise RowError(Reason.WRONG_TYPE, f"field '{field}': {e}") from None

        def optional(field: str, read: Callable[[dict, str], Any] | None = None, spec: Any = None) -> Any:
            """An optional field: a wrong-typed value is dropped and counted, not the row."""
            spec = spec if spec is not None else getattr(f, field)
            if spec is None:
                return None
            try:
                value = _resolve(row, spec, field, hits)
                return read({field: value}, field) if read is not None else value
            except (RowError, ValueError, TypeError, AttributeError):
                if ctx.dropped is not None:
                    ctx.dropped[field] += 1
                return None

        time_value = required("recorded_at") if f.recorded_at is not None else None
        label = _name(f.recorded_at) or "recorded_at"
        recorded_at, when = t.dated(ctx, (f"record:{label}", time_value), required=f.recorded_at is not None)
        msgs = messages_of(required("messages"), "messages") if f.messages else None
        system = optional("system", t.text)
        if system:
            msgs = [{"role": "system", "content": system, "name": None, "tool_calls": None, "tool_call_id": None},
                    *(msgs or [])]
        answer_msgs = None
        if f.response_messages is not None:
            try:
                answer_msgs = messages_of(required("response_messages"), "response_messages")
            except RowError:
                if ctx.dropped is not None:
                    ctx.dropped["response_messages"] += 1
            if answer_msgs:
                answer_msgs = [{**a, "role": a["role"] if a["role"] != "user" else "assistant"} for a in answer_msgs]
        calls = None
        if f.tool_calls is not None:
            raw_calls = optional("tool_calls")
            if isinstance(raw_calls, dict):
                raw_calls = [raw_calls]
            if isinstance(raw_calls, list):
                calls = [t.tool_call(c) for c in raw_calls]
            elif raw_calls is not None and ctx.dropped is not None:
                ctx.dropped["tool_calls"] += 1
        full = [*(msgs or []), *(answer_msgs or [])]
        if calls and not answer_msgs:
            full.append({"role": "assistant", "content": None, "name": None, "tool_calls": calls, "tool_call_id": None})
        turn = t.answered_turn(full) if full else t.Turn(None, None, [])
        prompt = t.text({"prompt": required("prompt")}, "prompt") if f.prompt else turn.prompt
        if prompt is None:
            raise t.missing(_name(f.prompt) or _name(f.messages) or "prompt")
        if f.response is not None:
            response = optional("response", t.text_or_empty)
        else:
            response = turn.response
        tool_calls = turn.tool_calls if full else []
        score = optional("score", t.number)
        rating = optional("rating", t.number)
        approved = None
        raw = optional("approved")
        if isinstance(raw, bool):
            approved = raw
        elif raw not in (None, ""):
            approved = str(raw).strip().lower() in approved_values
        named = []
        for sname, sf in sorted(m.scores.items()):
            value = optional(f"scores.{sname}", spec=sf.field)
            if value is not None:
                named.append(t.named_score(sname, value, by=sf.by, scale=sf.scale,
                                           higher_is_better=sf.higher_is_better, rules=rules))
        eval_score, human = t.combine_scores(named)
        if score is not None:
            eval_score = score / m.score_scale
            if not 0.0 <= eval_score <= 1.0:
                if ctx.dropped is not None:
                    ctx.dropped["score"] += 1
                eval_score = None
        if rating is not None:
            human = rating / m.rating_scale
        has_convo = msgs is not None or answer_msgs is not None or calls is not None
        return t.new_evidence(
            m.kind, recorded_at=recorded_at, recorded_at_from=when,
            task_id=optional("task_id", t.text) or optional("id", t.text), task_name=optional("task_name", t.text),
            prompt=prompt, messages=full or None, response=response, tool_calls=tool_calls,
            model=optional("model", t.text), provider=optional("provider", t.text),
            latency_ms=optional("latency_ms", t.number), prompt_tokens=optional("prompt_tokens", t.integer),
            completion_tokens=optional("completion_tokens", t.integer),
            signals=t.new_signals(
                eval_score=eval_score, expected=optional("expected", t.text), approved=approved,
                approver=optional("approver", t.text), human_rating=human,
                error=optional("error", t.text), tool_call_count=len(tool_calls) if has_convo else None,
                stop_reason=optional("stop_reason", t.text), scores=named,
            ),
        )

    return transform


def mapping_paths(m: Mapping) -> dict[str, str]:
    """Every path a mapping reads, by the name its transform counts hits under (a field,
    `scores.<name>`, `filter:<path>`) → the path(s) as written in refinery.toml."""
    out = {name: _name(spec) for name, spec in m.fields if spec is not None}
    out.update({f"scores.{name}": _name(sf.field) for name, sf in sorted(m.scores.items())})
    out.update({f"filter:{path}": path for path in sorted(m.filter)})
    return out


def unmatched_paths(table: str, paths: dict[str, str], hits: FieldHits) -> list[str]:
    """What to say about the paths of a mapping that found a value in no record of a file."""
    out = []
    for name, path in paths.items():
        if hits.found[name]:
            continue
        if name.startswith("filter:"):
            if hits.records:
                out.append(f"{table} filter path {path!r} matches nothing in any of its {hits.records:,} "
                           "records, so every one was quarantined as filtered_out: check the path against a record")
        elif hits.kept:
            key = f"scores.{name.removeprefix('scores.')}.field" if name.startswith("scores.") else f"fields.{name}"
            out.append(f"{table} {key} = {path!r} matches nothing in any of its {hits.kept:,} records: check the "
                       "path against a record (a column name, or a dotted path such as output.text)")
    return out


def _name(spec: FieldExpr | None) -> str | None:
    return None if spec is None else " or ".join(spec.paths())
