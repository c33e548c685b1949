"""`refinery train collect`: the SFT export as mlx-lm training data, split by id hash.

    exports/sft/instruction_response.jsonl ──▶ <output_dir>/data/train.jsonl, valid.jsonl, test.jsonl
                                           ──▶ <output_dir>/data/collect.json  (the receipt)

A row's split depends only on its id (sha256 → a number in [0, 1): below test_fraction it is
held out for testing, below test_fraction + valid_fraction it validates, else it trains), so
the split is deterministic, does not depend on row order, and a row never changes split when
others are added. Rows with tool calls are written in mlx-lm's tools shape (chat + "tools",
calls as {"id", "type": "function", "function": {"name", "arguments"}}), the rest as chat with
an empty "tools" list. The safety rehearsal rows (refinery/training/rehearsal.py) follow in the
training split unless `safety_rehearsal` is false.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from refinery.canonical import file_sha256
from refinery.errors import RefineryError
from refinery.formats import to_mlx_chat, to_mlx_tools
from refinery.jsonl import JsonlWriter, publishing, read_jsonl
from refinery.receipts import Digests, write_json
from refinery.training.config import DistillConfig, base_model_dir
from refinery.training.from_gguf import GGUFError
from refinery.training.rehearsal import rehearsal_rows
from refinery.workspace import EXPORT_FILES, Workspace

SFT_EXPORT = EXPORT_FILES["sft"]
SPLITS = ("train", "valid", "test")
RECEIPT = "collect.json"
#: Beside test.jsonl, line for line: each held-out row's id, source and provenance, for the evaluations.
TEST_META = "test_meta.jsonl"


class CollectError(RefineryError):
    """No SFT export, or too few rows to train on; the message says what to do."""


def split_of(row_id: str, test_fraction: float, valid_fraction: float) -> str:
    x = int(hashlib.sha256(row_id.encode()).hexdigest()[:13], 16) / 16**13
    return "test" if x < test_fraction else "valid" if x < test_fraction + valid_fraction else "train"


def uses_tools(row: dict[str, Any]) -> bool:
    return bool(row["tool_calls"]) or any(m.get("tool_calls") for m in row["messages"] or [])


def mlx_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row in mlx-lm's chat shape, with `tools` on every row (empty when none)."""
    return to_mlx_tools(row) if uses_tools(row) else {**to_mlx_chat(row), "tools": []}


def token_counter(dcfg: DistillConfig, ws: Workspace) -> tuple[str, Callable[[str], int]]:
    """The base model's tokenizer when there is one to read (tokenizer.json), else words."""
    try:
        tok_file = base_model_dir(ws.root, dcfg) / "tokenizer.json"
    except GGUFError:  # train run says what is wrong with it; here, words are counted instead
        tok_file = ws.root / dcfg.base_model / "tokenizer.json"
    if tok_file.is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            return "base model tokenizer", lambda text: len(tok.encode(text).ids)
        except ImportError:
            pass
    return "whitespace words (no base model tokenizer found)", lambda text: len(text.split())


def _text(m: dict[str, Any]) -> str:
    import orjson

    calls = orjson.dumps(m["tool_calls"]).decode() if m.get("tool_calls") else ""
    return (m.get("content") or "") + calls


def collect(ws: Workspace, dcfg: DistillConfig) -> dict[str, Any]:
    """Write the three splits and the receipt; return the receipt. Raises CollectError."""
    src = ws.root / SFT_EXPORT
    if not src.is_file():
        raise CollectError(f"no SFT export at {SFT_EXPORT}: run `refinery run-all` first")
    rows = sum(1 for line in read_jsonl(src) if line.obj is not None)
    if rows < dcfg.min_rows:
        raise CollectError(f"{SFT_EXPORT} has {rows} rows, fewer than min_rows = {dcfg.min_rows} in "
                           "distill_config.json: too few to train on. Add sources (or accept partially "
                           "accepted rows: run-all --include-partial), or lower min_rows.")
    counter_name, count = token_counter(dcfg, ws)
    out = ws.root / dcfg.output_dir / "data"
    stats = {s: {"rows": 0, "tool_using": 0, "direct_answers": 0, "tokens": 0} for s in SPLITS}
    rehearsal: list[dict[str, Any]] = []
    with publishing(out) as staging:
        files = {s: open(staging / f"{s}.jsonl", "wb") for s in SPLITS}
        files["meta"] = open(staging / TEST_META, "wb")
        try:
            writers = {s: JsonlWriter(f) for s, f in files.items()}

            def put(split: str, out_row: dict[str, Any], tools: bool) -> None:
                writers[split].write(out_row)
                st = stats[split]
                st["rows"] += 1
                st["tool_using"] += tools
                st["direct_answers"] += not tools
                st["tokens"] += sum(count(_text(m)) for m in out_row["messages"])

            for line in read_jsonl(src):
                if line.obj is None:
                    raise CollectError(f"{SFT_EXPORT}:{line.offset}: unreadable ({line.reason}); "
                                       "run `refinery run-all` again")
                row = line.obj
                split = split_of(row["id"], dcfg.test_fraction, dcfg.valid_fraction)
                put(split, mlx_row(row), uses_tools(row))
                if split == "test":
                    writers["meta"].write({"id": row["id"], "source": row["source"], "provenance": row["provenance"]})
            if dcfg.safety_rehearsal:
                rehearsal = rehearsal_rows()
                for out_row in rehearsal:
                    put("train", out_row, False)
        finally:
            for f in files.values():
                f.close()
        digests = Digests()
        outputs = [digests.of(staging / f"{s}.jsonl", f"{dcfg.output_dir}/data/{s}.jsonl") for s in SPLITS]
        outputs.append(digests.of(staging / TEST_META, f"{dcfg.output_dir}/data/{TEST_META}"))
        splits = {s: {"rows": st["rows"], "tool_using": st["tool_using"], "direct_answers": st["direct_answers"],
                      "mean_tokens": round(st["tokens"] / st["rows"], 1) if st["rows"] else 0.0}
                  for s, st in stats.items()}
        receipt = {
            "schema_version": 2, "stage": "train-collect",  # 2: safety_rehearsal, counted in total
            "input": {"path": SFT_EXPORT, "sha256": file_sha256(src), "rows": rows},
            "split_rule": {"by": "sha256(id)", "test_fraction": dcfg.test_fraction,
                           "valid_fraction": dcfg.valid_fraction, "min_rows": dcfg.min_rows},
            "token_counter": counter_name, "splits": splits,
            # counted in splits.train too; written after the export's rows
            "safety_rehearsal": {"rows": len(rehearsal), "split": "train", "source": "refinery/training/rehearsal.py"},
            "total": {"rows": rows + len(rehearsal), "tool_using": sum(s["tool_using"] for s in splits.values()),
                      "direct_answers": sum(s["direct_answers"] for s in splits.values())},
            "outputs": outputs,
        }
        write_json(staging / RECEIPT, receipt)  # published with the data it describes, never apart
    return receipt
