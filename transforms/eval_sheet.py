"""Eval sheets (`eval*.csv`): a graded answer per row.

Columns: eval_id, task_id, task_name, prompt, expected, output, score, approver,
evaluated_at. A non-empty approver means the answer was approved. Scores in 0..1, or 0..100
(then divided by 100).
"""

from refinery.transform import (
    TransformSpec, new_evidence, new_signals, parse_timestamp, text, text_or_empty, unit_score,
)

SPEC = TransformSpec(name="eval_sheet", patterns=("eval*.csv",), format="csv", kind="eval",
                     description="eval sheet: prompt, expected, output, score, approver (CSV)")


def transform(row, ctx):
    score = unit_score(row, "score")
    approver = text(row, "approver")
    return new_evidence(
        SPEC.kind, recorded_at=parse_timestamp(row.get("evaluated_at"), "evaluated_at"),
        recorded_at_from="record:evaluated_at",
        task_id=text(row, "task_id") or text(row, "eval_id"), task_name=text(row, "task_name"),
        prompt=text(row, "prompt", required=True), response=text_or_empty(row, "output"),
        signals=new_signals(eval_score=score, expected=text(row, "expected"),
                            approved=True if approver else None, approver=approver),
    )
