"""Stage 3 — exports: scored runs (with their evidence) → RAG, SFT and preference corpora.

    data/scored-runs + data/evidence ──▶ exports/rag/playbooks.jsonl              (RagSample)
                                     ──▶ exports/sft/instruction_response.jsonl   (SftSample)
                                     ──▶ exports/preference/chosen_rejected.jsonl (PreferencePair)
                                     ──▶ exports/quarantine/export.jsonl          (refused on reading)
                                     ──▶ exports/quarantine/export-<name>.jsonl   (refused on merging)
                                     ──▶ <export>.stats.json next to each export  (composition)

Every scored run is accounted for in every export it was offered to: written, or quarantined
with a reason (a category the export does not take, no text, a secret or personal data, a
duplicate answer, no counterpart for a pair, ...). For preference, a row counts as written
when it is in at least one pair. What is decided on reading a row — its category, its text —
is decided for every export at once, and a row refused by several exports for one reason is
one record naming them (`exports`) in the shared exports/quarantine/export.jsonl; what only a
merge can decide (a duplicate, a missing partner) goes to that export's own file.

How it runs: each scored-run file is read together with its evidence file (they correspond
line for line) in a worker process, which writes its candidate rows and refusals into part
files. A merge per export then drops duplicate answers across files (RAG, SFT), or pairs
preference candidates one hash bucket of task keys at a time — so grouping never holds more
than one bucket in memory; the three merges run in worker processes side by side. Nothing is
published until every export is complete and the SFT file has been re-read and checked; then
each file is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from refinery import sensitive
from refinery.config import Config, ExportConfig
from refinery.dedup import SeenHashes
from refinery.errors import AccountingError, CheckFailed
from refinery.jsonl import JsonlWriter, LineCursor, concat_files, fsync, fsync_dir, read_jsonl
from refinery.normalize import answer_text, last_user_index, normalize_text, render_tool_calls
from refinery.parallel import map_files
from refinery.quarantine import quarantine_record
from refinery.reasons import Reason
from refinery.score import StaleInputError, read_manifest
from refinery.workspace import EXPORT_FILES, EXPORT_QUARANTINE, Workspace, quarantine_file

EXPORTS = ("rag", "sft", "preference")
PATHS = {e: rel.removeprefix("exports/") for e, rel in EXPORT_FILES.items()}  # under exports/
#: Categories that must never reach SFT, whatever the config says (defence 2 of 3).
SFT_NEVER = frozenset({"rejected", "needs_human_review"})
PREFERENCE_CHOSEN = ("accepted", "partially_accepted")
PREFERENCE_REJECTED = ("rejected",)
BUCKET_BYTES = 32 << 20  # evidence bytes per preference bucket: bounds the grouping's memory


class LeakError(CheckFailed):
    """The re-read of the written SFT file found a row that must not be there. Nothing was published."""

    headline = "SFT CHECK FAILED, nothing was published"


def stage_name(export: str) -> str:
    return f"export-{export}"


# --- per-export results -------------------------------------------------------------------


@dataclass
class ExportStats:
    export: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    sha256: str = ""

    def add(self, other: ExportStats) -> None:
        self.rows_in += other.rows_in
        self.quarantined += other.quarantined
        self.by_reason.update(other.by_reason)
        self.redacted.update(other.redacted)


@dataclass
class ExportResult:
    exports: dict[str, dict[str, Any]]
    """export → {rows_in, rows_out, quarantined, by_reason, path, quarantine, stats, ...}"""
    outputs: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"stage": "export", "exports": self.exports, "outputs": self.outputs,
                "seconds": round(self.seconds, 3)}


# --- building rows ------------------------------------------------------------------------


def rag_row(ev: dict[str, Any], sr: dict[str, Any], prov: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1, "id": "rag-" + sr["id"][3:], "task_key": sr["task_key"],
        "task_name": ev["task_name"], "prompt": ev["prompt"], "response": ev["response"] or "",
        "tool_calls": [_plain_call(c) for c in ev["tool_calls"]], "category": sr["category"],
        "score": sr["score"], "source": ev["source"], "provenance": prov,
    }


def sft_row(ev: dict[str, Any], sr: dict[str, Any], prov: dict[str, Any]) -> dict[str, Any]:
    msgs = ev["messages"]
    return {
        "schema_version": 1, "id": "sft-" + sr["id"][3:], "instruction": ev["prompt"], "input": "",
        "messages": [_plain_message(m) for m in msgs] if msgs else None, "response": ev["response"] or "",
        "tool_calls": [_plain_call(c) for c in ev["tool_calls"]], "quality_score": sr["category"],
        "score": sr["score"], "source": ev["source"], "provenance": prov,
    }


def reply(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer as the conversation after the prompt — tool calls, their results, the text —,
    or one assistant message when the source had no conversation."""
    msgs = ev["messages"] or []
    last_user = last_user_index(msgs)
    if last_user is not None and any(m["role"] == "assistant" for m in msgs[last_user + 1:]):
        return [_plain_message(m) for m in msgs[last_user + 1:]]
    return [{"role": "assistant", "content": ev["response"] or "", "name": None,
             "tool_calls": [_plain_call(c) for c in ev["tool_calls"]] or None, "tool_call_id": None}]


