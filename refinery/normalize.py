"""What makes two prompts "the same task" and two answers "the same text".

Used by the scorer (the task key that groups answers for preference pairs) and by the
exports (duplicate answers, identical chosen/rejected texts). Normalising is deliberately
mild — Unicode NFKC, case-folded, whitespace collapsed — so that two answers that differ in
a number or a word are never taken for the same answer.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import orjson

_WS = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", s).casefold()).strip()


_WORDS = re.compile(r"\w+")


def word_ngrams(text: str, n: int) -> list[str]:
    """The word n-grams of the normalised text, each as its words joined by a space; a text of
    fewer than n words is one n-gram, a text without words none. What the decontaminated split
    and the near-duplicate signatures compare."""
    words = _WORDS.findall(normalize_text(text))
    return [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))] if words else []


def task_key(ev: dict[str, Any]) -> str:
    """`tk-<16 hex>` of the normalised prompt; rows without a prompt never share a key."""
    prompt = ev.get("prompt")
    if prompt and prompt.strip():
        basis = "p\x1f" + normalize_text(prompt)
    else:
        basis = "id\x1f" + ev["id"]
    return "tk-" + hashlib.sha256(basis.encode("utf-8")).hexdigest()[:16]


def render_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Tool calls as text, one `{"name", "arguments"}` JSON object per line, in call order.

    A call that used `"tool"` instead of `"name"` is rendered the way it was made: as the
    rejected side of a preference pair, the bad shape is the point.
    """
    def one(c: dict[str, Any]) -> str:
        key = "tool" if c.get("problem") == "tool_key_instead_of_name" else "name"
        return orjson.dumps({key: c["name"], "arguments": c["arguments"]}).decode()

    return "\n".join(one(c) for c in calls)


def last_user_index(messages: list[dict[str, Any]], default: int | None = None) -> int | None:
    """Index of the conversation's last user message (`default` when it has none): the prompt
    ends there, the answer starts after it."""
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=default)


def answer_text(ev: dict[str, Any]) -> str:
    """The whole answer as one text: its tool calls (if any), one JSON line each, then the
    response — the order they happened in (a call, its result, then the answer built on it), and
    the order a model trained on flattened text must learn to write them in."""
    parts = [render_tool_calls(ev["tool_calls"])] if ev.get("tool_calls") else []
    if ev.get("response"):
        parts.append(ev["response"])
    return "\n".join(parts)
