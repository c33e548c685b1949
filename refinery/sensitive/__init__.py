"""Secrets and personal data: found before any row reaches an export.

Ten kinds, in two families. Secrets (`api_key`, `bearer_token`, `private_key`, `password`)
quarantine a row as `secret_detected`; personal data (`email`, `phone`, `credit_card`, `iban`,
`ssn`, `private_note`) as `pii_detected`. With `export.sensitive = "redact"` each finding is
replaced by `[REDACTED:<kind>]` — the whole token it sits in, so no tail of a key survives —
and the row is scanned again before it is written; kinds listed in `export.allow_sensitive` are
left alone. A finding names the kind, the rule and the field, never the value.

Every string of a record is read — keys as well as values, JSON text inside a string (tool-call
arguments) as well as the objects themselves — and each is first made plain (invisible
characters removed, NFKC) and looked into where it holds an encoding of other text (base64,
hex, URL encoding, JSON escapes): see `refinery.sensitive.text`. The rules and where they come
from are in `refinery.sensitive.rules`; `refinery.sensitive.check` is the independent second
pass the audit runs over the written exports.

The rules lean towards catching too much: a false positive costs one quarantined row, a false
negative leaks a credential into a training set.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from functools import cache, lru_cache
from typing import Any, NamedTuple

import orjson

from refinery.sensitive.rules import KINDS, NUMBER_RUN, PII_KINDS, SECRET_KINDS, all_rules, ruleset
from refinery.sensitive.text import encoded_runs, plain

__all__ = ["KINDS", "PII_KINDS", "SECRET_KINDS", "Finding", "find", "first_finding", "reason_family", "redact",
           "redact_text", "ruleset", "scan"]


class Finding(NamedTuple):
    kind: str
    rule: str
    where: str  # the field, never the value


class _Hit(NamedTuple):
    kind: str
    rule: str
    start: int  # in plain(text)
    end: int


def prepare() -> None:
    """Compile the rules and load the validators now, in the process that starts the workers:
    forked workers inherit them instead of each spending ~0.1 s on it."""
    _gates()
    from stdnum import iban, luhn  # noqa: F401
    from stdnum.us import ssn  # noqa: F401


def reason_family(kind: str) -> str:
    return "secret" if kind in SECRET_KINDS else "pii"


#: How deep the scan looks into encodings of encodings (base64 of hex of base64 of a key).
_DEPTH = 3


# What redaction wrote is not a finding: the kind in "[REDACTED:password]" must not read as a
# password rule's keyword. Masked to the same length, so positions stay put.
_MARKER = re.compile(r"(?<=\[REDACTED:)[a-z_]+(?=\])")


@cache
def _gates() -> tuple[tuple[int, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    """The rules that always run, and keyword → the rules it lets run (by index in all_rules()):
    each distinct keyword is looked for once per text, not once per rule."""
    ungated, index = [], defaultdict(list)
    for i, rule in enumerate(all_rules()):
        if not rule.keywords:
            ungated.append(i)
        for k in dict.fromkeys(rule.keywords):
            index[k].append(i)
    return tuple(ungated), tuple((k, tuple(ids)) for k, ids in index.items())


def _scan_text(text: str, depth: int = 0) -> list[_Hit]:
    """Every rule's matches in `text` (already plain), and inside its encoded runs."""
    hits: list[_Hit] = []
    if "[REDACTED:" in text:
        text = _MARKER.sub(lambda m: "_" * len(m.group(0)), text)
    lower = text.lower()
    ungated, by_keyword = _gates()
    active = set(ungated)
    for k, ids in by_keyword:
        if k in lower:
            active.update(ids)
    rules = all_rules()
    runs: list[tuple[int, int]] | None = None
    for i in sorted(active):
        rule = rules[i]
        if rule.gate is not None and rule.gate.search(text) is None:
            continue
        if rule.numeric:
            if runs is None:  # one character past the run, so the rule's look-ahead sees it
                runs = [(m.start(), min(m.end() + 1, len(text))) for m in NUMBER_RUN.finditer(text)]
            matches: Iterable[re.Match[str]] = (m for a, b in runs for m in rule.regex.finditer(text, a, b))
        else:
            matches = rule.regex.finditer(text)
        for m in matches:
            # the secret is the rule's first group where it has one ("password: <it>")
            start, end = m.span(1) if rule.regex.groups and m.group(1) is not None else m.span()
            if rule.valid is not None and not rule.valid(text[start:end]):
                continue
            if rule.near is not None and rule.near.search(text, max(0, start - 64), start) is None:
                continue
            hits.append(_Hit(rule.kind, rule.id, start, end))
    if depth < _DEPTH and len(text) >= 12:  # an encoded run is 12 characters or more
        for start, end, decoded in encoded_runs(text):
            inner = _scan_text(plain(decoded), depth + 1)
            if inner:
                hits.append(_Hit(inner[0].kind, inner[0].rule + " (encoded)", start, end))
    return hits


