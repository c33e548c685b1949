"""Quarantine records: every refused row, at any stage, with its reason and provenance."""

from __future__ import annotations

from typing import Any

from refinery.canonical import short_id
from refinery.reasons import Reason


def quarantine_record(stage: str, source: str, source_file: str, line_offset: int | None, reason: Reason,
                      detail: str, sig: str | None, *, raw: bytes | str | None = None, raw_max: int = 65536,
                      recorded_at: str | None = None, record: str | None = None) -> dict[str, Any]:
    """A QuarantineRecord dict (field order as in refinery.models.QuarantineRecord).

    `source_file`/`line_offset` locate the refused row in the stage's *input* (a source line for
    materialize, an evidence line for score, a scored-run line for the exports).
    """
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    truncated = text is not None and len(text) > raw_max
    prov: dict[str, Any] = {"source_file": source_file, "line_offset": line_offset}
    if record is not None:
        prov["record"] = record
    prov["sig_hash"] = sig
    prov["recorded_at"] = recorded_at
    return {
        "schema_version": 1,
        "id": short_id("q", stage, source_file, str(line_offset)),
        "stage": stage,
        "source": source,
        "reason": reason.value,
        "detail": detail,
        "raw": text[:raw_max] if truncated else text,
        "raw_truncated": truncated,
        "provenance": prov,
    }
