"""`refinery replay --task "…"`: retrieve → prompt → generate locally → check → escalate → log.

    exports/rag/playbooks.jsonl ──BM25──▶ top-k playbooks ──▶ prompt ──▶ offline model ──▶ answer
                                                      (a failed check + --allow-escalation ──▶ endpoint)
    every replay ──▶ one row appended to data/_kb/replays.jsonl (a source stream: evidence next run)

The generator is a parameter, so tests can script it; escalation is tested against a local server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from refinery.answers import check_answer, parse_tool_calls
from refinery.canonical import short_id
from refinery.config import Config
from refinery.errors import RefineryError
from refinery.generation import Generation
from refinery.jsonl import fsync
from refinery.models import ReplayTrace
from refinery.replay.escalation import EscalationFailed, api_key, escalate
from refinery.replay.model import OfflineModel
from refinery.replay.prompt import build_messages
from refinery.replay.retrieval import Hit, RagIndex
from refinery.workspace import Workspace

#: The replay source stream; transforms/replays.py reads it.
REPLAY_LOG = "replays.jsonl"
#: How long a replay waits for a run-all holding the workspace to finish before it gives up logging.
LOG_LOCK_WAIT_S = 120.0

Generator = Callable[[list[dict[str, Any]], int], Generation]


class ReplayUsageError(RefineryError):
    """Bad usage or input (exit 2): an empty task, escalation asked for but not configured."""


@dataclass(frozen=True)
class Answer:
    text: str
    check: str | None
    """why the answer fails its check (answers.CHECKS), None when it passes"""
    finish_reason: str | None
    latency_ms: float


def answer_locally(generate: Generator, messages: list[dict[str, Any]], cfg: Config) -> Answer:
    t0 = time.monotonic()
    out = generate(messages, cfg.replay.max_tokens)
    latency = round((time.monotonic() - t0) * 1000, 1)
    return Answer(out.text, check_answer(out.text, max_chars=cfg.replay.max_answer_chars,
                                         finish_reason=out.finish_reason), out.finish_reason, latency)


def replay(ws: Workspace, cfg: Config, task: str, *, model: OfflineModel, generate: Generator,
           index: RagIndex | None, allow_escalation: bool = False,
           env: dict[str, str] | None = None, log: bool = True) -> dict[str, Any]:
    """Answer `task` (with the index's playbooks, or none when `index` is None) and return the
    trace row — appended to data/_kb/replays.jsonl when `log`. Escalation errors are recorded in
    the row, never raised."""
    task = task.strip()
    if not task:
        raise ReplayUsageError("the task is empty: give it with --task \"…\"")
    try:
        task.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
        raise ReplayUsageError("the task is not valid UTF-8 text: pass it as UTF-8") from None
    key = None
    if allow_escalation:  # before any work: a missing endpoint or key is a usage error
        key = api_key(cfg.replay.escalation, os.environ if env is None else env)
    hits: list[Hit] = index.search(task, cfg.replay.top_k) if index is not None else []
    messages = build_messages(task, [h.row for h in hits], max_chars=cfg.replay.max_playbook_chars)
    started = datetime.now(UTC)
    local = answer_locally(generate, messages, cfg)

    final, final_check, escalation = local.text, local.check, None
    if local.check is not None and allow_escalation:
        ecfg = cfg.replay.escalation
        assert ecfg is not None  # api_key() checked it
        try:
            got = escalate(ecfg, messages, key)
            escalation = {"endpoint": ecfg.base_url, "model": got.model, "ok": True, "error": None,
                          "latency_ms": got.latency_ms}
            final = got.answer
            final_check = check_answer(got.answer, max_chars=cfg.replay.max_answer_chars,
                                       finish_reason=got.finish_reason)
        except EscalationFailed as e:
            escalation = {"endpoint": ecfg.base_url, "model": ecfg.model, "ok": False, "error": str(e),
                          "latency_ms": None}
    escalated = bool(escalation and escalation["ok"])
    ts = started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    row = {
        "schema_version": 1,
        "replay_id": short_id("rp", ts, str(os.getpid()), task),
        "ts": ts,
        "task": task,
        "mode": "retrieval" if index is not None else "no_retrieval",
        "rag_export_sha256": index.export_sha256 if index is not None else None,
        "retrieved": [{"id": h.id, "score": h.score} for h in hits],
        "model": model.base,
        "adapter_id": model.adapter_id,
        "local_answer": local.text,
        "local_check": local.check,
        "local_finish_reason": local.finish_reason,
        "local_latency_ms": local.latency_ms,
        "escalated": escalated,
        "escalation": escalation,
        "answer": final,
        "tool_calls": parse_tool_calls(final) or [],
        "check": final_check,
        "latency_ms": round(local.latency_ms + ((escalation or {}).get("latency_ms") or 0.0), 1),
    }
    ReplayTrace.model_validate(row, strict=True)  # the stream's contract (schemas/replay_trace.v1.json)
    if log:
        append_trace(ws, row)
    return row


def append_trace(ws: Workspace, row: dict[str, Any]) -> None:
    """Append one line to data/_kb/replays.jsonl, under the workspace lock (a run-all reading the
    sources meanwhile sees the file before or after the row, never half of it). One write() of
    the whole line, fsynced; if a killed replay left a torn last line, the new row starts on a
    line of its own, so only the torn one is quarantined by materialize."""
    path = ws.kb / REPLAY_LOG
    line = orjson.dumps(row) + b"\n"
    with ws.lock(wait_s=LOG_LOCK_WAIT_S):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            fsync(fd)
        finally:
            os.close(fd)
