"""Preference: chosen/rejected pairs of answers to the same task — chosen accepted or
partially accepted and scored strictly higher than a rejected one; no self-pairs, no
identical texts. Candidates are grouped by task one hash bucket at a time."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import orjson

from refinery.dedup import SeenHashes
from refinery.exporters._base import Candidate, Composition, Exporter, ExportStats, Refuse, Settings, Write, reply
from refinery.normalize import normalize_text
from refinery.reasons import Reason

PREFERENCE_CHOSEN = ("accepted", "partially_accepted")
PREFERENCE_REJECTED = ("rejected",)
#: a written-out call must carry this much: a query or a command, not a word like "orders"
WRITTEN_OUT_MIN = 16


class Preference(Exporter):
    name = "preference"
    path = "exports/preference/chosen_rejected.jsonl"
    schema = "preference_pair"
    order = 30
    id_prefix = "pp"
    summary = ("Export chosen/rejected pairs of answers to the same prompt, chosen scored strictly "
               "higher, no self-pairs, no identical texts: exports/preference/chosen_rejected.jsonl.")
    unit = "pairs"
    grouped = True
    pairs = True

    def admits(self, category: str, s: Settings) -> bool:
        return category in PREFERENCE_CHOSEN or category in PREFERENCE_REJECTED

    def candidate(self, c: Candidate, s: Settings) -> bytes:
        ev, sr = c.ev, c.sr
        system = next((m["content"] for m in ev["messages"] or [] if m["role"] == "system"), None)
        return orjson.dumps({
            "task_key": sr["task_key"], "id": sr["id"], "category": sr["category"], "score": sr["score"],
            "source": sr["source"], "prompt": ev["prompt"], "system": system or None, "text": c.answer,
            "reply": reply(ev), "text_key": c.norm, "prov": c.prov,
            # a reviewer's corrected answer, and the answer it replaced: paired first (refinery.decisions)
            "correction": ev["kind"] == "human_review" and any(
                x["name"] == "human_review" and x["value"] == "correct" for x in ev["signals"]["scores"]),
            "replaced": "human_review_corrected" in sr["rules_fired"],
        }) + b"\n"

    def merge(self, lines: Iterable[bytes], write: Write, refuse: Refuse,
              st: ExportStats, s: Settings, *, duplicates: AbstractSet[int],
              near: Mapping[int, str]) -> Iterator[dict[str, Any]]:
        """One hash bucket of tasks: its candidates grouped by task, each task's pairs in turn."""
        max_pairs = s.export.max_pairs_per_task
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for line in lines:
            r = orjson.loads(line)
            groups[r["task_key"]].append(r)
        for tk in sorted(groups):
            rows = groups[tk]
            picked, left = pair_group(rows, max_pairs)
            for c, r in picked:
                pair = {
                    "schema_version": 2,
                    "id": "pp-" + hashlib.sha256(f"{c['id']}\x1f{r['id']}".encode()).hexdigest()[:16],
                    "task_key": tk, "prompt": c["prompt"], "system": c["system"], "chosen": c["text"],
                    "rejected": r["text"], "chosen_reply": c["reply"], "rejected_reply": r["reply"],
                    "chosen_id": c["id"], "rejected_id": r["id"], "chosen_score": c["score"],
                    "rejected_score": r["score"], "provenance": c["prov"], "rejected_provenance": r["prov"],
                }
                write(pair)
                yield pair
            st.rows_out += len(rows) - len(left)
            for row in rows:  # in candidate order, so the quarantine file is deterministic
                reason = left.get(row["id"])
                if reason is not None:
                    refuse(row["source"], row["prov"], reason, _DETAIL[reason].format(max_pairs=max_pairs))

    def composition(self) -> Composition:
        return PairComposition(self.name)


_DETAIL = {Reason.DUPLICATE_ANSWER: "an identical answer to this task is already paired",
           Reason.SAME_TOOL_CALL: "its only partners pair a right tool call against a text that makes no call but "
                                  "writes the same one out",
           Reason.NO_PAIR: "no answer to the same task on the other side to pair with",
           Reason.PAIR_LIMIT: "the task already has {max_pairs} pairs"}


