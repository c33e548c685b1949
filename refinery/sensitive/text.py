"""What the sensitive-data scan reads: text made plain before any rule looks at it.

A secret can hide from a pattern in many ways that a trainer would undo: zero-width or other
invisible characters inside it, full-width or other compatibility forms, base64 or hex of the
text around it, URL encoding, JSON escapes. `plain()` removes invisible characters and applies
NFKC; `encoded_runs()` finds the runs of a text that are an encoding of other text and yields
each run's span with what it decodes to, so the scan can look inside and redact the whole run.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
from collections.abc import Iterator
from urllib.parse import unquote

# Every format character (Unicode category Cf: zero-width space and joiners, soft hyphen, bidi
# controls, word joiner, BOM, tag characters, …) and the other characters that render as nothing
# (combining grapheme joiner, Hangul fillers, Mongolian and other variation selectors). A test
# checks the Cf part against the running Python's Unicode database.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]")


# Terminal colours (agents log tool output with them) and the other control characters but tab
# and line breaks, which nothing prints: "\x1b[32mpassword:\x1b[0m …", "sk-\x00live-…".
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u2800]")


def plain(text: str) -> str:
    """`text` without invisible and control characters, in NFKC form (full-width `ｓｋ－` becomes
    `sk-`)."""
    if text.isascii() and _CONTROL.search(text) is None:  # the common case: nothing to do
        return text
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    text = _CONTROL.sub("", text)
    return text if text.isascii() else unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))


# Runs that may be an encoding of text. Base64 (standard and URL-safe alphabets; 12 characters
# hold an SSN) and hex need a length that can hold a short secret; URL encoding and JSON escapes
# are taken per run between whitespace or quotes that contains one.
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")  # one alphabet or the other: see _unbase64
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){8,}(?![0-9A-Fa-f])")
_PERCENT = re.compile(r"[^\s%\"']*(?:%[0-9A-Fa-f]{2}[^\s%\"']*)+")
_ESCAPED = re.compile(r"[^\s\"']*(?:\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2})[^\s\"']*")
_ENTITY_RUN = re.compile(r"[^\s\"'<>]*&(?:#\d{1,7}|#x[0-9A-Fa-f]{1,6}|[A-Za-z]{2,8});[^\s\"'<>]*")  # alice&#64;x.com
_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})|\\([\"\\/])")


def _readable(data: bytes) -> str | None:
    """`data` as text if it is UTF-8 and mostly printable (decoded keys, not random bytes)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    printable = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    return text if printable >= 0.9 * len(text) else None


def _unbase64(run: str) -> str | None:
    body = run.rstrip("=")
    # base64 of 12+ bytes of text has both cases; identifiers (completion_tokens) do not
    if body.islower() or body.isupper():
        return None
    if ("+" in body or "/" in body) and ("-" in body or "_" in body):
        return None  # both alphabets: neither
    # glued to the letters before it ("keyc2stbGl2…"): a long run is tried from its next 3 starts too
    for skip in range(4 if len(body) >= 24 else 1):
        text = _unbase64_at(body[skip:])
        if text is not None:
            return text
    return None


def _unbase64_at(body: str) -> str | None:
    if len(body) < 12 or len(body) % 4 == 1:
        return None
    padded = body + "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            data = base64.urlsafe_b64decode(padded)
        else:
            data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _readable(data)


def _unescape(run: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(int(m.group(1), 16))
        if m.group(2):
            return chr(int(m.group(2), 16))
        return m.group(3)

    # a surrogate pair written as two \u escapes becomes one character
    return _ESCAPE.sub(one, run).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def encoded_runs(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, decoded text) of every run of `text` that decodes to readable text."""
    if "&" in text:
        for m in _ENTITY_RUN.finditer(text):
            yield m.start(), m.end(), html.unescape(m.group(0))
    if "%" in text:
        for m in _PERCENT.finditer(text):
            decoded = unquote(m.group(0))
            if decoded != m.group(0):
                yield m.start(), m.end(), decoded
    if "\\" in text:
        for m in _ESCAPED.finditer(text):
            yield m.start(), m.end(), _unescape(m.group(0))
    for m in _BASE64.finditer(text):
        decoded = _unbase64(m.group(0))
        if decoded is not None:
            yield m.start(), m.end(), decoded
    for m in _HEX.finditer(text):
        decoded = _readable(bytes.fromhex(m.group(0)))
        if decoded is not None:
            yield m.start(), m.end(), decoded
