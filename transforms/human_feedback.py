"""Human feedback (`human_feedback*.jsonl`): a reviewer's rating of one answer.

    {"feedback_id", "created_at", "reviewer", "task_id", "task_name", "prompt", "response",
     "rating": 1..5, "thumbs": "up" | "down", "comment"}

The 1..5 rating is normalised to 0..1; thumbs up/down count as the reviewer's approval.
"""

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, new_evidence, new_signals, number, parse_timestamp, text, text_or_empty,
)

SPEC = TransformSpec(name="human_feedback", patterns=("human_feedback*.jsonl",), format="jsonl",
                     kind="feedback", description="human ratings and thumbs (JSONL)")


def transform(row, ctx):
    rating = number(row, "rating")
    if rating is not None and not 1 <= rating <= 5:
        raise RowError(Reason.WRONG_TYPE, f"field 'rating': {rating} is outside 1..5")
    thumbs = text(row, "thumbs")
    if thumbs not in (None, "up", "down"):
        raise RowError(Reason.WRONG_TYPE, f"field 'thumbs': expected 'up' or 'down', got {thumbs!r}")
    response = text_or_empty(row, "response")
    if response is None:
        raise RowError(Reason.MISSING_FIELD, "field 'response' is missing: feedback on no answer")
    human = (rating - 1) / 4 if rating is not None else (None if thumbs is None else float(thumbs == "up"))
    return new_evidence(
        SPEC.kind, recorded_at=parse_timestamp(row.get("created_at"), "created_at"),
        recorded_at_from="record:created_at",
        task_id=text(row, "task_id") or text(row, "feedback_id"), task_name=text(row, "task_name"),
        prompt=text(row, "prompt", required=True), response=response,
        signals=new_signals(human_rating=human, approved=None if thumbs is None else thumbs == "up",
                            approver=text(row, "reviewer")),
    )
