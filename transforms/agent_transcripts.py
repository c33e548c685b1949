"""Agent transcripts (`agent_transcripts*.jsonl`): a whole conversation with tool calls.

    {"trace_id", "task_id", "task_name", "started_at", "model", "provider", "latency_ms",
     "messages": [{"role", "content", "tool_calls": [{"id", "name", "arguments": {...}}]},
                  {"role": "tool", "tool_call_id", "name", "content"}, ...],
     "status": "completed" | "error" | "max_turns", "error", "stop_reason",
     "outcome": {"score": 0..1, "reviewed_by": "who signed it off" | null}}   (optional)

The prompt is the conversation up to the last user message (the user's words alone when they
asked once), the response the last assistant text after it; the tool calls made after it are
the answer's, malformed ones (a "tool" key instead of "name") marked as such.
"""

from refinery.transform import (
    TransformSpec, answered_turn, messages, missing,
    new_evidence, new_signals, number, parse_timestamp, text, unit_score,
)

SPEC = TransformSpec(name="agent_transcripts", patterns=("agent_transcripts*.jsonl",), format="jsonl",
                     kind="transcript", description="agent conversations with tool calls (JSONL)")


def transform(row, ctx):
    recorded_at = parse_timestamp(row.get("started_at"), "started_at")
    msgs = messages(row, "messages")
    if not msgs:
        raise missing("messages")
    turn = answered_turn(msgs)
    prompt = turn.prompt
    if prompt is None:
        raise missing("messages[role=user].content")
    calls = turn.tool_calls
    reviewer = text(row, "outcome.reviewed_by")
    status = text(row, "status")
    error = text(row, "error")
    if error is None and status not in (None, "completed", "ok", "success"):
        error = f"status {status}"
    return new_evidence(
        SPEC.kind, recorded_at=recorded_at, recorded_at_from="record:started_at",
        task_id=text(row, "task_id") or text(row, "trace_id"), task_name=text(row, "task_name"),
        prompt=prompt, messages=msgs, response=turn.response, tool_calls=calls,
        model=text(row, "model"), provider=text(row, "provider"), latency_ms=number(row, "latency_ms"),
        signals=new_signals(error=error, tool_call_count=len(calls), stop_reason=text(row, "stop_reason"),
                            eval_score=unit_score(row, "outcome.score"), approved=True if reviewer else None,
                            approver=reviewer),
    )
