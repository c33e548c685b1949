"""The scoring policy, rule by rule: each case changes one thing about a clean, accepted row."""

from __future__ import annotations

import copy

import pytest

from refinery.config import ScoreConfig
from refinery.decisions import Decision, Reviews, answer_sha256
from refinery.policy import POLICY_VERSION, RULES, policy_hash, score_record

CFG = ScoreConfig()


def evidence(**changes) -> dict:
    """An eval row that every rule is happy with: accepted."""
    ev = {
        "id": "ev-0000000000000000", "source": "eval", "kind": "eval", "task_id": "t1", "task_name": "t",
        "prompt": "How many orders in August?", "messages": None, "response": "1,312 rows.", "tool_calls": [],
        "signals": {"eval_score": 0.9, "expected": None, "approved": True, "approver": "maria.k",
                    "human_rating": None, "verdict": None, "error": None, "exit_status": None,
                    "tool_call_count": None, "stop_reason": None, "safety_flags": [], "scores": [],
                    "preference": None, "trust": None},
        "recorded_at": "2026-11-01T00:00:00Z",
    }
    for key, value in changes.items():
        if key in ev["signals"]:
            ev["signals"][key] = value
        else:
            ev[key] = value
    return ev


def call(problem=None, name="run_sql"):
    return {"id": "c1", "name": name, "arguments": {"q": 1}, "problem": problem}


def test_the_clean_row_is_accepted():
    assert score_record(evidence(), CFG) == ("accepted", 0.9, [])


CASES = [
    # (changes, category, rule that must fire)
    ({"error": "ToolTimeout"}, "rejected", "error"),
    ({"exit_status": 1}, "rejected", "error"),
    ({"response": "", "tool_calls": []}, "rejected", "empty_answer"),
    ({"response": None}, "rejected", "empty_answer"),
    ({"tool_calls": [call("tool_key_instead_of_name")]}, "rejected", "malformed_tool_call"),
    ({"tool_calls": [call("arguments_not_json")]}, "rejected", "malformed_tool_call"),
    ({"tool_calls": [call("missing_name", name=None)]}, "rejected", "malformed_tool_call"),
    ({"tool_call_count": 21}, "rejected", "runaway_tool_loop"),
    ({"tool_calls": [call() for _ in range(21)]}, "rejected", "runaway_tool_loop"),
    ({"stop_reason": "length"}, "rejected", "truncated"),
    ({"stop_reason": "max_turns"}, "rejected", "truncated"),
    ({"safety_flags": ["unsafe_action"]}, "rejected", "safety_flag"),
    ({"eval_score": 0.3}, "needs_human_review", "conflicting_signals"),  # approved but scored low
    ({"approved": False, "approver": None}, "needs_human_review", "conflicting_signals"),  # disapproved, scored high
    ({"verdict": "fail"}, "needs_human_review", "conflicting_signals"),  # audit fail vs approval
    ({"verdict": "fail", "approved": None, "eval_score": None}, "rejected", "audit_fail"),
    ({"approved": False, "eval_score": None}, "rejected", "human_rejection"),
    ({"human_rating": 0.2, "eval_score": None, "approved": None}, "rejected", "human_rejection"),
    ({"eval_score": 0.3, "approved": None}, "rejected", "low_eval_score"),
    ({"verdict": "flag"}, "needs_human_review", "audit_flag"),
    ({"eval_score": None, "approved": None, "approver": None}, "needs_human_review", "no_signal"),
    ({"kind": "run", "stop_reason": None}, "partially_accepted", "missing_stop"),
    ({"eval_score": 0.6}, "needs_human_review", "conflicting_signals"),  # approved, 0.6 < accept
    ({"eval_score": 0.6, "approved": None}, "partially_accepted", "below_accept_score"),
    ({"approved": None, "approver": None}, "partially_accepted", "no_approval"),
    ({"eval_score": None}, "partially_accepted", "no_score"),
    ({"eval_score": None, "approved": None, "verdict": "pass"}, "partially_accepted", "no_score"),
    ({"preference": "rejected"}, "rejected", "dispreferred"),
    ({"trust": "curated", "eval_score": None, "approved": None, "approver": None}, "accepted", "curated_source"),
    # a person's decision on the review queue (`_decided`: what the human_reviews stream says)
    ({"eval_score": 0.3, "_decided": ["accept"]}, "accepted", "human_review_accept"),
    ({"eval_score": None, "approved": None, "approver": None, "_decided": ["accept"]}, "accepted",
     "human_review_accept"),
    ({"_decided": ["reject"]}, "rejected", "human_review_reject"),
    ({"eval_score": 0.3, "_decided": ["correct"]}, "rejected", "human_review_corrected"),
    ({"eval_score": 0.3, "_decided": ["accept@an older answer"]}, "needs_human_review", "human_review_stale"),
    ({"eval_score": None, "approved": None, "approver": None, "_decided": ["accept", "reject"]},
     "needs_human_review", "human_review_conflict"),
]