def _json_text(text: str) -> Any:
    """The JSON value `text` holds when it is a JSON object or array, else None."""
    t = text.strip()
    if len(t) < 2 or t[0] not in "{[" or t[-1] not in "}]":
        return None
    try:
        return orjson.loads(t)
    except orjson.JSONDecodeError:
        return None


#: No rule matches fewer characters ("x@y.io", "pw=abc"): roles, names and short values are skipped.
_SHORTEST = 6

# Strings repeat across a trace set (system prompts, tool names, task names): each distinct
# string is scanned once per process. Bounded by total characters, cleared when full.
_CACHE: dict[str, tuple[_Hit, ...]] = {}
_CACHE_CHARS = 0
_CACHE_LIMIT = 32 << 20
_STORE = True


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Scan without keeping what is scanned, for text seen once (a refused row's preview): it
    would fill the cache and clear out the strings that do repeat."""
    global _STORE
    before, _STORE = _STORE, False
    try:
        yield
    finally:
        _STORE = before


def _hits(text: str) -> tuple[_Hit, ...]:
    """Findings in one string (positions in plain(text)); JSON text is also read as JSON."""
    if len(text) < _SHORTEST:
        return ()
    got = _CACHE.get(text)
    if got is not None:
        return got
    p = plain(text)
    hits = _scan_text(p)
    value = _json_text(p)
    if value is not None:
        inner = [h for s, _, skip in _walk(value) for h in _hits(s) if h.start >= skip]
        if inner:
            hits.append(_Hit(inner[0].kind, inner[0].rule + " (in JSON text)", 0, len(p)))
    got = tuple(hits)
    if not _STORE:
        return got
    global _CACHE_CHARS
    if _CACHE_CHARS + len(text) > _CACHE_LIMIT:
        _CACHE.clear()
        _CACHE_CHARS = 0
    _CACHE[text] = got
    _CACHE_CHARS += len(text)
    return got


def _walk(value: Any, context: str | None = None) -> Iterator[tuple[str, bool, int]]:
    """(string, is a key, where its own findings start) for every string anywhere in `value`.

    A string under a key that names a secret — at any depth below it, or as the `value` of a
    `{"name": "DB_PASSWORD", "value": …}` pair (Kubernetes, ECS, GitHub Actions) — is also given
    as `key=string`, so rules that need the name beside the value see both; only findings in the
    value part count there. Integers long enough to be a card, an SSN or a phone number are read
    as their digits.
    """
    if isinstance(value, str):
        yield value, False, 0
        if context is not None:
            yield f"{context}={value}", False, len(plain(context)) + 1
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= _LONG_NUMBER:
            yield from _walk(str(value), context)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, context)
    elif isinstance(value, dict):
        label = _pair_label(value)
        for k, v in value.items():
            if not isinstance(k, str):
                yield from _walk(v, context)
                continue
            yield k, True, 0
            yield from _walk(v, _context(k, label, context))


#: 7 digits and more: the shortest phone number the rules take has 8, an SSN 9, a card 13.
_LONG_NUMBER = 10**6
_SECRET_NAMES = ("key", "secret", "token", "pass", "pwd", "pw", "pin", "auth", "cred", "private", "ssn", "card",
                 "iban")


@lru_cache(maxsize=8192)  # keys repeat in every row: role, content, name, arguments, …
def _names_a_secret(key: str) -> bool:
    lower = plain(key).lower()
    return any(w in lower for w in _SECRET_NAMES)


def _pair_label(d: dict) -> str | None:
    """The name of a `{"name": …, "value": …}` pair when it names a secret, else None."""
    if "value" not in d:
        return None
    label = d.get("name", d.get("key", d.get("Name", d.get("Key"))))
    return label if isinstance(label, str) and _names_a_secret(label) else None


def _context(key: str, label: str | None, outer: str | None) -> str | None:
    """The secret's name that the value under `key` is read with, if any."""
    if label is not None and key == "value":
        return label
    return key if _names_a_secret(key) else outer


def _findings(fields: Iterable[tuple[str, Any]], allowed: set[str]) -> Iterator[Finding]:
    for name, value in fields:
        for text, is_key, skip in _walk(value):
            for h in _hits(text):
                if h.kind not in allowed and h.start >= skip:
                    yield Finding(h.kind, h.rule, f"{name} (a key)" if is_key else name)


def scan(fields: Iterable[tuple[str, Any]], allow: Iterable[str] = ()) -> list[Finding]:
    """Every finding in the (field name, value) pairs, kinds in `allow` excepted, in field order.

    Values may be strings or nested JSON (lists and dicts, keys included); every string inside
    is searched, and a string holding a JSON object or array is also read as JSON.
    """
    return list(_findings(fields, set(allow)))


def first_finding(fields: Iterable[tuple[str, Any]], allow: Iterable[str] = ()) -> tuple[str, str] | None:
    """(kind, field) of the first finding in the (field name, value) pairs, or None."""
    f = next(_findings(fields, set(allow)), None)
    return None if f is None else (f.kind, f.where)


def find(text: str, allow: Iterable[str] = ()) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of every finding in one string; positions are in its plain form."""
    allowed = set(allow)
    for h in _hits(text):
        if h.kind not in allowed:
            yield h.kind, h.start, h.end


# A redacted span grows to the whole token it sits in: a rule that matched part of a key (its
# documented prefix and length) must not leave the rest of the key behind.
_TOKEN_EDGE = re.compile(r"[\s\"'<>()\[\]{},;]")


def _grow(text: str, start: int, end: int) -> tuple[int, int]:
    while start > 0 and not _TOKEN_EDGE.match(text[start - 1]):
        start -= 1
    while end < len(text) and not _TOKEN_EDGE.match(text[end]):
        end += 1
    return start, end


def redact_text(text: str, allow: Iterable[str] = ()) -> str:
    """`text` with every finding replaced by `[REDACTED:<kind>]` (JSON text kept JSON)."""
    return redact(text, allow)[0]


def redact(value: Any, allow: Iterable[str] = ()) -> tuple[Any, list[str]]:
    """`value` with every finding replaced by `[REDACTED:<kind>]`; (new value, kinds found).

    A string holding a JSON object or array is redacted as JSON and written back as JSON text
    (or, when a finding spans its fields, as text). A value under a key that names a secret is
    replaced whole when anything is found in it. A string is returned in its plain form
    (invisible characters removed) only when it had a finding. Two keys of one object that
    redact to the same text are told apart by a suffix.
    """
    allowed = set(allow)
    found: list[str] = []

    def one(text: str, context: str | None = None) -> str:
        hits = [h for h in _hits(text) if h.kind not in allowed]
        if context is not None:
            off = len(plain(context)) + 1
            named = [h for h in _hits(f"{context}={text}") if h.kind not in allowed and h.start >= off]
            if hits or named:  # a password may have spaces, a key an odd alphabet: all of it goes
                found.append((hits or named)[0].kind)
                return f"[REDACTED:{(hits or named)[0].kind}]"
        if not hits:
            return text
        p = plain(text)
        inside = _json_text(p)
        if inside is not None:
            out = orjson.dumps(walk(inside)).decode()
            if not any(h.kind not in allowed for h in _hits(out)):
                return out
            # a finding only the text sees (it spans two fields): redact the text instead
        spans: list[list[Any]] = []
        for h in sorted(hits, key=lambda h: (h.start, -h.end)):
            start, end = _grow(p, h.start, h.end)
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end, h.kind])
        out_parts, at = [], 0
        for start, end, kind in spans:
            out_parts += [p[at:start], f"[REDACTED:{kind}]"]
            found.append(kind)
            at = end
        out_parts.append(p[at:])
        return "".join(out_parts)

    def walk(v: Any, context: str | None = None) -> Any:
        if isinstance(v, str):
            return one(v, context)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= _LONG_NUMBER:
            digits = str(v)
            out = one(digits, context)
            return v if out == digits else out
        if isinstance(v, list):
            return [walk(x, context) for x in v]
        if isinstance(v, dict):
            label = _pair_label(v)
            new: dict[Any, Any] = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    new[k] = walk(x, context)
                    continue
                base = key = one(k)
                n = 1
                while key in new:
                    n += 1
                    key = f"{base}#{n}"
                new[key] = walk(x, _context(k, label, context))
            return new
        return v

    return walk(value), found
