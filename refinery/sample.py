"""A deterministic generator of realistic source streams — the bundled sample data.

`refinery sample --rows N --seed S --out DIR` writes seven streams (per-task runs, an eval
sheet, agent transcripts with tool calls, gateway chat receipts, auditor verdicts, human
feedback, and an OpenAI chat-completions log) about four task domains, spread over a week,
with the defects real operators have: broken JSON, invalid UTF-8, missing fields, wrong types,
exact duplicates, secrets and personal data inside text, `"tool"` instead of `"name"` in tool
calls, runaway tool loops, empty answers, conflicting signals, and the same prompt answered
several times with different outcomes. Rows are written one at a time, so N can be 10^6.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import lru_cache
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

BASE_TIME = datetime(2026, 11, 1, tzinfo=UTC)
SPAN = timedelta(days=7)

# --- the task domains ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # hashed by identity: `args` is a dict
class Task:
    """One concrete task: a prompt, a good answer, and the tool call a good agent makes."""

    domain: str
    task_name: str
    prompt: str
    good: str
    good_alt: str
    partial: str
    bad: str
    tool: str
    args: dict[str, Any]
    tool_result: str
    task_id: str = ""
    """set on a variant (see `variant`); a built-in task's id is in TASK_IDS"""


CUSTOMERS = ["Acme Logistics", "Birchwood Dental", "Corvid Analytics", "Dunmore Bakery", "Elm Street Books"]
INVOICES = ["INV-1042", "INV-2210", "INV-3307", "INV-4471", "INV-5128"]
AMOUNTS = ["49.00", "129.00", "480.00"]
MONTHS = ["August", "September", "October"]
TABLES = [("orders", "created_at"), ("signups", "signed_up_at"), ("tickets", "opened_at")]
SERVICES = ["checkout-api", "search-indexer", "billing-worker", "auth-gateway"]
NAMESPACES = ["prod", "staging"]
ROUTES = [("LIS", "AMS"), ("SFO", "JFK"), ("BER", "MAD"), ("NRT", "SIN")]
DATES = ["2026-12-03", "2026-12-10", "2026-12-17"]


def _billing_tasks() -> Iterator[Task]:
    for cust in CUSTOMERS:
        for inv, amt in zip(INVOICES, AMOUNTS * 2):
            yield Task(
                "billing", "refund_duplicate_charge",
                f"{cust} says invoice {inv} was charged twice (${amt} each). What should support do?",
                f"Look up {inv} in the billing ledger to confirm the duplicate capture, refund the second "
                f"charge of ${amt} to the original card, and reply to {cust} with the refund reference. "
                "Card refunds settle in 5-10 business days; no credit note is needed because the first "
                "charge stands.",
                f"Confirm in the billing ledger that {inv} shows two captures of ${amt}. If it does, refund "
                f"one capture to the card on file (not as store credit) and send {cust} the refund reference; "
                "the bank usually shows it within 5-10 business days.",
                f"Refund ${amt} for {inv} and tell the customer it may take a few days.",
                f"Tell {cust} that duplicate charges resolve themselves automatically within 24 hours, "
                "so no action is needed.",
                "lookup_invoice", {"invoice_id": inv},
                f'{{"invoice_id": "{inv}", "captures": 2, "amount": "{amt}", "currency": "USD"}}',
            )


def _sql_tasks() -> Iterator[Task]:
    for month_i, month in enumerate(MONTHS):
        for table, col in TABLES:
            start = f"2026-{8 + month_i:02d}-01"
            end = f"2026-{9 + month_i:02d}-01"
            query = f"SELECT count(*) FROM {table} WHERE {col} >= '{start}' AND {col} < '{end}';"
            yield Task(
                "analytics", f"count_{table}_by_month",
                f"How many rows in {table} were created in {month} 2026? Give the SQL you used.",
                f"Use a half-open date range so the last day is fully counted:\n{query}\n"
                f"It returned 1,{312 + 7 * month_i} rows for {month} 2026.",
                f"1,{312 + 7 * month_i} rows. I filtered {col} on [{start}, {end}) rather than BETWEEN, "
                f"so timestamps late on the last day of {month} are included:\n{query}",
                f"Count the {table} rows for {month} with a WHERE on {col}.",
                f"SELECT count(*) FROM {table} WHERE month({col}) = '{month}'; -- about 900 rows",
                "run_sql", {"query": query},
                f'[{{"count": {1312 + 7 * month_i}}}]',
            )