def _reviews(ev: dict, decided: list[str]) -> Reviews:
    """The stream's decisions on `ev`: "accept", or "accept@…" for one made on another reading of it."""
    def one(said: str) -> Decision:
        decision, _, older = said.partition("@")
        digest = "0" * 64 if older else answer_sha256(ev)
        return Decision(ev["id"], decision, digest, "dana", "fixed" if decision == "correct" else None, None,
                        "2026-11-28T09:30:00.000000Z")
    return Reviews({ev["id"]: tuple(one(d) for d in decided)})


def test_a_curated_pair_becomes_chosen_and_rejected():
    chosen = evidence(trust="curated", eval_score=None, approved=None, approver=None, preference="chosen")
    rejected = evidence(trust="curated", eval_score=None, approved=None, approver=None, preference="rejected")
    (c_cat, c_score, c_rules), (r_cat, r_score, r_rules) = score_record(chosen, CFG), score_record(rejected, CFG)
    assert (c_cat, r_cat) == ("accepted", "rejected") and c_score > r_score
    assert c_rules == ["curated_source"] and r_rules == ["dispreferred", "curated_source"]


def test_a_curated_source_still_answers_to_its_own_signals():
    assert score_record(evidence(trust="curated", eval_score=0.2, approved=None), CFG)[0] == "rejected"
    assert score_record(evidence(trust="curated", stop_reason="length"), CFG)[0] == "rejected"
    uncurated = evidence(eval_score=None, approved=None, approver=None, preference="chosen")
    assert score_record(uncurated, CFG)[0] == "needs_human_review"  # a preference alone is no approval


@pytest.mark.parametrize(("changes", "category", "rule"), CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_rule(changes, category, rule):
    changes = copy.deepcopy(changes)
    decided = changes.pop("_decided", None)
    ev = evidence(**changes)
    got, score, fired = score_record(ev, CFG, _reviews(ev, decided) if decided else None)
    assert rule in fired
    assert got == category
    assert 0.0 <= score <= 1.0


def test_every_rule_is_covered_by_a_case():
    assert {c[2] for c in CASES} == set(RULES)


def test_hard_failures_win_over_everything():
    ev = evidence(error="boom", verdict="flag", eval_score=0.3)  # also conflicting and flagged
    assert score_record(ev, CFG)[0] == "rejected"


def test_scores_are_capped_so_a_better_category_scores_higher():
    rejected = score_record(evidence(stop_reason="length", eval_score=0.99), CFG)
    partial = score_record(evidence(approved=None, approver=None, eval_score=0.99), CFG)
    accepted = score_record(evidence(eval_score=0.71), CFG)
    assert rejected[1] <= CFG.caps.rejected < partial[1] <= CFG.caps.partially_accepted < accepted[1]


def test_thresholds_come_from_config():
    strict = ScoreConfig(accept_min_score=0.95)
    assert score_record(evidence(eval_score=0.9), strict)[0] == "needs_human_review"  # approved but below
    lenient = ScoreConfig(require_approval=False)
    assert score_record(evidence(approved=None, approver=None), lenient)[0] == "accepted"


def test_policy_hash_changes_with_any_threshold_and_is_stable():
    assert policy_hash(CFG) == policy_hash(ScoreConfig())
    assert policy_hash(CFG) != policy_hash(ScoreConfig(max_tool_calls=30))
    assert POLICY_VERSION


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="partial_min_score"):
        ScoreConfig(accept_min_score=0.4, partial_min_score=0.5)
