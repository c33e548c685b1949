"""Declarative transforms: onboard a JSONL/CSV stream from refinery.toml, without code.

    [mappings.support_bot]
    match = "support_bot*.jsonl"
    kind = "chat"
    [mappings.support_bot.fields]
    recorded_at = "ts"
    prompt = "input.question"      # a column name or a dotted JSON path
    response = "output.text"
    score = "grade"
    approver = "reviewed_by"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refinery import transform as t
from refinery.config import Mapping
from refinery.transform import RowContext, TransformSpec


def mapping_spec(name: str, m: Mapping) -> TransformSpec:
    fmt = m.format or ("csv" if m.match.lower().endswith(".csv") else "jsonl")
    return TransformSpec(name=f"mapping:{name}", patterns=(m.match,), format=fmt, kind=m.kind,
                         description=f"declarative mapping [mappings.{name}] in refinery.toml")


def mapping_transform(m: Mapping, rules: dict[str, Any] | None = None) -> Callable[[dict, RowContext], dict[str, Any]]:
    f = m.fields
    approved_values = {v.lower() for v in m.approved_values}

    def transform(row: dict, ctx: RowContext) -> dict[str, Any]:
        def opt(read, path):
            return read(row, path) if path else None

        recorded_at, when = t.dated(ctx, (f"record:{f.recorded_at}", t.get(row, f.recorded_at)))
        msgs = t.messages(row, f.messages) if f.messages else None
        prompt = t.text(row, f.prompt) if f.prompt else t.first_user_text(msgs)
        if prompt is None:
            raise t.missing(f.prompt or f.messages or "prompt")
        response = t.text_or_empty(row, f.response) if f.response else t.last_assistant_text(msgs)
        score = opt(t.number, f.score)
        rating = opt(t.number, f.rating)
        approved = None
        if f.approved:
            raw = t.get(row, f.approved)
            if isinstance(raw, bool):
                approved = raw
            elif raw not in (None, ""):
                approved = str(raw).strip().lower() in approved_values
        error = opt(t.text, f.error)
        calls = t.all_tool_calls(msgs)
        return t.new_evidence(
            m.kind, recorded_at=recorded_at, recorded_at_from=when,
            task_id=opt(t.text, f.task_id) or opt(t.text, f.id), task_name=opt(t.text, f.task_name),
            prompt=prompt, messages=msgs, response=response, tool_calls=calls,
            model=opt(t.text, f.model), provider=opt(t.text, f.provider),
            latency_ms=opt(t.number, f.latency_ms), prompt_tokens=opt(t.integer, f.prompt_tokens),
            completion_tokens=opt(t.integer, f.completion_tokens),
            signals=t.new_signals(
                eval_score=None if score is None else score / m.score_scale,
                expected=opt(t.text, f.expected), approved=approved, approver=opt(t.text, f.approver),
                human_rating=None if rating is None else rating / m.rating_scale,
                error=error, tool_call_count=len(calls) if msgs is not None else None,
                stop_reason=opt(t.text, f.stop_reason),
            ),
        )

    return transform
