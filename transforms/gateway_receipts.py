"""Gateway chat receipts (`gateway_receipts*.jsonl`): one proxied LLM call per row.

    {"request_id", "ts" (epoch ms or ISO), "provider", "model", "latency_ms",
     "usage": {"prompt_tokens", "completion_tokens"}, "prompt", "completion",
     "finish_reason", "status_code"}
"""

from refinery.transform import (
    TransformSpec, integer, new_evidence, new_signals, number, parse_timestamp, text, text_or_empty,
)

SPEC = TransformSpec(name="gateway_receipts", patterns=("gateway_receipts*.jsonl",), format="jsonl",
                     kind="gateway_call", description="LLM gateway receipts: provider, model, latency, tokens")


def transform(row, ctx):
    status = integer(row, "status_code")
    return new_evidence(
        SPEC.kind, recorded_at=parse_timestamp(row.get("ts"), "ts"),
        recorded_at_from="record:ts",
        task_id=text(row, "request_id"), prompt=text(row, "prompt", required=True),
        response=text_or_empty(row, "completion"), model=text(row, "model"), provider=text(row, "provider"),
        latency_ms=number(row, "latency_ms"), prompt_tokens=integer(row, "usage.prompt_tokens"),
        completion_tokens=integer(row, "usage.completion_tokens"),
        signals=new_signals(error=f"HTTP {status}" if status is not None and status >= 400 else None,
                            stop_reason=text(row, "finish_reason")),
    )
