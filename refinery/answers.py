"""What refinery reads in a model's answer: the tool calls in it, a refusal, word overlap, and the
check a local answer must pass before it is served (else replay may escalate it).

Shared by `train eval` (scoring base vs adapter) and `replay` (checking and grounding answers).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from refinery.normalize import normalize_text

_TOOL_JSON = re.compile(r"[\[{].*[\]}]", re.DOTALL)
#: How answers that decline the task begin ("I'm sorry, but I can't…", "As an AI…").
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i can ?not|i can'?t|i won'?t|i'?m (not able|unable)|i am (not able|unable)"
    r"|as an ai|i must decline|unfortunately,? i (can'?t|cannot))",
    re.IGNORECASE)

#: The ways a local answer fails its check, in the order they are tested.
EMPTY, MALFORMED_TOOL_CALL, REFUSAL, OVER_LENGTH_CAP = "empty", "malformed_tool_call", "refusal", "over_length_cap"
CHECKS = (EMPTY, MALFORMED_TOOL_CALL, REFUSAL, OVER_LENGTH_CAP)


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The tool calls in an answer (JSON objects with name and arguments, bare or in the OpenAI
    `function` shape): None when there is no JSON in it, [] when there is JSON that is not a
    valid call."""
    m = _TOOL_JSON.search(text)
    attempted = text.lstrip()[:1] in ("{", "[") or '"name"' in text
    if not m:
        return [] if attempted else None
    try:
        obj = orjson.loads(m.group(0))
    except orjson.JSONDecodeError:
        return [] if attempted else None
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for it in items:
        fn = it.get("function", it) if isinstance(it, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            return []
        calls.append({"name": fn["name"], "arguments": fn["arguments"]})
    return calls


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text[:200]))


def word_f1(a: str, b: str) -> float:
    """Word-overlap F1 of two texts after normalisation (1.0 for two empty texts)."""
    x, y = normalize_text(a).split(), normalize_text(b).split()
    if not x or not y:
        return float(x == y)
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if common == 0:
        return 0.0
    p, r = common / len(x), common / len(y)
    return round(2 * p * r / (p + r), 4)


def check_answer(text: str, *, max_chars: int, finish_reason: str | None = None) -> str | None:
    """Why an answer must not be served as it is — one of CHECKS — or None when it passes.
    An answer cut off by the token limit (finish_reason "length") is over the length cap too."""
    if not text.strip():
        return EMPTY
    if parse_tool_calls(text) == []:
        return MALFORMED_TOOL_CALL
    if is_refusal(text):
        return REFUSAL
    if len(text) > max_chars or finish_reason == "length":
        return OVER_LENGTH_CAP
    return None
