"""The scoring policy: deterministic rules, no LLM.

Every evidence record gets one category — accepted, partially_accepted, rejected or
needs_human_review — the ids of the rules that fired, and a numeric score in 0..1. The rules
are applied in a fixed precedence:

1. a *hard* failure (an error, no answer, a malformed tool call, a runaway loop, a truncated
   answer, a safety flag) rejects the row, whatever else it has going for it;
2. otherwise a person's decision on the review queue (refinery.decisions) decides: accepted
   or rejected as they said — a corrected answer rejects the original;
3. otherwise conflicting signals (approved but scored low, ...) send it to a human;
4. otherwise a *soft* failure (a failing audit, a human rejection, a low eval score) rejects it;
5. otherwise an audit flag, the absence of any signal, or a decision on a row that has
   changed since sends it to a human;
6. otherwise it is accepted — unless a *cap* rule holds it at partially_accepted.

A source declared curated in refinery.toml (`[sources.<name>] trust = "curated"`: a reviewed
fine-tuning or preference dataset) counts as approved, with full quality unless a score of its
own says otherwise (rule `curated_source`); the worse answer of a preference pair is rejected
(`dispreferred`), so pairs reach the preference export.

POLICY_VERSION changes whenever a rule changes meaning; the policy hash covers the version,
the rules and the thresholds in `[score]`, so any change shows up in receipts as drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refinery.canonical import sig_hash
from refinery.config import ScoreConfig

if TYPE_CHECKING:
    from refinery.decisions import Reviews

POLICY_VERSION = "2026.11.3"

REJECT_HARD, REVIEW_CONFLICT, REJECT_SOFT, REVIEW, CAP = "reject-hard", "review-conflict", "reject", "review", "cap"
HUMAN_ACCEPT, HUMAN_REJECT = "human-accept", "human-reject"
APPROVE = "approve"  # a rule that supplies an approval; it decides no category by itself
#: effect → what it does to the category, in precedence order (an earlier effect wins).
EFFECTS: dict[str, str] = {
    REJECT_HARD: "rejected, whatever else the row has",
    HUMAN_REJECT: "rejected: a person decided so (unless a reject-hard rule fired)",
    HUMAN_ACCEPT: "accepted: a person decided so (unless a reject-hard rule fired)",
    REVIEW_CONFLICT: "needs_human_review (unless a reject-hard rule fired or a person decided)",
    REJECT_SOFT: "rejected",
    REVIEW: "needs_human_review",
    CAP: "partially_accepted at most",
    APPROVE: "counts as an approval (decides no category by itself)",
}

#: rule id → (effect, what it means). The order is the order rules are reported in.
RULES: dict[str, tuple[str, str]] = {
    "error": (REJECT_HARD, "the run reported an error, a failed HTTP status or a non-zero exit status"),
    "empty_answer": (REJECT_HARD, "no answer text and no tool call"),
    "malformed_tool_call": (REJECT_HARD, 'a tool call uses "tool" instead of "name", has no name, '
                                         "or its arguments are not a JSON object"),
    "runaway_tool_loop": (REJECT_HARD, "more than score.max_tool_calls tool calls for one task"),
    "truncated": (REJECT_HARD, "stopped by a length limit (length, max_tokens, max_turns)"),
    "safety_flag": (REJECT_HARD, "an auditor or the provider raised a safety flag (incl. refusals)"),
    "conflicting_signals": (REVIEW_CONFLICT, "approval and quality disagree: approved but scored below "
                                             "accept_min_score, disapproved but scored at or above it, or an "
                                             "audit verdict that contradicts the reviewer"),
    "human_review_accept": (HUMAN_ACCEPT, "a reviewer accepted it from the review queue (refinery review import)"),
    "human_review_reject": (HUMAN_REJECT, "a reviewer rejected it from the review queue (refinery review import)"),
    "human_review_corrected": (HUMAN_REJECT, "a reviewer replaced its answer with a corrected one, which is "
                                             "evidence of its own (source human_reviews)"),
    "audit_fail": (REJECT_SOFT, "an auditor's verdict is fail"),
    "human_rejection": (REJECT_SOFT, "a reviewer rejected it: thumbs down, or a rating at or below "
                                     "human_reject_max"),
    "low_eval_score": (REJECT_SOFT, "eval score below partial_min_score"),
    "dispreferred": (REJECT_SOFT, "a preference dataset marks this answer as the worse one of its pair"),
    "audit_flag": (REVIEW, "an auditor flagged it for a human"),
    "no_signal": (REVIEW, "no outcome signal at all: no score, rating, approval or verdict"),
    "human_review_stale": (REVIEW, "a reviewer decided on this row, but its prompt or answer has changed "
                                   "since: review it again"),
    "human_review_conflict": (REVIEW, "the human_reviews stream holds different decisions on this row: "
                                      "keep one"),
    "missing_stop": (CAP, "no stop reason where the source records one: it may be cut off"),
    "below_accept_score": (CAP, "quality score between partial_min_score and accept_min_score"),
    "no_approval": (CAP, "no approval (approver, thumbs up or audit pass) while require_approval is set"),
    "no_score": (CAP, "approved, but there is no eval score or rating to check the quality"),
    "curated_source": (APPROVE, 'the source is declared curated ([sources.<name>] trust = "curated"): approved, '
                                "with full quality unless a score of its own says otherwise"),
}
_TRUNCATED = {"length", "max_tokens", "max_turns", "max_output_tokens", "model_length", "max_tokens_reached"}


def policy_hash(cfg: ScoreConfig) -> str:
    return sig_hash({"version": POLICY_VERSION, "rules": RULES, "thresholds": cfg.model_dump(mode="json")})


def score_record(ev: dict[str, Any], cfg: ScoreConfig, reviews: Reviews | None = None
                 ) -> tuple[str, float, list[str]]:
    """(category, score, rules fired) for one evidence record (a dict as written by materialize);
    `reviews`: the decisions people made on the review queue (refinery.decisions)."""
    s = ev["signals"]
    fired: list[str] = []
    calls = ev["tool_calls"]
    response = ev["response"]

    if s["error"] is not None or (s["exit_status"] not in (None, 0)):
        fired.append("error")
    if not response and not calls:
        fired.append("empty_answer")
    for c in calls:
        if c["problem"] is not None:
            fired.append("malformed_tool_call")
            break
    n_calls = s["tool_call_count"] if s["tool_call_count"] is not None else len(calls)
    if n_calls > cfg.max_tool_calls:
        fired.append("runaway_tool_loop")
    stop = s["stop_reason"]
    if isinstance(stop, str) and stop.lower() in _TRUNCATED:
        fired.append("truncated")
    if s["safety_flags"]:
        fired.append("safety_flag")

    score, rating, approved, verdict = s["eval_score"], s["human_rating"], s["approved"], s["verdict"]
    curated = s.get("trust") == "curated"
    quality = score if score is not None else rating
    if quality is None and curated:
        quality = 1.0
    human_no = approved is False or (rating is not None and rating <= cfg.human_reject_max)
    approval = approved is True or verdict == "pass" or curated
    if ((approved is True and quality is not None and quality < cfg.accept_min_score)
            or (approved is False and score is not None and score >= cfg.accept_min_score)
            or (verdict == "pass" and human_no) or (verdict == "fail" and approved is True)):
        fired.append("conflicting_signals")
    if verdict == "fail":
        fired.append("audit_fail")
    if human_no:
        fired.append("human_rejection")
    if score is not None and score < cfg.partial_min_score:
        fired.append("low_eval_score")
    if s.get("preference") == "rejected":
        fired.append("dispreferred")
    if verdict == "flag":
        fired.append("audit_flag")
    if quality is None and approved is None and verdict is None and not fired:
        fired.append("no_signal")
    if stop is None and ev["kind"] in cfg.stop_required_kinds:
        fired.append("missing_stop")
    if quality is not None and cfg.partial_min_score <= quality < cfg.accept_min_score:
        fired.append("below_accept_score")
    if cfg.require_approval and not approval:
        fired.append("no_approval")
    if quality is None and approval:
        fired.append("no_score")
    if curated:
        fired.append("curated_source")
    if reviews and (decided := reviews.rule(ev)) is not None:
        fired.append(decided)

    effects = {RULES[r][0] for r in fired}
    if REJECT_HARD in effects:
        category = "rejected"
    elif HUMAN_REJECT in effects or HUMAN_ACCEPT in effects:
        category = "rejected" if HUMAN_REJECT in effects else "accepted"
        return category, 0.0 if category == "rejected" else 1.0, fired
    elif REVIEW_CONFLICT in effects:
        category = "needs_human_review"
    elif REJECT_SOFT in effects:
        category = "rejected"
    elif REVIEW in effects:
        category = "needs_human_review"
    elif CAP in effects:
        category = "partially_accepted"
    else:
        category = "accepted"

    q = quality if quality is not None else (1.0 if approval else 0.0 if human_no or verdict == "fail" else 0.5)
    cap = getattr(cfg.caps, category, 1.0)
    return category, round(min(q, cap), 4), fired