def _incident_tasks() -> Iterator[Task]:
    for svc in SERVICES:
        for ns in NAMESPACES:
            yield Task(
                "incidents", "triage_crashloop",
                f"Pod {svc} in namespace {ns} is in CrashLoopBackOff after the last deploy. Diagnose it.",
                f"`kubectl describe pod -n {ns} -l app={svc}` shows the last state as OOMKilled (exit 137) "
                f"right after start-up. The new release loads its cache eagerly; raise the memory limit "
                f"from 256Mi to 512Mi or roll back with `kubectl rollout undo deploy/{svc} -n {ns}`, then "
                "watch the restart count settle.",
                f"The container is OOMKilled (exit 137) seconds after start: the new {svc} build warms its "
                f"cache at boot. Either roll back (`kubectl rollout undo deploy/{svc} -n {ns}`) or raise the "
                "memory limit to 512Mi, then confirm the restart count stops climbing.",
                f"The {svc} container is running out of memory; increase its limit.",
                f"Delete the namespace {ns} and redeploy everything from scratch.",
                "kubectl", {"args": ["describe", "pod", "-n", ns, "-l", f"app={svc}"]},
                "Last State: Terminated\n  Reason: OOMKilled\n  Exit Code: 137",
            )


def _travel_tasks() -> Iterator[Task]:
    for (a, b) in ROUTES:
        for d in DATES:
            yield Task(
                "travel", "book_cheapest_flight",
                f"Find the cheapest direct flight from {a} to {b} on {d} and hold it for the traveller.",
                f"The cheapest direct option {a}→{b} on {d} departs 07:40 and costs EUR 142 in economy "
                "light (no checked bag). I placed a 24-hour hold, reference HX7Q2; confirm before the hold "
                "expires to keep the fare.",
                f"Held the cheapest direct {a}→{b} flight on {d}: 07:40 departure, EUR 142, economy light "
                "without a checked bag. Hold reference HX7Q2 is valid for 24 hours; the traveller must "
                "confirm before then.",
                f"There is a direct flight from {a} to {b} on {d} for about EUR 140.",
                f"Booked a first-class ticket {a}→{b} on {d} for EUR 2,900 and charged the company card.",
                "search_flights", {"origin": a, "destination": b, "date": d, "direct": True},
                '{"offers": [{"dep": "07:40", "price": 142, "currency": "EUR", "cabin": "economy"}]}',
            )


TASKS: list[Task] = [*_billing_tasks(), *_sql_tasks(), *_incident_tasks(), *_travel_tasks()]
TASK_IDS = {t: f"{t.domain}-{i:03d}" for i, t in enumerate(TASKS)}


def _task_id(t: Task) -> str:
    return t.task_id or TASK_IDS[t]


#: How many distinct tasks the streams draw from: the built-in ones unless `generate(tasks=N)`
#: asks for more (a benchmark's diverse traces), set for the duration of that call.
_TASKS_WANTED: ContextVar[int] = ContextVar("tasks_wanted", default=0)


#: What makes a variant's case its own: who asked, where, about what, and who follows up. Two
#: variants of one task share few word 3-grams (their fills differ), so a benchmark's export
#: candidates are distinct rows, not near-duplicates (refinery.neardup) of one another.
_TEAMS = ("payments", "platform", "growth", "support", "logistics", "finance", "security", "research", "mobile",
          "partner", "compliance", "onboarding", "pricing", "fleet", "catalog", "retention", "marketplace",
          "identity", "data", "warehouse", "procurement", "legal", "field", "sales", "editorial", "quality",
          "infrastructure", "checkout", "loyalty", "reporting")
_CITIES = ("Lisbon", "Porto", "Madrid", "Seville", "Lyon", "Nantes", "Ghent", "Utrecht", "Bremen", "Leipzig",
           "Krakow", "Brno", "Graz", "Turin", "Bologna", "Valencia", "Bilbao", "Aarhus", "Malmo", "Tampere",
           "Cork", "Galway", "Leeds", "Bristol", "Glasgow", "Toronto", "Denver", "Austin", "Portland", "Halifax")
_PROJECTS = ("harbor", "lantern", "meadow", "summit", "orchard", "beacon", "cedar", "falcon", "granite", "juniper",
             "kestrel", "lagoon", "maple", "nebula", "osprey", "prairie", "quartz", "raven", "sequoia", "tundra",
             "willow", "aurora", "bramble", "cobalt", "delta", "ember", "fjord", "glacier", "heron", "indigo")
