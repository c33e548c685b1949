"""BM25 retrieval over the RAG export (`exports/rag/playbooks.jsonl`), with bm25s.

    <index_dir>/manifest.json   the export it indexes (path, sha256, rows), tokenizer, BM25 settings
    <index_dir>/offsets.npy     byte offset of each playbook's line in the export
    <index_dir>/ids.json        each playbook's id (a row read back must carry it)
    <index_dir>/*.index.*       bm25s's own files

The index is built once per RAG export and reused while the export's sha256 is unchanged (a new
export, a different tokenizer or a damaged index folder rebuilds it). It is published like every
other output: built in a staging folder and renamed into place, so a killed build leaves none;
concurrent replays take turns (a lock file beside the index) to check, build and load it.

Ranking is deterministic: BM25 score, highest first, and on equal scores the playbook that comes
first in the export (the export's order is itself deterministic). Playbooks that share no term
with the task score 0 and are never returned, so a task may get fewer than k.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from refinery.canonical import file_sha256
from refinery.errors import RefineryError
from refinery.jsonl import publishing, recover_dir
from refinery.receipts import write_json
from refinery.workspace import EXPORT_FILES, Workspace

RAG_EXPORT = EXPORT_FILES["rag"]
MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
#: Changes whenever tokenization or the indexed text changes: an index built otherwise is rebuilt.
TOKENIZER = "nfkc-casefold-words-stopwords-en/v2"
K1, B = 1.5, 0.75
IDS = "ids.json"
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


class RetrievalError(RefineryError):
    """No RAG export to retrieve from; the message says what to run."""


def tokens(text: str) -> list[str]:
    """Case-folded words of letters and digits (NFKC, any script), English stop words left out:
    'INV-4471' → inv, 4471; 'Сколько заказов' → сколько, заказов. (Scripts written without spaces,
    such as Chinese, come out as one token per run of characters.)"""
    stop = _stopwords()
    return [w for w in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()) if w not in stop]


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def indexed_text(row: dict[str, Any]) -> str:
    """What a playbook is found by: its task name, the task, the answer and the tools it called."""
    calls = " ".join(c.get("name") or "" for c in row.get("tool_calls") or [])
    return " ".join(filter(None, [(row.get("task_name") or "").replace("_", " "), row["prompt"],
                                  row.get("response") or "", calls]))


@dataclass(frozen=True)
class Hit:
    id: str
    line: int
    """0-based line of the playbook in the export"""
    score: float
    row: dict[str, Any]


class RagIndex:
    """A loaded BM25 index over one version of the RAG export."""

    def __init__(self, export: Path, folder: Path, manifest: dict[str, Any], bm25: Any, offsets: Any,
                 ids: list[str], built: bool):
        self.export, self.folder, self.manifest = export, folder, manifest
        self._bm25, self._offsets, self._ids = bm25, offsets, ids
        self.built = built
        """True when this call built the index, False when it reused the one on disk"""

    @property
    def export_sha256(self) -> str:
        return self.manifest["export"]["sha256"]

    @property
    def rows(self) -> int:
        return self.manifest["export"]["rows"]

    @classmethod
    def open(cls, ws: Workspace, index_dir: str) -> RagIndex:
        """The index of the current RAG export: the one on disk when it was built from an export
        with the same sha256, else a new one (built and published now)."""
        try:
            import bm25s  # noqa: F401
        except ImportError as e:
            raise RetrievalError(f"retrieval needs bm25s ({e}): install the 'replay' extra — `make install` does — "
                                 "or `uv sync --all-extras`") from None
        export = ws.root / RAG_EXPORT
        if not export.is_file():
            raise RetrievalError(f"no RAG export at {RAG_EXPORT}: run `refinery run-all` first "
                                 "(or replay with --no-retrieval)")
        folder = ws.root / index_dir
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder.with_name(f".{folder.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # one process at a time checks, builds and loads the index
            recover_dir(folder)
            sha = file_sha256(export)
            loaded = cls._load(export, folder, sha)
            return loaded if loaded is not None else cls._build(export, folder, sha, index_dir)
        finally:
            os.close(fd)  # releases the lock

    @classmethod
    def _load(cls, export: Path, folder: Path, sha: str) -> RagIndex | None:
        import bm25s
        import numpy as np

        try:
            manifest = orjson.loads((folder / MANIFEST).read_bytes())
            if (manifest.get("export", {}).get("sha256") != sha or manifest.get("tokenizer") != TOKENIZER
                    or manifest.get("bm25") != {"k1": K1, "b": B}):
                return None
            offsets = np.load(folder / OFFSETS)
            ids = orjson.loads((folder / IDS).read_bytes())
            bm25 = bm25s.BM25.load(str(folder), mmap=False) if manifest["export"]["rows"] else None
        except (OSError, ValueError, KeyError, orjson.JSONDecodeError):
            return None  # missing or damaged: rebuild
        if not len(offsets) == len(ids) == manifest["export"]["rows"]:
            return None
        return cls(export, folder, manifest, bm25, offsets, ids, built=False)

    @classmethod
    def _build(cls, export: Path, folder: Path, sha: str, index_dir: str) -> RagIndex:
        import bm25s
        import numpy as np

        corpus, offsets, ids = [], [], []
        for line in _export_lines(export):
            offsets.append(line.offset_bytes)
            ids.append(line.obj["id"])
            corpus.append(tokens(indexed_text(line.obj)))
        if folder.exists() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            # the rebuild replaces the folder whole: never one that holds anything but an index
            raise RetrievalError(f"{index_dir}/ holds files that are not a RAG index (no {MANIFEST}), and building "
                                 "the index would replace the folder: set [replay] index_dir to a folder of its own")
        bm25 = None
        with publishing(folder) as staging:
            if corpus:
                bm25 = bm25s.BM25(k1=K1, b=B)
                bm25.index(corpus, show_progress=False)
                bm25.save(str(staging))
            offsets_arr = np.asarray(offsets, dtype=np.int64)
            np.save(staging / OFFSETS, offsets_arr)
            (staging / IDS).write_bytes(orjson.dumps(ids))
            manifest = {"schema_version": 1, "export": {"path": RAG_EXPORT, "sha256": sha, "rows": len(offsets)},
                        "tokenizer": TOKENIZER, "bm25": {"k1": K1, "b": B}, "index_dir": index_dir}
            write_json(staging / MANIFEST, manifest)
        return cls(export, folder, manifest, bm25, offsets_arr, ids, built=True)

    def search(self, query: str, k: int, *, exclude: Collection[int] = ()) -> list[Hit]:
        """The top `k` playbooks for `query` (never one of the `exclude` lines), best first."""
        import numpy as np

        if self._bm25 is None:
            return []
        ids = self._bm25.get_tokens_ids(tokens(query))
        if not ids:
            return []
        scores = np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float64)
        if exclude:
            scores[np.fromiter(exclude, dtype=np.int64)] = 0.0
        # lexsort: the last key is the primary one — score descending, then line ascending
        order = np.lexsort((np.arange(len(scores)), -scores))
        lines = [int(i) for i in order[:k] if scores[i] > 0]
        return [Hit(row["id"], i, round(float(scores[i]), 4), row) for i, row in zip(lines, self.rows_at(lines))]

    def rows_at(self, lines: list[int]) -> list[dict[str, Any]]:
        """The export's rows at these 0-based lines (read by byte offset, each checked by its id)."""
        out = []
        with open(self.export, "rb") as f:
            for i in lines:
                f.seek(int(self._offsets[i]))
                try:
                    row = orjson.loads(f.readline())
                except orjson.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or row.get("id") != self._ids[i]:
                    raise RetrievalError(f"{RAG_EXPORT} changed while this replay read it (a run-all published a "
                                         "new one): replay again")
                out.append(row)
        return out


@dataclass(frozen=True)
class _Line:
    offset_bytes: int
    obj: dict[str, Any]


def _export_lines(export: Path) -> Iterator[_Line]:
    """Every playbook with the byte offset of its line; a line that does not parse is an error
    (the export is refinery's own output: it was damaged)."""
    pos = 0
    with open(export, "rb") as f:
        for n, raw in enumerate(f):
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise RetrievalError(f"{RAG_EXPORT}:{n}: not valid JSON — the export was damaged; "
                                     "run `refinery run-all --force`") from None
            yield _Line(pos, obj)
            pos += len(raw)

