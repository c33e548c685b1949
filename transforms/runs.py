"""Per-task run logs (`runs*.csv`): one row per task execution, with exit status and errors.

Columns: run_id, task_id, task_name, started_at, finished_at, model, prompt, output,
exit_status, error, tool_calls (a count), stop_reason, and optionally check_score (an
automated checker's score, 0..1 or 0..100) and reviewed_by (who signed the run off). refinery's own training runs land
here too (task_name = distill_train), so they become evidence for the next run.
"""

from refinery.transform import (
    RowError, TransformSpec, integer, new_evidence, new_signals, parse_timestamp, text, text_or_empty,
    unit_score,
)

SPEC = TransformSpec(name="runs", patterns=("runs*.csv",), format="csv", kind="run",
                     description="per-task run log (CSV)")


def _latency_ms(started: str, finished: str | None) -> float | None:
    if finished is None:
        return None
    try:
        end = parse_timestamp(finished, "finished_at")
    except RowError:
        return None
    from datetime import datetime

    delta = datetime.fromisoformat(end) - datetime.fromisoformat(started)
    return max(delta.total_seconds() * 1000.0, 0.0)


def transform(row, ctx):
    recorded_at = parse_timestamp(row.get("started_at"), "started_at")
    reviewer = text(row, "reviewed_by")
    return new_evidence(
        SPEC.kind, recorded_at=recorded_at, recorded_at_from="record:started_at",
        task_id=text(row, "task_id") or text(row, "run_id"), task_name=text(row, "task_name"),
        prompt=text(row, "prompt", required=True), response=text_or_empty(row, "output"),
        model=text(row, "model"), latency_ms=_latency_ms(recorded_at, text(row, "finished_at")),
        signals=new_signals(
            error=text(row, "error"), exit_status=integer(row, "exit_status"),
            tool_call_count=integer(row, "tool_calls"), stop_reason=text(row, "stop_reason"),
            eval_score=unit_score(row, "check_score"), approved=True if reviewer else None, approver=reviewer,
        ),
    )