_ASKS = ("wants an answer before the weekly review", "asked for a short written summary",
         "needs this settled before the quarter closes", "is covering for a colleague on leave",
         "flagged it as blocking a customer rollout", "prefers the reply in plain language",
         "will forward the answer to an external auditor", "asked to keep the change minimal",
         "is new to this system and wants the reasoning", "raised it twice already this month",
         "needs a decision the manager can sign off", "asked whether anything else is affected",
         "wants to know how to avoid it next time", "is comparing it with last year's handling",
         "asked for the steps in order", "has a demo with the client tomorrow")
_PEOPLE = ("Amara", "Bruno", "Chidi", "Dagny", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
           "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamsin", "Umar", "Vera", "Wiktor",
           "Ximena", "Yusuf", "Zora", "Anouk", "Bastian", "Carmen", "Dmitri")
_WHEN = ("Monday morning", "Monday afternoon", "Tuesday morning", "Tuesday afternoon", "Wednesday morning",
         "Wednesday afternoon", "Thursday morning", "Thursday afternoon", "Friday morning", "Friday afternoon",
         "the end of the day", "the next standup")


def _case(v: int, salt: str) -> tuple[str, str]:
    """The variant's context sentence (after the prompt) and follow-up sentence (after answers)."""
    rng = random.Random(f"{salt}:{v}")
    pick = lambda xs: xs[rng.randrange(len(xs))]  # noqa: E731
    context = (f"The request comes from the {pick(_TEAMS)} team in {pick(_CITIES)}, working on project "
               f"{pick(_PROJECTS)}; the requester {pick(_ASKS)}.")
    follow = (f"{pick(_PEOPLE)} from {pick(_TEAMS)} owns the follow-up and checks back {pick(_WHEN)} "
              f"with {pick(_PEOPLE)} in {pick(_CITIES)}.")
    return context, follow


def variant(t: Task, v: int) -> Task:
    """Variant `v` of a built-in task (0 is the task itself): the same work for another case, so
    its prompt and every answer carry the case reference and differ from every other variant's —
    the prompt by a context sentence, each answer by a follow-up sentence, both of the variant's
    own (see `_case`)."""
    if not v:
        return t
    return _variant(TASK_IDS[t], v)


@lru_cache(maxsize=1 << 14)
def _variant(task_id: str, v: int) -> Task:
    t = TASKS[int(task_id.rsplit("-", 1)[1])]
    ref = f"case C-{v:07d}"
    context, follow = _case(v, task_id)
    return replace(t, prompt=f"{t.prompt} {context} ({ref})", good=f"{t.good} {follow} Logged under {ref}.",
                   good_alt=f"{t.good_alt} {follow} Noted on {ref}.", partial=f"{t.partial} {follow} ({ref})",
                   bad=f"{t.bad} {follow} ({ref})", task_id=f"{task_id}-{v:07d}")


