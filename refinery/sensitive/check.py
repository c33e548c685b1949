"""The independent second pass: what the audit uses to check the exports the engine let through.

A check that runs the same code as the thing it checks cannot catch that code's blind spots.
This pass shares no rule, no normaliser and no decoder with `refinery.sensitive`:

- it runs detect-secrets' own scanner (each plugin's `analyze_line`, including the keyword and
  high-entropy detectors the engine does not load) rather than refinery's reading of its
  patterns;
- it looks for generated-looking tokens by entropy alone, without any key-like word nearby
  (mixed-case letters and digits; hex alone is not enough, and the id shapes trace formats
  document — `call_…`, `chatcmpl-…`, `toolu_…` — are ids);
- it keeps refinery's earlier hand-written rule list as a second opinion on token shapes;
- it checks numbers with python-stdnum directly: any Luhn-valid 14–19-digit run starting 2–6
  (no issuer table), any valid IBAN, any dashed SSN outside the never-issued ranges;
- it builds its own views of each string: Unicode category Cf removed and NFKC, URL-decoded,
  JSON-unescaped by the json module, and every base64 or hex token decoded.

It is tuned to report nothing on clean rows (the bundled sample's exports give none), so any
finding on a written export is a finding the engine missed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any
from urllib.parse import unquote

from refinery.sensitive import Finding

# refinery's hand-written list from before the engine was built on detect-secrets
_LEGACY: dict[str, str] = {
    "private_key": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY",
    "bearer_token": r"\bBearer\s+[A-Za-z0-9\-._~+/]{12,}=*"
                    r"|\beyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{6,}",
    "api_key": r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}"
               r"|\bgithub_pat_[A-Za-z0-9_]{30,}|\bxox[abposr]-[A-Za-z0-9-]{10,}|\bAIza[0-9A-Za-z_-]{35}"
               r"|\bglpat-[A-Za-z0-9_-]{20,}|\bhf_[A-Za-z0-9]{30,}"
               r"|(?i:\b(?:api[_-]?key|secret[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret)"
               r"\b[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-./+]{12,})",
    "password": r"(?i:\b(?:password|passwd|passphrase|pwd)\b\s*(?:is|was|[:=])\s*[\"']?[^\s\"',;]*\d[^\s\"',;]*)"
                r"|[a-z][a-z0-9+.-]*://[^\s:/@]*:[^\s/@]+@",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w.-]*:[\w/])",
    "phone": r"\+\d{1,3}[\s.()-]*\d[\d\s.()/-]{6,}\d|\(\d{3}\)\s?\d{3}-\d{4}|\b\d{3}[.-]\d{3}[.-]\d{4}\b|\b00\d{2} \d",
    "private_note": r"(?i)\[(?:private|confidential|internal only)\]|<private>",
    "ssn": r"(?i)\b(?:ssn|social security)\D{0,20}\d{9}\b",
}
_LEGACY_RES = [(k, re.compile(v, re.DOTALL)) for k, v in _LEGACY.items()]
_DIGIT = re.compile(r"\d")


def _legacy_gates(view: str, folded: str, digit: bool) -> dict[str, bool]:
    """Per legacy expression, whether the line holds what every match of it needs (a line
    without "@" holds no email; without a digit, no phone number or SSN): most lines skip most
    of them. `folded`: the line's case folding, as the (?i) parts compare ("ſ" is an "s");
    `digit`: whether it holds a digit (as `\\d` matches)."""
    return {"private_key": "-----BEGIN " in view, "bearer_token": "Bearer" in view or "eyJ" in view,
            "api_key": (any(w in view for w in _API_KEY_LITERALS)
                        or any(w in folded for w in ("key", "token", "secret"))),
            "password": "@" in view or "pass" in folded or "pwd" in folded, "email": "@" in view,
            "phone": digit, "private_note": "[" in view or "<" in view, "ssn": digit}


#: what each case-sensitive alternative of the legacy api_key expression starts with
_API_KEY_LITERALS = ("sk-", "pk-", "rk-", "AKIA", "gh", "github_pat_", "xox", "AIza", "glpat-", "hf_")

_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{20,}={0,2}")  # "=" ends a token but for base64 padding (KEY=value)
# card numbers start with 2–6 (Mastercard, Amex/Diners/JCB, Visa, Discover/UnionPay); a leading 1
# is a millisecond timestamp
_DIGITS = re.compile(r"(?<![\d.])[2-6](?:[ -]?\d){13,18}(?![\d.])")
# Ids that trace formats document (OpenAI tool calls, completions, messages, responses, batches,
# files, organisations; Anthropic tool uses; LangSmith runs; Stripe customers, payment intents,
# subscriptions, charges, prices, products, accounts) and subresource-integrity digests
# (sha512-…): generated, so high in entropy, but not secrets.
_ID = re.compile(r"(?:call|toolu|chatcmpl|msg|resp|batch|file|req|fc|run|asst|thread|step|evt|org|proj|cus|pi"
                 r"|sub|ch|price|prod|acct|sha256|sha384|sha512)[_-]")
_IBANISH = re.compile(r"\b[A-Z]{2}\d{2}[A-Z0-9 ]{11,40}")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")


#: Left out of the second pass: ids and hashes in traces are hex (OpenTelemetry trace and span
#: ids, request ids, sha256 digests), so hex entropy alone cannot tell them from keys; hex keys
#: next to a key-like word are still found by the keyword detector.
_NOT_RUN = {"HexHighEntropyString"}


@cache
def _plugins() -> list[tuple[str, Any]]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    from refinery.sensitive.rules import DETECT_SECRETS, DETECT_SECRETS_SKIPPED

    kinds = {name: kind for name, (kind, _) in DETECT_SECRETS.items()}
    kinds.update({"KeywordDetector": "password", "Base64HighEntropyString": "api_key",
                  "HexHighEntropyString": "api_key"})
    out = []
    for cls in sorted(get_mapping_from_secret_type_to_class().values(), key=lambda c: c.__name__):
        if cls.__name__ not in DETECT_SECRETS_SKIPPED and cls.__name__ not in _NOT_RUN:
            out.append((kinds.get(cls.__name__, "api_key"), cls()))
    return out


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _generated(token: str) -> bool:
    t = token.rstrip("=")
    upper, lower, digits = (sum(f(c) for c in t) for f in (str.isupper, str.islower, str.isdigit))
    # hex with a few other letters is an id or a timestamp (a uuid, LangSmith's dotted_order
    # 20261120T110203004005Z5e6f…); base64 of 20+ characters has a dozen letters past f
    past_f = sum(c.isalpha() and c.lower() > "f" for c in t)
    if len(t) < 20 or upper < 2 or lower < 2 or past_f < 5:
        return False
    h = _entropy(t)
    return (digits >= 2 and h >= 4.0) or (len(t) >= 30 and h >= 4.3)


def _pathlike(token: str) -> bool:
    """A path such as data/_kb/anthropic_messages/ORIGIN: '/' (standard base64) mixed with '_', '-'
    or '.' (URL-safe base64, file names) is no base64 at all."""
    return "/" in token and any(c in token for c in "_-.")


def _views(text: str) -> Iterator[str]:
    yield text
    if text.isascii():  # no format character is ASCII, and NFKC leaves ASCII as it is
        stripped = text
    else:
        stripped = unicodedata.normalize("NFKC", "".join(c for c in text if unicodedata.category(c) != "Cf"))
    if stripped != text:
        yield stripped
    if "%" in stripped:
        yield unquote(stripped)
    if "\\" in stripped:
        try:
            yield json.loads('"' + stripped.replace('"', '\\"') + '"')
        except ValueError:
            pass
    for token in _TOKEN.findall(stripped):
        for decode in (base64.b64decode, base64.urlsafe_b64decode, bytes.fromhex):
            try:
                raw = decode(token + "=" * (-len(token) % 4)) if decode is not bytes.fromhex else decode(token)
                yield raw.decode("utf-8")
            except (binascii.Error, ValueError):
                continue


@cache
def _keyword_gate() -> re.Pattern[str]:
    """detect-secrets' keyword detector costs ~150 µs a line, and every one of its patterns needs
    a word of its own DENYLIST (api_?key, password, secret, …): a line without one is skipped."""
    from detect_secrets.plugins.keyword import DENYLIST

    return re.compile("|".join(DENYLIST), re.IGNORECASE)


@cache
def _gated_plugins() -> list[tuple[str, Any, tuple[re.Pattern[str], ...] | None, tuple[str, ...] | None]]:
    """(kind, plugin, gate, literals): a plugin that finds only what its denylist's regular
    expressions match (detect-secrets' RegexBasedDetector, as it is) finds nothing in a line none
    of them matches anywhere, so it is called only where one does — a search per expression
    instead of a call through its machinery (most lines match none). The keyword detector's gate
    is its DENYLIST words, searched for only in a line whose case folding holds one of `literals`."""
    from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector

    out = []
    for kind, plugin in _plugins():
        cls = type(plugin)
        gate, literals = None, None
        if cls.__name__ == "KeywordDetector":
            gate, literals = (_keyword_gate(),), _keyword_literals()
        elif (isinstance(plugin, RegexBasedDetector) and cls.analyze_line is BasePlugin.analyze_line
              and cls.analyze_string is RegexBasedDetector.analyze_string):
            gate = tuple(plugin.denylist)
        out.append((kind, plugin, gate, literals))
    return out


@cache
def _keyword_literals() -> tuple[str, ...] | None:
    """A literal in each of the keyword detector's DENYLIST words (api_?key, db_?pass, passwd,
    pwd, secret, contraseña, …), or None when a word of a later detect-secrets holds none of them."""
    from detect_secrets.plugins.keyword import DENYLIST

    literals = ("key", "pass", "pwd", "secret", "contrase")
    return literals if all(any(w in word for w in literals) for word in DENYLIST) else None


def _in_view(view: str) -> Iterator[tuple[str, str]]:
    folded = view.casefold()
    for kind, plugin, gate, literals in _gated_plugins():
        if literals is not None and not any(w in folded for w in literals):
            continue
        if gate is not None and not any(rx.search(view) for rx in gate):
            continue
        if plugin.analyze_line(filename="refinery-export.txt", line=view, line_number=0):
            yield kind, f"detect-secrets scan:{type(plugin).__name__}"
    for token in _TOKEN.findall(view):
        if _generated(token) and not _ID.match(token) and not _pathlike(token):
            yield "api_key", "entropy"
    digit = _DIGIT.search(view) is not None
    gates = _legacy_gates(view, folded, digit)
    for kind, rx in _LEGACY_RES:
        if gates[kind] and rx.search(view):
            yield kind, f"legacy:{kind}"
    if digit:  # what the card, IBAN and SSN expressions below all need
        from stdnum import iban, luhn

        for run in _DIGITS.findall(view):
            if luhn.is_valid(re.sub(r"\D", "", run)):
                yield "credit_card", "stdnum:luhn"
        for run in _IBANISH.findall(view):
            compact = run.replace(" ", "")
            if any(iban.is_valid(compact[:n]) for n in range(15, len(compact) + 1)):
                yield "iban", "stdnum:iban"
        if _SSN.search(view):
            yield "ssn", "ssn-ranges"


def _strings(value: Any) -> Iterator[tuple[str, bool]]:
    if isinstance(value, str):
        yield value, False
        t = value.strip()
        if t[:1] in ("{", "[") and t[-1:] in ("}", "]"):
            try:
                yield from _strings(json.loads(t))
            except ValueError:
                pass
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
        yield str(value), False  # a card or an SSN written as a JSON number
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k), True
            yield from _strings(v)


_SEEN: dict[str, tuple[tuple[str, str], ...]] = {}
_SEEN_CHARS = 0
_SEEN_LIMIT = 32 << 20


def _found(text: str) -> tuple[tuple[str, str], ...]:
    """(kind, rule) of every finding in one string, each distinct string checked once (the
    memo is bounded by characters, cleared when full)."""
    global _SEEN_CHARS
    got = _SEEN.get(text)
    if got is None:
        if _SEEN_CHARS + len(text) > _SEEN_LIMIT:
            _SEEN.clear()
            _SEEN_CHARS = 0
        got = _SEEN[text] = tuple(dict.fromkeys(f for view in _views(text) for f in _in_view(view)))
        _SEEN_CHARS += len(text)
    return got


def second_pass(fields: Iterable[tuple[str, Any]], allow: Iterable[str] = ()) -> list[Finding]:
    """Every finding of the second pass in the (field name, value) pairs, one per kind and field."""
    allowed = set(allow)
    out: dict[tuple[str, str], Finding] = {}
    for name, value in fields:
        for text, is_key in _strings(value):
            where = f"{name} (a key)" if is_key else name
            for kind, rule in _found(text):
                if kind not in allowed:
                    out.setdefault((kind, where), Finding(kind, rule, where))
    return list(out.values())
