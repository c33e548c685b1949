"""A person's decisions on the review queue: the `human_reviews` source stream.

`refinery review import FILE` appends one line per decision to data/_kb/human_reviews.jsonl,
copying what was reviewed from its evidence record, so the line stands on its own:

    {"review_id": "ev-…",                the evidence (and scored-run) id decided on
     "decision": "accept" | "reject" | "correct", "corrected_answer": str | null,
     "reviewer": str, "note": str | null, "decided_at": "…Z",
     "answer_sha256": …,                 what the reviewer saw (prompt, messages, answer, tool calls)
     "reviewed": {source_file, line_offset, sig_hash, recorded_at},   the evidence line decided on
     "task_id", "task_name", "prompt", "messages", "response", "tool_calls",   copied from it
     "imported_from": {"file", "line"}}

The next run reads it twice, both times through `parse`:
- materialize turns each line into evidence of its own (transforms/human_reviews.py): what the
  person said about an answer, approved or not — for `correct`, the corrected answer to the same
  prompt, which the scorer then accepts and the preference export pairs over the original;
- score moves the row decided on out of needs_human_review (`Reviews.rule`): accept → accepted,
  reject → rejected, correct → rejected (its answer was replaced). A decision holds only while
  the row still reads as the reviewer saw it (same id and answer_sha256); one whose row has
  changed since leaves the row to review again (rule human_review_stale).

The stream is small — decisions are made by people — so score holds it in memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refinery.canonical import sig_hash
from refinery.reasons import Reason
from refinery.transform import RowError, parse_timestamp

if TYPE_CHECKING:
    from refinery.config import Config
    from refinery.discovery import Claim
    from refinery.sources import SourceFile
    from refinery.workspace import Workspace

#: where `review import` writes; the `human_reviews` importer claims every file this pattern names
STREAM = "human_reviews.jsonl"
PATTERNS = ("human_reviews*.jsonl",)
ACCEPT, REJECT, CORRECT = "accept", "reject", "correct"
DECISIONS = (ACCEPT, REJECT, CORRECT)
#: decision → the rule score fires on the row decided on
RULE = {ACCEPT: "human_review_accept", REJECT: "human_review_reject", CORRECT: "human_review_corrected"}
STALE, CONFLICT = "human_review_stale", "human_review_conflict"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Decision:
    review_id: str
    decision: str
    answer_sha256: str
    reviewer: str
    corrected_answer: str | None
    note: str | None
    decided_at: str

    @property
    def verdict(self) -> tuple[str, str | None]:
        """What was decided (who decided it, when, and why aside): two decisions agree when theirs do."""
        return self.decision, self.corrected_answer


def answer_sha256(ev: dict[str, Any]) -> str:
    """What a reviewer reads of an evidence record: its prompt, conversation, answer and tool calls."""
    return sig_hash({"prompt": ev.get("prompt"), "messages": ev.get("messages"), "response": ev.get("response"),
                     "tool_calls": ev.get("tool_calls")})


def _text(row: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(Reason.MISSING_FIELD, f"field {key!r} is missing")
        return None
    if not isinstance(value, str):
        raise RowError(Reason.WRONG_TYPE, f"field {key!r}: expected a string, got {type(value).__name__}")
    return value


def parse(row: Any) -> Decision:
    """The decision a human_reviews line holds (raises RowError). The one reading of a
    line, so materialize and score never disagree on which lines count."""
    if not isinstance(row, dict):
        raise RowError(Reason.WRONG_TYPE, "a decision line is a JSON object")
    review_id = _text(row, "review_id", required=True)
    if not review_id.startswith("ev-"):
        raise RowError(Reason.WRONG_TYPE, f"field 'review_id': {review_id!r} is not an evidence id (ev-…)")
    decision = _text(row, "decision", required=True)
    if decision not in DECISIONS:
        raise RowError(Reason.WRONG_TYPE, f"field 'decision': {decision!r} is not one of {', '.join(DECISIONS)}")
    corrected = row.get("corrected_answer")
    if decision == CORRECT:
        corrected = _text(row, "corrected_answer", required=True)
    elif corrected not in (None, ""):
        raise RowError(Reason.WRONG_TYPE, f"field 'corrected_answer' is only for decision 'correct', not "
                                               f"{decision!r}")
    digest = _text(row, "answer_sha256", required=True)
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise RowError(Reason.WRONG_TYPE, "field 'answer_sha256' is not a sha256 (64 hex digits)")
    if answer_sha256(row) != digest:  # what it says was reviewed is not what was: never approve that
        raise RowError(Reason.EDITED_DECISION, f"{review_id}: the reviewed prompt, conversation, answer or tool "
                                               "calls no longer hash to its answer_sha256")
    return Decision(review_id, decision, digest, _text(row, "reviewer", required=True),
                    corrected or None, _text(row, "note"), parse_timestamp(row.get("decided_at"), "decided_at"))


NAME = "human_reviews"


def decision_sources(ws: Workspace, cfg: Config) -> list[tuple[SourceFile, Claim]]:
    """Every source file the human_reviews importer reads, as materialize decides it (its name
    pattern, or a [sources] table naming the importer), with the claim that says how to read it."""
    from refinery.discovery import Registry, name_matches
    from refinery.sources import list_sources

    named = any(sc.importer == NAME for sc in cfg.sources.values())
    maybe = [s for s in list_sources(ws, cfg.materialize.ignore)[0]
             if s.refused is None and (named or name_matches(s.kb_rel, PATTERNS))]
    if not maybe:
        return []
    registry = Registry.load(ws.root, cfg)
    return [(s, c) for s in maybe if (c := registry.claim(s)).name == NAME and c.error is None]


def decision_files(ws: Workspace, cfg: Config) -> list[tuple[Path, str]]:
    """(path, workspace-relative path) of every human_reviews file under data/_kb, in order."""
    return [(s.path, s.ws_rel) for s, _ in decision_sources(ws, cfg)]


@dataclass(frozen=True)
class Reviews:
    """The decisions in the human_reviews stream, by the id decided on — what score applies."""

    by_id: dict[str, tuple[Decision, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_id)

    def rule(self, ev: dict[str, Any]) -> str | None:
        """The review rule for this evidence record, or None when no one decided on it."""
        found = self.by_id.get(ev["id"])
        if not found:
            return None
        digest = answer_sha256(ev)
        mine = [d for d in found if d.answer_sha256 == digest]
        if not mine:
            return STALE
        if any(d.verdict != mine[0].verdict for d in mine[1:]):
            return CONFLICT  # only a hand-edited stream holds both: `review import` refuses the second
        return RULE[mine[0].decision]


def load(ws: Workspace, cfg: Config) -> Reviews:
    """Every usable decision in the stream's files, read as materialize reads them (a line it
    refuses — too long, not JSON, no decision — is ignored here, so the two never disagree)."""
    from refinery.sources import read_rows

    found = decision_sources(ws, cfg)
    if not found:
        return Reviews()
    by_id: dict[str, list[Decision]] = defaultdict(list)
    m = cfg.materialize
    for src, claim in found:
        for line in read_rows(src, m.max_line_bytes, claim.record_paths, m.max_document_bytes):
            if line.obj is None:
                continue
            try:
                d = parse(line.obj)
            except RowError:
                continue
            by_id[d.review_id].append(d)
    return Reviews({k: tuple(v) for k, v in by_id.items()})
