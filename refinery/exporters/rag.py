"""RAG: accepted (and, by default, partially accepted) answers as retrieval playbooks."""

from __future__ import annotations

from typing import Any

from refinery.exporters._base import Candidate, Settings, plain_call
from refinery.exporters._rows import RowExporter


class Rag(RowExporter):
    name = "rag"
    path = "exports/rag/playbooks.jsonl"
    schema = "rag_sample"
    order = 10
    id_prefix = "rag"
    summary = "Export accepted and partially accepted answers as retrieval playbooks: exports/rag/playbooks.jsonl."
    category_field = "category"
    prompt_field = "prompt"

    def admits(self, category: str, s: Settings) -> bool:
        return category in s.export.rag_categories

    def row(self, c: Candidate) -> dict[str, Any]:
        ev, sr = c.ev, c.sr
        return {
            "schema_version": 1, "id": "rag-" + sr["id"][3:], "task_key": sr["task_key"],
            "task_name": ev["task_name"], "prompt": ev["prompt"], "response": ev["response"] or "",
            "tool_calls": [plain_call(x) for x in ev["tool_calls"]], "category": sr["category"],
            "score": sr["score"], "source": ev["source"], "provenance": c.prov,
        }


EXPORTER = Rag()