def _plain_call(c: dict[str, Any]) -> dict[str, Any]:
    return {"id": c["id"], "name": c["name"], "arguments": c["arguments"], "problem": c["problem"]}


def _plain_message(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    if m.get("tool_calls"):
        out["tool_calls"] = [_plain_call(c) for c in m["tool_calls"]]
    return out


#: The evidence fields an export row is made of: all of them are scanned, keys and values.
SCANNED = ("task_name", "prompt", "response", "tool_calls", "messages")


def _texts(ev: dict[str, Any]) -> list[tuple[str, Any]]:
    """The fields of an evidence record that can reach an export, for the sensitive-data scan."""
    return [(k, ev[k]) for k in SCANNED if ev[k]]


def _redact_evidence(ev: dict[str, Any], allow: list[str]) -> tuple[dict[str, Any], list[str]]:
    out = dict(ev)
    found: list[str] = []
    for key in SCANNED:
        if ev[key]:
            out[key], kinds = sensitive.redact(ev[key], allow)
            found += kinds
    return out, found


# --- the per-file worker ------------------------------------------------------------------


@dataclass
class FileJob:
    index: int
    evidence: Path
    evidence_rel: str
    scored: Path
    scored_rel: str
    parts: Path
    exports: tuple[str, ...]
    ecfg: ExportConfig
    include_partial: bool
    buckets: int


def _pairs(job: FileJob) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(evidence record, scored run, provenance of the scored-run line) for every scored line."""
    sha256, dumps, sort_keys = hashlib.sha256, orjson.dumps, orjson.OPT_SORT_KEYS
    evidence = LineCursor(read_jsonl(job.evidence))
    for line in read_jsonl(job.scored):
        if line.obj is None:
            raise StaleInputError(f"{job.scored_rel}:{line.offset}: {line.reason} — scored runs are written by "
                                  "`refinery score`; run it again")
        sr = line.obj
        target = sr["provenance"]["line_offset"]
        ev_line = evidence.at(target)
        if ev_line is None or ev_line.obj is None or ev_line.obj["id"] != sr["id"]:
            raise StaleInputError(f"{job.scored_rel}:{line.offset} does not match {job.evidence_rel}:{target}; "
                                  "run `refinery score` again")
        prov = {"source_file": job.scored_rel, "line_offset": line.offset,
                "sig_hash": sha256(dumps(sr, option=sort_keys)).hexdigest(), "recorded_at": sr["recorded_at"]}
        yield ev_line.obj, sr, prov


def _quarantine(qw: JsonlWriter, stats: list[ExportStats], exports: list[str], source: str, prov: dict[str, Any],
                reason: Reason, detail: str) -> None:
    """Count one refusal for each of `stats` and write one record of it, naming `exports`,
    pointing at its scored-run line: in the shared file (stage "export") when it was decided for
    every export at once, else in the one export's own file.

    The row itself is not copied (it may hold the very secret it was refused for).
    """
    for st in stats:
        st.quarantined += 1
        st.by_reason[reason.value] += 1
    stage = "export" if qw.shared else stage_name(exports[0])
    qw.write(quarantine_record(stage, source, prov["source_file"], prov["line_offset"], reason, detail,
                               prov["sig_hash"], recorded_at=prov["recorded_at"], exports=exports))


class QuarantineWriter(JsonlWriter):
    def __init__(self, f: Any, *, shared: bool):
        super().__init__(f)
        self.shared = shared


def _names(exports: list[str]) -> str:
    return exports[0] if len(exports) == 1 else f"{', '.join(exports[:-1])} and {exports[-1]}"


def sft_categories(include_partial: bool) -> set[str]:
    return {"accepted", "partially_accepted"} if include_partial else {"accepted"}


def export_file(job: FileJob) -> dict[str, ExportStats]:
    """Read one scored-run file with its evidence; write candidates and refusals into part files.

    A row's category and text are judged for every export, asked for or not, so that the shared
    quarantine file is the same whichever exports a command writes.
    """
    ecfg = job.ecfg
    stats = {e: ExportStats(e) for e in job.exports}
    rag_ok = set(ecfg.rag_categories)
    sft_ok = sft_categories(job.include_partial)
    allow = list(ecfg.allow_sensitive)
    redact = ecfg.sensitive == "redact"
    parts = job.parts
    out = {e: open(parts / f"{e}-{job.index:06d}.jsonl", "wb", buffering=1 << 20) for e in job.exports}
    quar = open(parts / f"q-{job.index:06d}.jsonl", "wb", buffering=1 << 18)
    qw = QuarantineWriter(quar, shared=True)
    bucket_files: dict[int, Any] = {}

    def refuse(exports: list[str], sr: dict[str, Any], prov: dict[str, Any], reason: Reason, detail: str) -> None:
        _quarantine(qw, [stats[e] for e in exports if e in stats], exports, sr["source"], prov, reason, detail)

    try:
        for ev, sr, prov in _pairs(job):
            cat = sr["category"]
            for st in stats.values():
                st.rows_in += 1
            admitted = [e for e in EXPORTS if _admits(e, cat, rag_ok, sft_ok)]
            if excluded := [e for e in EXPORTS if e not in admitted]:
                refuse(excluded, sr, prov, Reason.CATEGORY_EXCLUDED,
                       f"{cat} is not taken by the {_names(excluded)} export{'s' if len(excluded) > 1 else ''}")
            if not admitted:
                continue
            has_prompt = bool(ev["prompt"] and ev["prompt"].strip())
            has_answer = bool((ev["response"] or "").strip() or ev["tool_calls"])
            if not has_prompt or not has_answer:
                refuse(admitted, sr, prov, Reason.MISSING_TEXT, "no prompt" if not has_prompt else "no answer")
                continue
            finding = sensitive.first_finding(_texts(ev), allow)
            if finding is not None:
                kind, where = finding
                if not redact:
                    secret = sensitive.reason_family(kind) == "secret"
                    reason = Reason.SECRET_DETECTED if secret else Reason.PII_DETECTED
                    refuse(admitted, sr, prov, reason, f"{kind} in {where}")
                    continue
                ev, kinds = _redact_evidence(ev, allow)
                left = sensitive.first_finding(_texts(ev), allow)
                if left is not None:  # never expected; the re-scan is the guarantee, not the redaction
                    reason = Reason.SECRET_DETECTED if sensitive.reason_family(left[0]) == "secret" else \
                        Reason.PII_DETECTED
                    refuse(admitted, sr, prov, reason, f"{left[0]} in {left[1]} survived redaction")
                    continue
                for e in admitted:
                    if e in stats:
                        stats[e].redacted.update(kinds)
            wanted = [e for e in admitted if e in stats]
            if not wanted:
                continue
            answer = answer_text(ev)
            norm = normalize_text(answer)
            key = hashlib.sha256(f"{sr['task_key']}\x1f{norm}".encode()).hexdigest()[:16]
            if "rag" in wanted:
                out["rag"].write(key.encode() + b"\t" + orjson.dumps(rag_row(ev, sr, prov)) + b"\n")
            if "sft" in wanted:
                if cat in SFT_NEVER:  # defence 2: never, whatever _admits and the config say
                    raise LeakError(f"{job.scored_rel}:{prov['line_offset']}: a {cat} row was about to be "
                                    "written to SFT")
                out["sft"].write(key.encode() + b"\t" + orjson.dumps(sft_row(ev, sr, prov)) + b"\n")
            if "preference" in wanted:
                b = int(sr["task_key"][3:11], 16) % job.buckets
                f = bucket_files.get(b)
                if f is None:
                    f = bucket_files[b] = open(parts / f"b{b:04d}-{job.index:06d}.jsonl", "wb", buffering=1 << 18)
                system = next((m["content"] for m in ev["messages"] or [] if m["role"] == "system"), None)
                f.write(orjson.dumps({
                    "task_key": sr["task_key"], "id": sr["id"], "category": cat, "score": sr["score"],
                    "source": sr["source"], "prompt": ev["prompt"], "system": system or None, "text": answer,
                    "reply": reply(ev),
                    "text_key": norm, "prov": prov,
                }) + b"\n")
    finally:
        for f in [*out.values(), quar, *bucket_files.values()]:
            f.close()
    return stats


def _admits(export: str, category: str, rag_ok: set[str], sft_ok: set[str]) -> bool:
    if export == "rag":
        return category in rag_ok
    if export == "sft":
        return category in sft_ok and category not in SFT_NEVER
    return category in PREFERENCE_CHOSEN or category in PREFERENCE_REJECTED


# --- merging ------------------------------------------------------------------------------


def _merge_dedup(parts: list[Path], dest: Any, qw: QuarantineWriter, dedup: bool,
                 st: ExportStats) -> Iterator[dict[str, Any]]:
    """Write candidate rows to `dest` in file order, dropping repeated (task, answer) keys.

    Yields every row written (for the composition stats).
    """
    seen = SeenHashes().add
    w = JsonlWriter(dest)
    for part in parts:
        with open(part, "rb") as f:
            for line in f:
                key, _, body = line.partition(b"\t")
                row = orjson.loads(body)
                if dedup and not seen(int(key, 16)):
                    _quarantine(qw, [st], [st.export], row["source"], row["provenance"], Reason.DUPLICATE_ANSWER,
                                "the same answer to the same task is already in the export")
                    continue
                w.write(row)
                yield row
    st.rows_out, st.sha256 = w.rows, w.sha256


def pair_group(rows: list[dict[str, Any]], max_pairs: int) -> tuple[list[tuple[dict, dict]], dict[str, Reason]]:
    """Pairs for one task's candidates, and a reason for every candidate left out.

    chosen: accepted / partially_accepted answers, best first; rejected: rejected answers,
    worst first. Identical texts (normalised) are kept once per side; a pair needs different
    ids, different texts and a strictly higher chosen score. Each answer is used once before
    any is used twice, up to `max_pairs` pairs; output order is deterministic (by score, id).
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


#: a written-out call must carry this much: a query or a command, not a word like "orders"
WRITTEN_OUT_MIN = 16


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


def _merge_preference(parts_dir: Path, n_files: int, buckets: int, dest: Any, qw: QuarantineWriter, max_pairs: int,
                      st: ExportStats) -> Iterator[dict[str, Any]]:
    w = JsonlWriter(dest)
    used_rows = 0
    for b in range(buckets):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for i in range(n_files):
            part = parts_dir / f"b{b:04d}-{i:06d}.jsonl"
            if part.exists():
                with open(part, "rb") as f:
                    for line in f:
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
                w.write(pair)
                yield pair
            used_rows += len(rows) - len(left)
            for row in rows:  # in candidate order, so the quarantine file is deterministic
                reason = left.get(row["id"])
                if reason is None:
                    continue
                detail = {Reason.DUPLICATE_ANSWER: "an identical answer to this task is already paired",
                          Reason.SAME_TOOL_CALL: "its only partners pair a right tool call against a text that "
                                                 "makes no call but writes the same one out",
                          Reason.NO_PAIR: "no answer to the same task on the other side to pair with",
                          Reason.PAIR_LIMIT: f"the task already has {max_pairs} pairs"}[reason]
                _quarantine(qw, [st], [st.export], row["source"], row["prov"], reason, detail)
    st.rows_out, st.sha256 = used_rows, w.sha256


def refusals(ws: Workspace, export: str) -> Iterator[dict[str, Any]]:
    """Every quarantine record of a row `export` refused: the shared file's records that name it
    (refused on reading, in file order), then its own file's (refused while merging)."""
    for rel in (EXPORT_QUARANTINE, quarantine_file(stage_name(export))):
        path = ws.out / rel
        if path.is_file():
            for line in read_jsonl(path):
                if line.obj is not None and export in (line.obj.get("exports") or ()):
                    yield line.obj


# --- composition stats --------------------------------------------------------------------


class Composition:
    def __init__(self, export: str):
        self.export = export
        self.rows = 0
        self.by_source: Counter[str] = Counter()
        self.by_category: Counter[str] = Counter()
        self.tool_using = 0
        self.prompt_chars = 0
        self.answer_chars = 0
        self.rejected_chars = 0
        self.tasks = SeenHashes()

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.export == "preference":
            self.prompt_chars += len(row["prompt"])
            self.answer_chars += len(row["chosen"])
            self.rejected_chars += len(row["rejected"])
            self.by_source[row["provenance"]["source_file"].rsplit("/", 1)[-1].removesuffix(".jsonl")] += 1
            self.tool_using += '"arguments"' in row["chosen"]
            self.tasks.add(int(row["task_key"][3:], 16))
            return
        self.by_source[row["source"]] += 1
        cat = row.get("category") or row.get("quality_score")
        self.by_category[cat] += 1
        self.tool_using += bool(row["tool_calls"])
        prompt = row.get("prompt") if self.export == "rag" else row["instruction"]
        self.prompt_chars += len(prompt)
        self.answer_chars += len(row["response"]) + (len(render_tool_calls(row["tool_calls"]))
                                                     if row["tool_calls"] else 0)

    def to_json(self, st: ExportStats, path: str) -> dict[str, Any]:
        mean = (lambda total: round(total / self.rows, 1) if self.rows else 0.0)
        out: dict[str, Any] = {"export": self.export, "path": path, "rows": self.rows}
        if self.export == "preference":
            out.update({"pairs": self.rows, "rows_used": st.rows_out, "tasks": len(self.tasks),
                        "by_chosen_source": dict(sorted(self.by_source.items())),
                        "tool_using_chosen": self.tool_using,
                        "mean_prompt_chars": mean(self.prompt_chars), "mean_chosen_chars": mean(self.answer_chars),
                        "mean_rejected_chars": mean(self.rejected_chars)})
        else:
            out.update({"by_source": dict(sorted(self.by_source.items())),
                        "by_category": dict(sorted(self.by_category.items())),
                        "tool_using": self.tool_using, "direct_answers": self.rows - self.tool_using,
                        "mean_prompt_chars": mean(self.prompt_chars), "mean_answer_chars": mean(self.answer_chars)})
        out.update({"rows_in": st.rows_in, "quarantined": st.quarantined,
                    "by_reason": dict(sorted(st.by_reason.items())), "redacted": dict(sorted(st.redacted.items()))})
        return out


# --- defence 3: re-read the written SFT file ----------------------------------------------


def verify_sft(path: Path, ws: Workspace, allowed: set[str]) -> int:
    """Re-read an SFT file: every row's quality_score is allowed, never on the never-list, and
    agrees with the category of the scored run its provenance points at. Raises LeakError."""
    current: tuple[str, LineCursor] | None = None
    rows = 0
    for line in read_jsonl(path):
        if line.obj is None:
            raise LeakError(f"{path.name}:{line.offset}: unreadable row ({line.reason})")
        row = line.obj
        rows += 1
        q = row.get("quality_score")
        if q in SFT_NEVER or q not in allowed:
            raise LeakError(f"{path.name}:{line.offset}: quality_score {q!r} must never be in SFT (allowed: "
                            f"{', '.join(sorted(allowed))})")
        p = row["provenance"]
        if current is None or current[0] != p["source_file"]:
            current = (p["source_file"], LineCursor(read_jsonl(ws.out / p["source_file"])))
        last = current[1].at(p["line_offset"])
        if last is None or last.obj is None:
            raise LeakError(f"{path.name}:{line.offset}: its scored run {p['source_file']}:{p['line_offset']} "
                            "is missing")
        if last.obj["category"] != q or last.obj["category"] in SFT_NEVER:
            raise LeakError(f"{path.name}:{line.offset}: labelled {q!r} but its scored run is "
                            f"{last.obj['category']!r}")
    return rows


# --- the stage ----------------------------------------------------------------------------


def _merge_export(e: str, ws: Workspace, tmp_root: Path, n_jobs: int, buckets: int, ecfg: ExportConfig,
                  include_partial: bool, parts: list[ExportStats]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Path, Path]]]:
    """Merge one export's part files into its export, quarantine and stats files under
    `tmp_root` (nothing published): (its result, its outputs, the (temp, final) moves)."""
    st = ExportStats(e)
    for part in parts:
        st.add(part)
    rel, qrel = EXPORT_FILES[e], quarantine_file(stage_name(e))
    stats_rel = rel.removesuffix(".jsonl") + ".stats.json"
    tmp, qtmp = tmp_root / f"out-{e}.jsonl", tmp_root / f"outq-{e}.jsonl"
    comp = Composition(e)
    with open(qtmp, "wb") as qf:
        qw = QuarantineWriter(qf, shared=False)
        with open(tmp, "wb") as f:
            if e == "preference":
                rows = _merge_preference(tmp_root, n_jobs, buckets, f, qw, ecfg.max_pairs_per_task, st)
            else:
                rows = _merge_dedup([tmp_root / f"{e}-{i:06d}.jsonl" for i in range(n_jobs)], f, qw, ecfg.dedup, st)
            for row in rows:
                comp.add(row)
            f.flush()
            fsync(f.fileno())
        qf.flush()
        fsync(qf.fileno())
    if st.rows_in != st.rows_out + st.quarantined:
        raise AccountingError(f"{e}: {st.rows_in} in, {st.rows_out} out + {st.quarantined} quarantined")
    if e == "sft":  # defence 3: re-read what was written, against the scored runs
        verify_sft(tmp, ws, sft_categories(include_partial))
    stats_tmp = tmp_root / f"stats-{e}.json"
    stats_json = comp.to_json(st, rel)
    stats_bytes = orjson.dumps(stats_json, option=orjson.OPT_INDENT_2) + b"\n"
    stats_tmp.write_bytes(stats_bytes)
    result = {**stats_json, "rows_out": st.rows_out, "quarantine": qrel, "quarantine_shared": EXPORT_QUARANTINE,
              "stats_path": stats_rel}
    outputs = [{"path": rel, "sha256": st.sha256, "rows": comp.rows},
               {"path": qrel, "sha256": qw.sha256, "rows": qw.rows},
               {"path": stats_rel, "sha256": hashlib.sha256(stats_bytes).hexdigest(), "rows": 1}]
    return result, outputs, [(tmp, ws.out / rel), (qtmp, ws.out / qrel), (stats_tmp, ws.out / stats_rel)]