MODELS = [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"), ("local", "qwen2.5-7b-instruct")]
REVIEWERS = ["maria.k", "tom.w", "ops-bot", "li.chen"]
AUDITORS = ["policy-auditor-v3", "safety-auditor-v1"]

SECRETS = [
    "For the retry use the key sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c (it has billing scope).",
    "Call it with header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcHMifQ.c2lnbmF0dXJl",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7r0mQ1k3Zt9bX2fE8yQ0tn1rV\n-----END RSA PRIVATE KEY-----",
    "Ping the account owner at jane.doe@corvid-analytics.com or +1 415 555 0142 if it fails again.",
    "DB password is hunter2-prod; rotate it after the incident.",
]

# --- row outcomes -------------------------------------------------------------------------

OUTCOMES = ("good", "good", "good", "good", "good", "partial", "partial", "bad", "bad", "empty", "conflict")


@dataclass
class Draw:
    """The random choices behind one row, shared by every family's row builder."""

    i: int
    task: Task
    outcome: str
    ts: datetime
    provider: str
    model: str
    rng: random.Random

    @property
    def answer(self) -> str:
        good = self.task.good if self.i % 3 else self.task.good_alt
        return {"good": good, "partial": self.task.partial, "bad": self.task.bad,
                "empty": "", "conflict": self.task.partial}[self.outcome]

    @property
    def score(self) -> float:
        r = self.rng.random()
        return round({"good": 0.78 + 0.2 * r, "partial": 0.5 + 0.18 * r, "bad": 0.05 + 0.3 * r,
                      "empty": 0.0, "conflict": 0.2 + 0.2 * r}[self.outcome], 2)

    @property
    def approved(self) -> bool:
        return self.outcome in ("good", "conflict")

    @property
    def reviewer(self) -> str:
        """Who signed the row off ('' when nobody did); drawn only for approved rows."""
        return REVIEWERS[self.i % len(REVIEWERS)] if self.approved and self.i % 5 else ""


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _secret_answer(d: Draw) -> str:
    return d.task.good + " " + SECRETS[d.i % len(SECRETS)]


# --- the families -------------------------------------------------------------------------
# Each builder returns the row as a dict; defects are applied afterwards, on the encoded line.


def _run_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    failed = d.outcome == "bad" and d.rng.random() < 0.4
    row = {
        "run_id": f"run-{d.i:07d}", "task_id": _task_id(t), "task_name": t.task_name,
        "started_at": _iso(d.ts), "finished_at": _iso(d.ts + timedelta(seconds=3 + d.i % 40)),
        "model": d.model, "prompt": t.prompt, "output": "" if failed else answer,
        "exit_status": "1" if failed else "0",
        "error": "ToolTimeout: lookup exceeded 30s" if failed else "",
        "tool_calls": str(25 + d.i % 9) if defect == "runaway" else str(1 + d.i % 3),
        "stop_reason": "" if defect == "no_stop" else ("error" if failed else "end_turn"),
        "check_score": "" if d.i % 6 == 5 else f"{d.score:.2f}",  # the automated checker skips some
        "reviewed_by": d.reviewer,
    }
    if defect == "missing":
        row["started_at"] = ""
    if defect == "wrong_type":
        row["exit_status"] = "ok"
    return row


def _eval_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    row = {
        "eval_id": f"ev-{d.i:07d}", "task_id": _task_id(t), "task_name": t.task_name,
        "prompt": t.prompt, "expected": t.good, "output": answer, "score": f"{d.score:.2f}",
        "approver": d.rng.choice(REVIEWERS) if d.approved else "", "evaluated_at": _iso(d.ts),
    }
    if defect == "missing":
        row["prompt"] = ""
    if defect == "wrong_type":
        row["score"] = "high"
    return row


def _transcript_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    calls = 22 + d.i % 7 if defect == "runaway" else 1
    key = "tool" if defect == "tool_key" else "name"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"You are the {t.domain} operations agent. Use tools before answering."},
        {"role": "user", "content": t.prompt},
    ]
    for c in range(calls):
        call_id = f"call_{d.i:07d}_{c}"
        messages.append({"role": "assistant", "content": None,
                         "tool_calls": [{"id": call_id, key: t.tool, "arguments": t.args}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "name": t.tool, "content": t.tool_result})
    messages.append({"role": "assistant", "content": answer})
    row = {
        "trace_id": f"tr-{d.i:07d}", "task_id": _task_id(t), "task_name": t.task_name,
        "started_at": _iso(d.ts), "model": d.model, "provider": d.provider, "messages": messages,
        "status": "max_turns" if defect == "runaway" else "completed",
        "stop_reason": None if defect in ("runaway", "no_stop") else "end_turn",
        "latency_ms": 800 + (d.i * 37) % 4000,
    }
    if d.i % 4:  # the grader ran on most traces
        row["outcome"] = {"score": d.score, "reviewed_by": d.reviewer or None}
    if defect == "missing":
        del row["started_at"]
    if defect == "wrong_type":
        row["messages"] = t.prompt
    return row


def _gateway_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    row = {
        "request_id": f"req-{d.i:07d}", "ts": int(d.ts.timestamp() * 1000), "provider": d.provider,
        "model": d.model, "latency_ms": 300 + (d.i * 53) % 2500,
        "usage": {"prompt_tokens": 40 + len(t.prompt) // 4, "completion_tokens": len(answer) // 4},
        "prompt": t.prompt, "completion": answer,
        "finish_reason": "length" if defect == "no_stop" else "stop", "status_code": 200,
    }
    if defect == "missing":
        del row["prompt"]
    if defect == "wrong_type":
        row["latency_ms"] = "fast"
    return row


def _audit_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    verdict = {"good": "pass", "partial": "pass", "bad": "fail", "empty": "fail", "conflict": "flag"}[d.outcome]
    flags = ["credential_in_output"] if defect == "secret" else (
        ["unsafe_action"] if d.outcome == "bad" and t.domain == "incidents" else [])
    row = {
        "audit_id": f"au-{d.i:07d}", "audited_at": _iso(d.ts), "auditor": AUDITORS[d.i % 2],
        "subject": {"task_id": _task_id(t), "task_name": t.task_name,
                    "prompt": t.prompt, "response": answer, "model": d.model},
        "verdict": verdict, "findings": [] if verdict == "pass" else [f"{d.outcome} answer"],
        "safety_flags": flags,
    }
    if defect == "missing":
        del row["subject"]["prompt"]
    if defect == "wrong_type":
        row["verdict"] = 3
    return row


def _feedback_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    stars = {"good": 5, "partial": 3, "bad": 1, "empty": 1, "conflict": 2}[d.outcome]
    row = {
        "feedback_id": f"fb-{d.i:07d}", "created_at": _iso(d.ts), "reviewer": d.rng.choice(REVIEWERS),
        "task_id": _task_id(t), "task_name": t.task_name, "prompt": t.prompt,
        "response": answer, "rating": stars, "thumbs": "up" if stars >= 4 else "down",
        "comment": {"good": "Exactly what I needed.", "partial": "Right idea, missing details.",
                    "bad": "Wrong and potentially harmful.", "empty": "No answer at all.",
                    "conflict": "Approved by mistake? Answer is thin."}[d.outcome],
    }
    if defect == "missing":
        del row["response"]
    if defect == "wrong_type":
        row["rating"] = "five"
    return row


def _openai_row(d: Draw, defect: str | None) -> dict[str, Any]:
    t = d.task
    answer = _secret_answer(d) if defect == "secret" else d.answer
    tool_call = {"id": f"call_{d.i:07d}", "type": "function",
                 "function": {"name": t.tool, "arguments": orjson.dumps(t.args).decode()}}
    use_tool = d.i % 4 == 0
    message = ({"role": "assistant", "content": None, "tool_calls": [tool_call]} if use_tool
               else {"role": "assistant", "content": answer, "refusal": None})
    row = {
        "request": {"model": d.model, "messages": [{"role": "user", "content": t.prompt}],
                    "tools": [{"type": "function", "function": {"name": t.tool, "parameters": {"type": "object"}}}]},
        "response": {"id": f"chatcmpl-{d.i:07d}", "created": int(d.ts.timestamp()), "model": d.model,
                     "choices": [{"index": 0, "message": message,
                                  "finish_reason": "tool_calls" if use_tool else
                                  ("length" if defect == "no_stop" else "stop")}],
                     "usage": {"prompt_tokens": 30 + len(t.prompt) // 4, "completion_tokens": len(answer) // 4}},
    }
    if defect == "missing":
        del row["response"]["created"]
    if defect == "wrong_type":
        row["request"]["messages"] = "not a list"
    return row


@dataclass(frozen=True)
class Family:
    file: str
    weight: float
    build: Callable[[Draw, str | None], dict[str, Any]] | None
    defects: tuple[str, ...]
    write: Callable[[int, int, Path], dict[str, int]] | None = None
    """for a public format (refinery.sample_formats): writes its own files, returns lines per file"""


# Which defects each family can carry; row encoding defects are applied to the line itself.
LINE_DEFECTS = ("broken_json", "invalid_utf8", "duplicate")
def _public(writer: str) -> Callable[[int, int, Path], dict[str, int]]:
    """A writer of refinery.sample_formats (imported when used: it imports this module)."""
    def write(rows: int, seed: int, out: Path) -> dict[str, int]:
        from refinery import sample_formats

        return getattr(sample_formats, writer)(rows, seed, out)
    return write


FAMILIES: tuple[Family, ...] = (
    Family("runs.csv", 0.13, _run_row,
           ("secret", "missing", "wrong_type", "runaway", "no_stop", "invalid_utf8", "duplicate", "broken_json")),
    Family("eval.csv", 0.12, _eval_row,
           ("secret", "missing", "wrong_type", "invalid_utf8", "duplicate", "broken_json")),
    Family("agent_transcripts.jsonl", 0.15, _transcript_row,
           ("secret", "tool_key", "runaway", "missing", "wrong_type", "no_stop", *LINE_DEFECTS)),
    Family("gateway_receipts.jsonl", 0.13, _gateway_row,
           ("secret", "missing", "wrong_type", "no_stop", *LINE_DEFECTS)),
    Family("auditor_verdicts.jsonl", 0.08, _audit_row, ("secret", "missing", "wrong_type", *LINE_DEFECTS)),
    Family("human_feedback.jsonl", 0.08, _feedback_row, ("secret", "missing", "wrong_type", *LINE_DEFECTS)),
    Family("openai_chat_log.jsonl", 0.06, _openai_row,
           ("secret", "missing", "wrong_type", "no_stop", *LINE_DEFECTS)),
    # the public formats operators' tools write (refinery.sample_formats)
    Family("batch", 0.07, None, (), _public("write_batch")),
    Family("promptfoo", 0.06, None, (), _public("write_promptfoo")),
    Family("inspect", 0.05, None, (), _public("write_inspect")),
    Family("langfuse", 0.04, None, (), _public("write_langfuse")),
    Family("otel", 0.03, None, (), _public("write_otel")),
)
DEFECT_EVERY = 9  # one row in nine carries a defect, cycling through the family's kinds


def _rows_per_family(rows: int) -> list[int]:
    counts = [int(rows * f.weight) for f in FAMILIES]
    for k in range(rows - sum(counts)):
        counts[k % len(counts)] += 1
    return counts


def _csv_line(row: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row.values())
    return buf.getvalue().encode("utf-8")


def _corrupt(line: bytes, defect: str) -> bytes:
    body = line.rstrip(b"\n")
    if defect == "broken_json":
        cut = body[: max(1, len(body) * 3 // 5)]
        return cut + b"\n"
    if defect == "invalid_utf8":
        mid = len(body) // 2
        return body[:mid] + b"\xff\xfe\xc3" + body[mid:] + b"\n"
    return line


def draws(name: str, defects: tuple[str, ...], rows: int, seed: int) -> Iterator[tuple[Draw | None, str | None]]:
    """The draws of one stream, one at a time: (draw, defect), or (None, "duplicate") where the
    previous row repeats. The same name, rows and seed give the same draws."""
    rng = random.Random(f"{seed}:{name}")
    # variants are drawn from a stream of their own, so the built-in draws stay as they are
    variants = -(-max(_TASKS_WANTED.get(), len(TASKS)) // len(TASKS))
    vrng = random.Random(f"{seed}:{name}:variants") if variants > 1 else None
    step = SPAN / max(rows, 1)
    for i in range(rows):
        defect = defects[(i // DEFECT_EVERY) % len(defects)] if i % DEFECT_EVERY == 4 else None
        if defect == "duplicate" and i:
            yield None, defect
            continue
        provider, model = MODELS[rng.randrange(len(MODELS))]
        task = TASKS[rng.randrange(len(TASKS))]
        if vrng is not None:
            task = variant(task, vrng.randrange(variants))
        yield Draw(i, task, OUTCOMES[rng.randrange(len(OUTCOMES))],
                   BASE_TIME + step * i + timedelta(seconds=rng.randrange(60)), provider, model, rng), defect


def generate_family(fam: Family, rows: int, seed: int, out: Path) -> int:
    """Write one stream of `rows` lines; return the number of lines written."""
    is_csv = fam.file.endswith(".csv")
    path = out / fam.file
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    prev: bytes | None = None
    with open(tmp, "wb") as f:
        header_done = False
        for d, defect in draws(fam.file, fam.defects, rows, seed):
            if d is None:
                f.write(prev)
                written += 1
                continue
            row = fam.build(d, defect)
            if is_csv:
                if not header_done:
                    f.write(_csv_line({k: k for k in row}))
                    header_done = True
                line = _csv_line(row)
                if defect == "broken_json":  # CSV's version: a record with a column missing
                    line = _csv_line(dict(list(row.items())[:-1]))
            else:
                line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
            if defect == "invalid_utf8" or (defect == "broken_json" and not is_csv):
                line = _corrupt(line, defect)
            f.write(line)
            prev = line
            written += 1
    tmp.replace(path)
    return written


def generate(rows: int, seed: int, out: Path,
             on_family: Callable[[str, int], None] | None = None, tasks: int | None = None) -> dict[str, int]:
    """Write every family into `out`; return lines written per file. `tasks` above the built-in
    count draws each row's task from that many (variants of the built-in ones, each with a case
    reference in its prompt and answers): traces that rarely repeat, for benchmarks."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    token = _TASKS_WANTED.set(tasks or 0)
    try:
        for fam, n in zip(FAMILIES, _rows_per_family(rows)):
            files = fam.write(n, seed, out) if fam.write else {fam.file: generate_family(fam, n, seed, out)}
            written.update(files)
            if on_family:
                for name, lines in files.items():
                    on_family(name, lines)
    finally:
        _TASKS_WANTED.reset(token)
    return written
