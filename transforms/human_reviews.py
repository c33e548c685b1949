"""Human reviews (`human_reviews*.jsonl`): a person's decision on a row of the review queue.

Written by `refinery review import` (line format: refinery/decisions.py), not by hand. Each
decision is evidence of what a person said about an answer to the reviewed row's prompt:

    accept   the reviewed answer, approved (human_rating 1)
    reject   the reviewed answer, disapproved (human_rating 0)
    correct  the reviewer's corrected answer, approved: a new candidate for the same task, which
             the preference export pairs over the original (score rejects that one)

The row decided on is named by `review_id` and `reviewed` (its evidence line); score moves it
out of needs_human_review. Decisions on the same row as it read then are joined: repeats of
one decision are duplicate_row, and decisions that differ (only a hand edit makes them) are
all refused as conflicting_decisions — score then leaves the row to review. A line whose copy
of the reviewed text no longer hashes to its answer_sha256 is refused (edited_decision): it
would approve text nobody read. A decision on an earlier reading of a row (its answer has
changed since) still stands for the text that was read: that text, approved or not, is
evidence; score leaves the row itself to review again. Times: `decided_at`.
"""

from refinery import decisions
from refinery.normalize import last_user_index
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, Refuse, TransformSpec, new_evidence, new_signals, tool_call

SPEC = TransformSpec(name="human_reviews", patterns=decisions.PATTERNS, format="jsonl", kind="human_review",
                     description="decisions on the review queue (refinery review import)")


def join_key(row, ctx):
    d = decisions.parse(row)  # a line that is no decision is refused here, with its reason
    return Keyed(f"review:{d.review_id}:{d.answer_sha256}", "decision")


def transform(row, ctx):  # every decision is joined; this runs only for lines join_key declines
    decisions.parse(row)
    raise AssertionError("join_key keys every decision")


def assemble(group, ctx):
    members = sorted(group, key=lambda m: (m.file, m.offset))
    parsed = [decisions.parse(m.row) for m in members]
    first = parsed[0]
    if any(d.verdict != first.verdict for d in parsed[1:]):
        said = "; ".join(f"{d.decision} by {d.reviewer}" for d in parsed)
        return [Refuse(m, Reason.CONFLICTING_DECISIONS, f"{first.review_id} is decided differently: {said}")
                for m in members]
    return [Emit(_evidence(members[0].row, first), members[0]),
            *(Refuse(m, Reason.DUPLICATE_ROW, f"the same decision on {first.review_id} is taken from an earlier "
                                              "line") for m in members[1:])]


def _str(row, key):
    value = row.get(key)
    return value if isinstance(value, str) else None


def _evidence(row, d):
    messages = row.get("messages") if isinstance(row.get("messages"), list) else None
    if d.decision == decisions.CORRECT:
        response, calls = d.corrected_answer, []
        if messages:  # the conversation up to the prompt: the corrected answer replaces what followed
            end = last_user_index(messages)
            if end is None:  # no user turn: up to the first answer
                end = next((i for i, m in enumerate(messages) if m.get("role") in ("assistant", "tool")),
                           len(messages)) - 1
            messages = messages[:end + 1] or None
    else:
        response = _str(row, "response")
        calls = [tool_call(c) for c in row["tool_calls"]] if isinstance(row.get("tool_calls"), list) else []
    approved = d.decision != decisions.REJECT
    verdict = {"name": "human_review", "value": d.decision, "scale": None, "higher_is_better": True,
               "normalized": 1.0 if approved else 0.0, "by": "human", "used": True}
    return new_evidence(
        SPEC.kind, recorded_at=d.decided_at, recorded_at_from="record:decided_at",
        task_id=_str(row, "task_id"), task_name=_str(row, "task_name"), prompt=_str(row, "prompt"),
        messages=messages, response=response, tool_calls=calls,
        signals=new_signals(approved=approved, approver=d.reviewer, human_rating=1.0 if approved else 0.0,
                            scores=[verdict]),
    )