def run(ws: Workspace, cfg: Config, *, exports: tuple[str, ...] = EXPORTS, include_partial: bool | None = None,
        on_file_done: Callable[[dict[str, ExportStats], int], None] | None = None) -> ExportResult:
    """Write the requested exports. Raises StaleInputError (inputs missing or out of date) or
    LeakError (the SFT re-read failed: nothing was published)."""
    t0 = time.perf_counter()
    ecfg = cfg.export
    include_partial = ecfg.include_partial if include_partial is None else include_partial
    exports = tuple(e for e in EXPORTS if e in exports)
    with ws.lock():
        manifest = read_manifest(ws)
        files = manifest["files"]
        total_bytes = sum((ws.out / f["evidence"]).stat().st_size for f in files)
        buckets = max(1, min(4096, -(-total_bytes // BUCKET_BYTES)))
        tmp_root = Path(tempfile.mkdtemp(prefix=".export-", dir=ws.root / "data"))
        try:
            jobs = [FileJob(i, ws.out / f["evidence"], f["evidence"], ws.out / f["scored"], f["scored"], tmp_root,
                            exports, ecfg, include_partial, buckets) for i, f in enumerate(files)]
            sensitive.prepare()  # compiled once, inherited by forked workers
            outcomes = map_files(export_file, [(j,) for j in jobs], [j.evidence.stat().st_size for j in jobs],
                                 workers=cfg.materialize.workers, parallel_min_bytes=cfg.materialize.parallel_min_bytes,
                                 on_done=on_file_done)
            results: dict[str, dict[str, Any]] = {}
            # the refusals made on reading, in file order: one file for every export
            shared = tmp_root / "outq-shared.jsonl"
            shared_rows, shared_sha = concat_files([tmp_root / f"q-{j.index:06d}.jsonl" for j in jobs], shared)
            staged: list[tuple[Path, Path]] = [(shared, ws.out / EXPORT_QUARANTINE)]
            outputs: list[dict[str, Any]] = []
            # the merges (dedup across files, pairing by bucket) are independent: one per worker
            merges = [(e, ws, tmp_root, len(jobs), buckets, ecfg, include_partial, [o[e] for o in outcomes])
                      for e in exports]
            sizes = [sum(o[e].rows_in for o in outcomes) << 10 for e in exports]  # ~1 KiB a candidate
            for e, (result, outs, moves) in zip(exports, map_files(
                    _merge_export, merges, sizes, workers=cfg.materialize.workers,
                    parallel_min_bytes=cfg.materialize.parallel_min_bytes)):
                results[e] = result
                outputs += outs
                staged += moves
            outputs.append({"path": EXPORT_QUARANTINE, "sha256": shared_sha, "rows": shared_rows})
            for src, dest in staged:  # every export complete and checked: publish
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
            for d in {dest.parent for _, dest in staged}:
                fsync_dir(d)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return ExportResult(results, outputs, time.perf_counter() - t0)
