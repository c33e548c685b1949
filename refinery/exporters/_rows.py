"""Exports of one row per taken answer (RAG, SFT): candidates merged in file order, a repeated
(task, answer) dropped as a duplicate when export.dedup is on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar

import orjson

from refinery.exporters._base import Candidate, Composition, Exporter, ExportStats, Refuse, Settings, Write
from refinery.jsonl import dumps_line
from refinery.normalize import render_tool_calls
from refinery.reasons import Reason


class RowExporter(Exporter):
    dedup = True
    prompt_field: ClassVar[str]
    """the row field holding the prompt (composition stats)"""

    def row(self, c: Candidate) -> dict[str, Any]:
        raise NotImplementedError

    def candidate(self, c: Candidate, s: Settings) -> bytes:
        return dumps_line(self.row(c))

    def merge(self, lines: Iterable[bytes], write: Write, refuse: Refuse,
              st: ExportStats, s: Settings, *, duplicates: AbstractSet[int],
              near: Mapping[int, str]) -> Iterator[dict[str, Any]]:
        for i, line in enumerate(lines):
            row = orjson.loads(line)
            if i in duplicates:
                refuse(row["source"], row["provenance"], Reason.DUPLICATE_ANSWER,
                       "the same answer to the same task is already in the export")
                continue
            if i in near:
                refuse(row["source"], row["provenance"], Reason.NEAR_DUPLICATE, near[i])
                continue
            write(row, line)  # the row's line as the reading wrote it: not serialized again
            st.rows_out += 1
            yield row

    def composition(self) -> Composition:
        return RowComposition(self)


class RowComposition(Composition):
    def __init__(self, exporter: RowExporter):
        self.exporter = exporter
        self.rows = 0
        self.by_source: Counter[str] = Counter()
        self.by_category: Counter[str] = Counter()
        self.tool_using = 0
        self.prompt_chars = 0
        self.answer_chars = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.by_source[row["source"]] += 1
        if field := self.exporter.category_field:
            self.by_category[row[field]] += 1
        self.tool_using += bool(row["tool_calls"])
        self.prompt_chars += len(row[self.exporter.prompt_field])
        self.answer_chars += len(row["response"]) + (len(render_tool_calls(row["tool_calls"]))
                                                     if row["tool_calls"] else 0)

    def merge(self, other: Composition) -> None:
        assert isinstance(other, RowComposition)
        self.rows += other.rows
        self.by_source.update(other.by_source)
        self.by_category.update(other.by_category)
        self.tool_using += other.tool_using
        self.prompt_chars += other.prompt_chars
        self.answer_chars += other.answer_chars

    def to_json(self, st: ExportStats, path: str) -> dict[str, Any]:
        mean = (lambda total: round(total / self.rows, 1) if self.rows else 0.0)
        return {"export": self.exporter.name, "path": path, "rows": self.rows,
                "by_source": dict(sorted(self.by_source.items())),
                "by_category": dict(sorted(self.by_category.items())),
                "tool_using": self.tool_using, "direct_answers": self.rows - self.tool_using,
                "mean_prompt_chars": mean(self.prompt_chars), "mean_answer_chars": mean(self.answer_chars)}

    def receipt_counts(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {"counts": {"tool_using": doc["tool_using"], "direct_answers": doc["direct_answers"]},
                "by_category": doc["by_category"], "by_source": doc["by_source"]}
