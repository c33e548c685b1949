"""Secrets and personal data: found before any row reaches an export.

Seven kinds, in two families. Secrets (`api_key`, `bearer_token`, `private_key`, `password`)
quarantine a row as `secret_detected`; personal data (`email`, `phone`, `private_note`) as
`pii_detected`. With `export.sensitive = "redact"` the match is replaced by
`[REDACTED:<kind>]` instead and the row goes on; kinds listed in `export.allow_sensitive`
are left alone. A finding names the kind and the field, never the value.

The patterns lean towards catching too much: a false positive costs one quarantined row, a
false negative leaks a credential into a training set. Phone numbers need separators or a
leading + so that dates, invoice numbers and counts are not taken for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

SECRET_KINDS = ("api_key", "bearer_token", "private_key", "password")
PII_KINDS = ("email", "phone", "private_note")
KINDS = SECRET_KINDS + PII_KINDS

_PATTERNS: dict[str, str] = {
    "private_key": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
                   r"(?: BLOCK)?-----|.*)",
    "bearer_token": r"\bBearer\s+[A-Za-z0-9\-._~+/]{12,}=*"
                    r"|\beyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{6,}",
    "api_key": r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9]{16,}"
               r"|\bAKIA[0-9A-Z]{16}\b"
               r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
               r"|\bgithub_pat_[A-Za-z0-9_]{30,}"
               r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"
               r"|\bAIza[0-9A-Za-z_-]{35}"
               r"|(?i:\b(?:api[_-]?key|secret[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret)"
               r"\b[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-./+]{12,})",
    "password": r"(?i:\b(?:password|passwd|passphrase|pwd)\b\s*(?:is|was|[:=])\s*[\"']?[^\s\"',;]{3,})",
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?"
             r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)",
    "private_note": r"(?i:\[(?:private|confidential|internal only)\]|<private>.*?(?:</private>|$)"
                    r"|\bprivate note\s*:)",
}
_COMBINED = re.compile("|".join(f"(?P<{k}>{v})" for k, v in _PATTERNS.items()), re.DOTALL)


def reason_family(kind: str) -> str:
    return "secret" if kind in SECRET_KINDS else "pii"


def find(text: str, allow: Iterable[str] = ()) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of every sensitive span in `text` not in `allow`."""
    allowed = set(allow)
    for m in _COMBINED.finditer(text):
        kind = m.lastgroup
        if kind not in allowed:
            yield kind, m.start(), m.end()


# Cheap substring triggers (on the lower-cased text) before each kind's regex runs: most rows
# have none, and a substring search costs a fraction of a regex scan.
_KIND_RES = {k: re.compile(v, re.DOTALL) for k, v in _PATTERNS.items()}
_TRIGGERS: dict[str, tuple[str, ...]] = {
    "private_key": ("private key",),
    "bearer_token": ("bearer", "eyj"),
    "api_key": ("sk-", "pk-", "rk-", "akia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "aiza",
                "key", "token", "secret"),
    "password": ("pass", "pwd"),
    "email": ("@",),
    "phone": (),  # decided by _PHONE_HINT
    "private_note": ("private", "confidential", "internal only"),
}
_PHONE_HINT = re.compile(r"\+\d|\(\d{3}\)|\d{3}[.-]\d{3}[.-]")
_ALL_TRIGGERS = tuple(t for ts in _TRIGGERS.values() for t in ts)


def first_finding(fields: Iterable[tuple[str, Any]], allow: Iterable[str] = ()) -> tuple[str, str] | None:
    """(kind, field) of a sensitive span in any of the (field name, value) pairs, or None.

    Values may be strings or nested JSON (lists/dicts, e.g. tool-call arguments); every string
    inside is searched. Kinds are tried in a fixed order, so the answer is deterministic.
    """
    named = [(name, text) for name, value in fields for text in _strings(value)]
    joined = "\n".join(t for _, t in named)
    lower = joined.lower()
    for t in _ALL_TRIGGERS:
        if t in lower:
            break
    else:
        if _PHONE_HINT.search(joined) is None:  # the common case: nothing that could be sensitive
            return None
    allow = set(allow)
    for kind, rx in _KIND_RES.items():
        if kind in allow:
            continue
        triggers = _TRIGGERS[kind]
        if triggers:
            if not any(t in lower for t in triggers):
                continue
        elif _PHONE_HINT.search(joined) is None:
            continue
        if rx.search(joined) is None:
            continue
        where = next((name for name, text in named if rx.search(text)), "text")
        return kind, where
    return None


def redact(value: Any, allow: Iterable[str] = ()) -> tuple[Any, list[str]]:
    """`value` with every sensitive span replaced by `[REDACTED:<kind>]`; (new value, kinds found)."""
    allowed = set(allow)
    found: list[str] = []

    def one(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.lastgroup in allowed:
                return m.group(0)
            found.append(m.lastgroup)
            return f"[REDACTED:{m.lastgroup}]"

        return _COMBINED.sub(sub, text)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return one(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value), found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
