"""Quarantine records: every refused row, at any stage, with its reason and provenance.

A record keeps enough to find and debug the row — its place, its length, the SHA-256 of its
bytes and a short redacted preview — but never the row itself: a refused line may hold an API
key, and the full original stays in the source file, which the operator already owns.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from refinery import sensitive
from refinery.canonical import short_id
from refinery.reasons import Reason

#: How far past the preview's end the redaction reads. It runs on every refused row and costs
#: about a fifth of a microsecond a character, so not the whole row (a 64 KiB line would take
#: ~15 ms). A secret needs only what comes before it to be recognised (its prefix, a key-like
#: word); one that runs past the preview's end is dropped whole by the cut anyway.
REDACT_MARGIN = 128
ELLIPSIS = "…"
# Where a token ends: whitespace and the delimiters of JSON and CSV text. A run of anything else
# (a key, a token, a word) that the preview's end cuts through is dropped whole. Not whitespace
# alone: a compact JSON line has none, and its preview would then keep nothing.
_BREAK = re.compile(r"[\s\"',;:={}\[\]()<>]")
_TOKEN_TAIL = re.compile(r"[^\s\"',;:={}\[\]()<>]+\Z")
_MARKER = re.compile(r"\[REDACTED:[^\]\s]*\]")


def redacted_preview(raw: bytes, max_chars: int, *, cut: bool = False) -> str | None:
    """The start of `raw` as text (invalid bytes backslash-escaped), every sensitive span
    replaced by `[REDACTED:<kind>]`, at most `max_chars` characters plus `…` when cut.

    The text is redacted before it is cut, so the redaction sees each secret whole (reading up
    to REDACT_MARGIN characters past the end); a token or marker that the cut runs through is
    dropped rather than kept in part. `cut`: `raw` is already only the row's first bytes.
    """
    window = max_chars + REDACT_MARGIN
    text = raw[:4 * window].decode("utf-8", "backslashreplace")  # a character is at most 4 bytes
    cut = cut or len(raw) > 4 * window or len(text) > window
    text, found = sensitive.redact(text[:window])
    # a window with no finding has none in its start either (the cut ends on a token's edge):
    # only a redacted preview is scanned again
    check = _checked if found else (lambda preview: preview)
    if len(text) > max_chars:
        head, mid_token = text[:max_chars], not _BREAK.match(text[max_chars])
        start = text.rfind("[", 0, max_chars)
        marker = _MARKER.match(text, start) if start >= 0 else None
        if marker is not None and marker.end() > max_chars:
            head, mid_token = text[:start], False
    elif cut:
        head, mid_token = text, True  # what followed is not known: take it for the same token
    else:
        return check(text)
    if mid_token:
        head = _TOKEN_TAIL.sub("", head)
    return check(head + ELLIPSIS)


def _checked(preview: str) -> str | None:
    """The preview if nothing sensitive is left in it, else none at all (the row's length, hash
    and place still say where it is)."""
    return None if sensitive.first_finding([("preview", preview)]) else preview


def _record_id(stage: str, source_file: str, line_offset: int | None, reason: str) -> str:
    return short_id("q", stage, source_file, str(line_offset), *([reason] if stage == "export" else []))


def moved(rec: dict[str, Any], line_offset: int) -> dict[str, Any]:
    """`rec` for the same row at another line of its stage's input (the id names the line)."""
    rec["provenance"]["line_offset"] = line_offset
    rec["id"] = _record_id(rec["stage"], rec["provenance"]["source_file"], line_offset, rec["reason"])
    return rec


def quarantine_record(stage: str, source: str, source_file: str, line_offset: int | None, reason: Reason,
                      detail: str, sig: str | None, *, raw: bytes | None = None, preview_chars: int = 240,
                      recorded_at: str | None = None, record: str | None = None,
                      exports: list[str] | None = None) -> dict[str, Any]:
    """A QuarantineRecord dict (field order as in refinery.models.QuarantineRecord).

    `exports`: the exports that refused the row (for an export's refusal). The shared record of
    several (stage "export") may be one of two for its row — a category one export does not take,
    and a text the others refuse —, so its id also covers the reason.

    `source_file`/`line_offset` locate the refused row in the stage's *input* (a source line for
    materialize, an evidence line for score, a scored-run line for the exports). `raw` is the
    row's bytes as the reader held them (for a line that does not parse, the bytes `sig` hashes);
    None where the record keeps no text of the row.
    """
    if raw is not None:  # a refused row's text is seen once: scanned without filling the scan's cache
        with sensitive.uncached():
            detail = sensitive.redact_text(detail)
            preview = None if preview_chars == 0 else redacted_preview(
                raw, preview_chars, cut=reason is Reason.LINE_TOO_LONG)  # such a line comes as its first bytes
    prov: dict[str, Any] = {"source_file": source_file, "line_offset": line_offset}
    if record is not None:
        prov["record"] = record
    prov["sig_hash"] = sig
    prov["recorded_at"] = recorded_at
    return {
        "schema_version": 3,
        "id": _record_id(stage, source_file, line_offset, reason.value),
        "stage": stage,
        "exports": exports,
        "source": source,
        "reason": reason.value,
        # a detail about a row may quote its value ("expected a number, got 'sk-…'"): redacted like
        # the preview. Records without row text (exports, whole files) have details refinery wrote.
        "detail": detail,
        "raw_length": None if raw is None else len(raw),
        "raw_sha256": None if raw is None else hashlib.sha256(raw).hexdigest(),
        "preview": None if raw is None else preview,
        "provenance": prov,
    }
