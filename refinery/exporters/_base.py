"""What an export is: the contract every module in refinery/exporters/ fulfils.

The export stage (refinery.export) reads each scored run with its evidence once, decides for
every export whether it takes the row (`admits`, then the shared text and sensitive-data
checks), and hands each export that does a `Candidate`; the export writes it as one line of
a part file (`candidate`). Once every file is read, each export merges its part files into
its output (`merge`), in units that run side by side and are joined in order: a run of
consecutive files' candidates (`grouped = False`; with `dedup`, the stage first finds, from the
64-bit keys the reading returned, the candidates that repeat an earlier (task, answer)), or one
hash bucket of task keys (`grouped = True`, so grouping never holds more than a bucket in
memory). What a merge
refuses it reports through `refuse`, with a reason; the stage writes the quarantine records
and keeps the accounting. Before anything is published the stage calls `verify` on the written
file. Composition stats and the receipt's counts come from the export's `Composition`.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, ClassVar

from refinery.config import ExportConfig
from refinery.errors import CheckFailed
from refinery.normalize import last_user_index
from refinery.reasons import Reason


class LeakError(CheckFailed):
    """The re-read of the written SFT file found a row that must not be there. Nothing was published."""

    headline = "SFT CHECK FAILED, nothing was published"


@dataclass(frozen=True)
class Settings:
    """What the exports read of the config for one run."""

    export: ExportConfig
    include_partial: bool


@dataclass
class ExportStats:
    export: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    sha256: str = ""
    candidates: int = 0
    """lines one file's reading wrote to the export's part (an ungrouped export)"""
    keys: array[int] = field(default_factory=lambda: array("Q"))
    """their dedup keys (64 bits of sha256(task, answer)), in line order (an export with dedup)"""

    def add(self, other: ExportStats) -> None:
        """Add what one file's reading found."""
        self.rows_in += other.rows_in
        self.quarantined += other.quarantined
        self.by_reason.update(other.by_reason)
        self.redacted.update(other.redacted)

    def absorb(self, other: ExportStats) -> None:
        """Add what one unit of the merge took and refused."""
        self.rows_out += other.rows_out
        self.quarantined += other.quarantined
        self.by_reason.update(other.by_reason)


@dataclass
class Candidate:
    """A row an export takes, as the stage's reading pass holds it."""

    ev: dict[str, Any]
    """the evidence record (redacted, where export.sensitive = "redact")"""
    sr: dict[str, Any]
    """its scored run"""
    prov: dict[str, Any]
    """provenance of the scored-run line: what every export row points at"""
    answer: str
    """the answer as one text (tool calls rendered), and normalised: what dedup and pairing compare"""
    norm: str
    key: str
    """16 hex digits of sha256(task key, normalised answer): one per distinct answer to a task"""


#: refuse(source, provenance, reason, detail): count a row the merge leaves out and quarantine it.
Refuse = Callable[[str, dict[str, Any], Reason, str], None]
#: write(row, line=None): write a row of the export (`line`: its JSONL line, when already made).
Write = Callable[..., None]


