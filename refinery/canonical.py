"""Canonical JSON and the hashes built on it.

Canonical JSON here is: keys sorted (recursively), no insignificant whitespace, UTF-8 with
non-ASCII characters written as themselves. `sig_hash` is the SHA-256 of those bytes, so a
row's hash does not depend on the key order its producer happened to use.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_CANON = orjson.OPT_SORT_KEYS


def canonical_bytes(obj: Any) -> bytes:
    """The canonical JSON encoding of `obj`."""
    return orjson.dumps(obj, option=_CANON)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sig_hash(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of a parsed source row."""
    return hashlib.sha256(orjson.dumps(obj, option=_CANON)).hexdigest()


def raw_hash(line: bytes) -> str:
    """The signature of a line that could not be parsed: SHA-256 of its raw bytes."""
    return hashlib.sha256(line).hexdigest()


def short_id(prefix: str, *parts: str, length: int = 16) -> str:
    """A stable id: `prefix-` plus the first `length` hex digits of the parts' SHA-256."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}-{h[:length]}"


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
