"""refinery's own replays (`replays*.jsonl`): one `refinery replay` per row, so the local model's
answers become evidence for the next run.

    {"schema_version", "replay_id", "ts", "task", "mode": "retrieval" | "no_retrieval",
     "rag_export_sha256", "retrieved": [{"id", "score"}], "model", "adapter_id",
     "local_answer", "local_check", "local_finish_reason", "local_latency_ms",
     "escalated", "escalation": {"endpoint", "model", "ok", "error", "latency_ms"} | null,
     "answer", "tool_calls": [{"name", "arguments"}], "check", "latency_ms"}

The response is the answer that was served (the endpoint's when escalated). An answer that
still fails its check (empty, malformed tool call, over the length cap) or a failed escalation
is an error signal, a refusal a safety flag, so the scorer rejects them; a replay carries no
quality signal of its own, so a good one waits for a human (needs_human_review).
"""

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, boolean, get, new_evidence, new_signals, number, parse_timestamp, text,
    text_or_empty, tool_call,
)

SPEC = TransformSpec(name="replays", patterns=("replays*.jsonl",), format="jsonl", kind="replay",
                     description="refinery's own replays: task, retrieved playbooks, model, answer, escalation")


def transform(row, ctx):
    recorded_at = parse_timestamp(row.get("ts"), "ts")
    calls = get(row, "tool_calls") or []
    if not isinstance(calls, list):
        raise RowError(Reason.WRONG_TYPE, "field 'tool_calls': expected a list")
    escalated = boolean(row, "escalated") is True
    check = text(row, "check")
    escalation_error = text(row, "escalation.error")
    error = (f"escalation failed: {escalation_error}" if escalation_error
             else f"answer failed its check: {check}" if check and check != "refusal" else None)
    return new_evidence(
        SPEC.kind, recorded_at=recorded_at, recorded_at_from="record:ts", task_id=text(row, "replay_id"),
        task_name="replay",
        prompt=text(row, "task", required=True), response=text_or_empty(row, "answer"),
        tool_calls=[tool_call(c) for c in calls],
        model=text(row, "escalation.model") if escalated else _local_model(row),
        provider="escalation" if escalated else "mlx-lm", latency_ms=number(row, "latency_ms"),
        signals=new_signals(error=error, stop_reason=None if escalated else text(row, "local_finish_reason"),
                            safety_flags=["refusal"] if check == "refusal" else None),
    )


def _local_model(row):
    base, adapter = text(row, "model"), text(row, "adapter_id")
    return f"{base} + {adapter}" if base and adapter else base