class Composition:
    """What an export holds, for its <export>.stats.json and its receipt's counts."""

    def add(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def merge(self, other: Composition) -> None:
        """Add another unit's composition (units never share a task)."""
        raise NotImplementedError

    def to_json(self, st: ExportStats, path: str) -> dict[str, Any]:
        raise NotImplementedError

    def receipt_counts(self, doc: dict[str, Any]) -> dict[str, Any]:
        """(extra counts, by_category, by_source) for the receipt, from `to_json`'s document."""
        raise NotImplementedError


class Exporter:
    """One export. A module in refinery/exporters/ defines a subclass and `EXPORTER = It()`."""

    name: ClassVar[str]
    """rag, sft, ...: the stage is export-<name>, its own quarantine exports/quarantine/export-<name>.jsonl"""
    path: ClassVar[str]
    """the output, relative to the workspace root (stats: the same name, .stats.json)"""
    schema: ClassVar[str]
    """the record model's key in refinery.models.SCHEMA_MODELS: every row validates against it"""
    order: ClassVar[int]
    """its place among the exports (receipts, tables, a shared quarantine record's `exports`)"""
    id_prefix: ClassVar[str]
    """what its rows' ids start with (rag-, sft-, pp-): `refinery trace` finds a row by it"""
    summary: ClassVar[str]
    """what it writes, for `refinery export-<name> --help`"""
    unit: ClassVar[str] = "rows"
    """what one written line is, in tables ("pairs")"""
    category_field: ClassVar[str | None] = None
    """the row field holding the scored category, when rows carry one: audited against the receipt"""
    dedup: ClassVar[bool] = False
    """holds each (task, answer) once when export.dedup is on (the stage finds the repeats across
    files; `merge` refuses them): audited"""
    partial_option: ClassVar[bool] = False
    """its command takes --include-partial/--accepted-only"""
    grouped: ClassVar[bool] = False
    pairs: ClassVar[bool] = False
    """its rows pair two answers (provenance and rejected_provenance): the audit's pair checks
    read them; any other export's rows each point at one scored run (`provenance`), checked"""

    def admits(self, category: str, s: Settings) -> bool:
        raise NotImplementedError

    def candidate(self, c: Candidate, s: Settings) -> bytes:
        """One line (with its newline) of a part file, for a row this export takes: a JSON object
        with `c.prov` as one of its values (run-all's single pass renumbers it when the
        evidence partition is put together from several parts)."""
        raise NotImplementedError

    def bucket(self, c: Candidate, buckets: int) -> int:
        """Which of `buckets` part files a grouped export's candidate goes to: a range of task keys
        (their first 32 bits), so that buckets merged in order and each sorted by key are all
        sorted by key — the export's bytes do not depend on how many buckets there are."""
        return int(c.sr["task_key"][3:11], 16) * buckets >> 32

    def merge(self, lines: Iterable[bytes], write: Write, refuse: Refuse,
              st: ExportStats, s: Settings, *, duplicates: AbstractSet[int],
              near: Mapping[int, str]) -> Iterator[dict[str, Any]]:
        """Write one unit of the export from its candidate lines — a run of consecutive files'
        (ungrouped; the lines numbered in `duplicates`, counted across the run, repeat an earlier
        candidate's key, and those in `near` are near-duplicates of a row kept (the value: the
        refusal's detail): refuse them), or one hash bucket of tasks' (grouped) —; yield each row
        written, add to st.rows_out the candidates taken. `write(row, line)`: `line`, when given,
        is the row's JSONL line as the candidate already holds it (`dumps_line(row)`). Units run
        in parallel and are joined in order."""
        raise NotImplementedError

    def composition(self) -> Composition:
        raise NotImplementedError

    def verify(self, path: Any, ws: Any, s: Settings) -> None:
        """Check the written (not yet published) file; raise CheckFailed to publish nothing."""


# --- what export rows are made of ---------------------------------------------------------


def plain_call(c: dict[str, Any]) -> dict[str, Any]:
    return {"id": c["id"], "name": c["name"], "arguments": c["arguments"], "problem": c["problem"]}


def plain_message(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    if m.get("tool_calls"):
        out["tool_calls"] = [plain_call(c) for c in m["tool_calls"]]
    return out


def reply(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer as the conversation after the prompt — tool calls, their results, the text —,
    or one assistant message when the source had no conversation."""
    msgs = ev["messages"] or []
    last_user = last_user_index(msgs)
    if last_user is not None and any(m["role"] == "assistant" for m in msgs[last_user + 1:]):
        return [plain_message(m) for m in msgs[last_user + 1:]]
    return [{"role": "assistant", "content": ev["response"] or "", "name": None,
             "tool_calls": [plain_call(c) for c in ev["tool_calls"]] or None, "tool_call_id": None}]
