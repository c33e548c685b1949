"""What refinery reads in a model's answer: the tool calls in it, a refusal, word overlap, and the
check a local answer must pass before it is served (else replay may escalate it).

Shared by `train eval` (scoring base vs adapter) and `replay` (checking and grounding answers).
"""

from __future__ import annotations

import json
import re
from typing import Any

from refinery.normalize import normalize_text

#: How answers that decline the task begin ("I'm sorry, but I can't…", "As an AI…"); curly
#: apostrophes are straightened first.
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can ?not|i can'?t|i won'?t|i'?m (not able|unable)"
    r"|i am (not able|unable)|as an ai|i must decline|unfortunately,? i (can'?t|cannot))",
    re.IGNORECASE)
_JSON_START = re.compile(r"[{\[]")
_DECODER = json.JSONDecoder()
#: Keys that make a JSON object in an answer a tool call (or a botched attempt at one).
_CALL_KEYS = frozenset({"name", "arguments", "tool", "function", "args"})
_MAX_JSON_STARTS = 64  # an answer is scanned for at most this many JSON values

#: The ways a local answer fails its check, in the order they are tested.
EMPTY, MALFORMED_TOOL_CALL, REFUSAL, OVER_LENGTH_CAP = "empty", "malformed_tool_call", "refusal", "over_length_cap"
CHECKS = (EMPTY, MALFORMED_TOOL_CALL, REFUSAL, OVER_LENGTH_CAP)


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The tool calls in an answer, as [{"name", "arguments"}]: JSON objects with a string name
    and arguments, bare or in the OpenAI `function` shape, alone, in a list or one per line,
    with or without text around them. None when the answer makes no call; [] when it tries and
    fails: a JSON object with call keys but no name or arguments (`{"tool": …}`), or an answer
    that starts as JSON (or mentions "name") and does not parse. A citation like `[rag-…]` or a
    JSON example without call keys is not a call."""
    stripped = text.strip()
    attempted = stripped.startswith("{") or re.match(r"\[\s*\{", stripped) is not None
    calls: list[dict[str, Any]] = []
    pos, starts = 0, 0
    while starts < _MAX_JSON_STARTS and (m := _JSON_START.search(stripped, pos)):
        starts += 1
        try:
            obj, pos = _DECODER.raw_decode(stripped, m.start())
        except ValueError:
            if (m.start() == 0 and attempted) or '"name"' in stripped[m.start():m.start() + 200]:
                return []  # a call that does not parse
            pos = m.start() + 1
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            if not isinstance(item, dict) or not _CALL_KEYS & item.keys():
                continue
            fn = item["function"] if isinstance(item.get("function"), dict) else item
            if not isinstance(fn.get("name"), str) or not fn["name"] or "arguments" not in fn:
                return []
            calls.append({"name": fn["name"], "arguments": _arguments(fn["arguments"])})
    if calls:
        return calls
    return [] if attempted else None


def _arguments(args: Any) -> Any:
    """Arguments given as a JSON string (the OpenAI shape) are read as the object they hold."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text[:200].replace("\u2019", "'").replace("\u2018", "'")))


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