def pair_group(rows: list[dict[str, Any]], max_pairs: int) -> tuple[list[tuple[dict, dict]], dict[str, Reason]]:
    """Pairs for one task's candidates, and a reason for every candidate left out.

    chosen: accepted / partially_accepted answers, best first; rejected: rejected answers,
    worst first. Identical texts (normalised) are kept once per side; a pair needs different
    ids, different texts and a strictly higher chosen score. Each answer is used once before
    any is used twice, up to `max_pairs` pairs — a reviewer's corrected answer over the answer
    it replaced before any other; output order is deterministic (by score, id).
    """
    left: dict[str, Reason] = {}

    def side(cats: tuple[str, ...], order: Callable[[dict], tuple]) -> list[dict]:
        seen: set[str] = set()
        out = []
        for r in sorted((r for r in rows if r["category"] in cats), key=order):
            if r["text_key"] in seen:
                left[r["id"]] = Reason.DUPLICATE_ANSWER
                continue
            seen.add(r["text_key"])
            out.append(r)
        return out

    chosen = side(PREFERENCE_CHOSEN, lambda r: (-r["score"], r["id"]))
    rejected = side(PREFERENCE_REJECTED, lambda r: (r["score"], r["id"]))
    candidates = [(c, r) for c in chosen for r in rejected
                  if c["id"] != r["id"] and c["text_key"] != r["text_key"] and c["score"] > r["score"]]
    valid = [(c, r) for c, r in candidates if not repeats_chosen_call(c, r)]
    # a reviewer's correction over the answer it replaced comes first: the pair the review made
    valid.sort(key=lambda pair: not (pair[0].get("correction") and pair[1].get("replaced")))
    same_call = {x["id"] for pair in candidates for x in pair} - {x["id"] for pair in valid for x in pair}
    picked: list[tuple[dict, dict]] = []
    used: set[str] = set()
    taken: set[tuple[str, str]] = set()
    # Three sweeps: pairs of two unused answers, then pairs with one, then any — so that as
    # many answers as possible are used before any is used twice.
    for fresh in (2, 1, 0):
        for c, r in valid:
            if len(picked) >= max_pairs:
                break
            ids = (c["id"], r["id"])
            if ids not in taken and (c["id"] not in used) + (r["id"] not in used) >= fresh:
                picked.append((c, r))
                taken.add(ids)
                used.update(ids)
    partners = {x["id"] for pair in valid for x in pair}
    for r in chosen + rejected:
        if r["id"] not in used:
            left[r["id"]] = Reason.PAIR_LIMIT if r["id"] in partners else \
                Reason.SAME_TOOL_CALL if r["id"] in same_call else Reason.NO_PAIR
    return picked, left


def repeats_chosen_call(chosen: dict[str, Any], rejected: dict[str, Any]) -> bool:
    """The rejected answer is only well-formed tool calls, and the chosen answer makes no call but
    writes each of them out in its text (every argument value, the longest at least
    WRITTEN_OUT_MIN characters, e.g. the SQL it ran): a run that stopped after the right call
    against a text with the same content. As a pair it would teach a model not to call the tool.
    A chosen answer that makes the same call and goes on is a fair pair (DPO learns to go on
    after the result); a rejected call made badly ("tool" for "name") is the point of its pair."""
    def said(side: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        mine = [m for m in side["reply"] if m["role"] == "assistant"]
        return [c for m in mine for c in m["tool_calls"] or []], "\n".join(m["content"] or "" for m in mine)

    calls, rejected_text = said(rejected)
    chosen_calls, chosen_text = said(chosen)
    if not calls or rejected_text.strip() or chosen_calls or any(c["problem"] or not c["name"] for c in calls):
        return False
    text = f" {normalize_text(chosen_text)} "

    def written_out(args: Any) -> bool:
        values = [v if isinstance(v, str) else orjson.dumps(v).decode()
                  for v in (args.values() if isinstance(args, dict) else []) if v not in (None, "")]
        return bool(values) and max(map(len, values)) >= WRITTEN_OUT_MIN and \
            all(re.search(rf"(?<!\w){re.escape(normalize_text(v))}(?!\w)", text) for v in values)

    return all(written_out(c["arguments"]) for c in calls)


class PairComposition(Composition):
    def __init__(self, export: str) -> None:
        self.export = export
        self.rows = 0
        self.by_source: Counter[str] = Counter()
        self.tool_using = 0
        self.prompt_chars = 0
        self.answer_chars = 0
        self.rejected_chars = 0
        self.tasks = SeenHashes()
        self.other_tasks = 0  # in the units merged into this one (a task is in one unit only)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.prompt_chars += len(row["prompt"])
        self.answer_chars += len(row["chosen"])
        self.rejected_chars += len(row["rejected"])
        self.by_source[row["provenance"]["source_file"].rsplit("/", 1)[-1].removesuffix(".jsonl")] += 1
        self.tool_using += '"arguments"' in row["chosen"]
        self.tasks.add(int(row["task_key"][3:], 16))

    def merge(self, other: Composition) -> None:
        assert isinstance(other, PairComposition)
        self.rows += other.rows
        self.by_source.update(other.by_source)
        self.tool_using += other.tool_using
        self.prompt_chars += other.prompt_chars
        self.answer_chars += other.answer_chars
        self.rejected_chars += other.rejected_chars
        self.other_tasks += len(other.tasks) + other.other_tasks

    def to_json(self, st: ExportStats, path: str) -> dict[str, Any]:
        mean = (lambda total: round(total / self.rows, 1) if self.rows else 0.0)
        return {"export": self.export, "path": path, "rows": self.rows,
                "pairs": self.rows, "rows_used": st.rows_out, "tasks": len(self.tasks) + self.other_tasks,
                "by_chosen_source": dict(sorted(self.by_source.items())),
                "tool_using_chosen": self.tool_using,
                "mean_prompt_chars": mean(self.prompt_chars), "mean_chosen_chars": mean(self.answer_chars),
                "mean_rejected_chars": mean(self.rejected_chars)}

    def receipt_counts(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {"counts": {"pairs": doc["pairs"], "tasks": doc["tasks"], "tool_using_chosen": doc["tool_using_chosen"]},
                "by_category": {}, "by_source": doc["by_chosen_source"]}


EXPORTER = Preference()
