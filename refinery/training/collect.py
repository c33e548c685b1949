"""`refinery train collect`: the SFT and preference exports as mlx-lm training data, split so that
no held-out prompt is (nearly) in training.

    exports/sft/instruction_response.jsonl ──▶ <output_dir>/data/train.jsonl, valid.jsonl, test.jsonl
    exports/preference/chosen_rejected.jsonl ─▶ <output_dir>/data/preference/train.jsonl, valid.jsonl, test.jsonl
                                           ──▶ <output_dir>/data/collect.json  (the receipt)

Rows and pairs are grouped by task key, each group goes to one split by a hash of its key, and
a held-out group whose prompt shares decontam_threshold of its word n-grams with training moves
into training (refinery/training/decontam.py); the receipt reports the overlap left. Rows with
tool calls are written in mlx-lm's tools shape (chat + "tools", calls as {"id", "type":
"function", "function": {"name", "arguments"}}), the rest as chat with an empty "tools" list;
pairs in TRL's conversational shape (prompt messages, chosen and rejected replies, tools). The
safety rehearsal rows (refinery/training/rehearsal.py) follow in the training split unless
`safety_rehearsal` is false.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinery.canonical import file_sha256
from refinery.errors import RefineryError
from refinery.formats import to_mlx_chat, to_mlx_tools, to_trl_chat
from refinery.jsonl import JsonlWriter, publishing, read_jsonl
from refinery.receipts import Digests, write_json
from refinery.normalize import task_key
from refinery.training.config import DistillConfig, base_model_dir
from refinery.training.decontam import Item, assign, split_of  # noqa: F401  (split_of: part of this module's API)
from refinery.training.from_gguf import GGUFError
from refinery.training.evaluate import SAFETY_PROBES, group_of
from refinery.training.rehearsal import REHEARSAL, rehearsal_rows
from refinery.workspace import EXPORT_FILES, Workspace

SFT_EXPORT = EXPORT_FILES["sft"]
PREFERENCE_EXPORT = EXPORT_FILES["preference"]
#: the pairs' splits, in TRL's conversational shape, for `train run --method dpo`
PAIRS_DIR = "preference"
SPLITS = ("train", "valid", "test")
RECEIPT = "collect.json"
#: Beside test.jsonl, line for line: each held-out row's id, source and provenance, for the evaluations.
TEST_META = "test_meta.jsonl"


class CollectError(RefineryError):
    """No SFT export, or too few rows to train on; the message says what to do."""


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


def _read(path: Path, rel: str) -> list[dict[str, Any]]:
    out = []
    for line in read_jsonl(path):
        if line.obj is None:
            raise CollectError(f"{rel}:{line.offset}: unreadable ({line.reason}); run `refinery run-all` again")
        out.append(line.obj)
    return out


def collect(ws: Workspace, dcfg: DistillConfig) -> dict[str, Any]:
    """Write the splits (rows and pairs) and the receipt; return the receipt. Raises CollectError."""
    src = ws.root / SFT_EXPORT
    if not src.is_file():
        raise CollectError(f"no SFT export at {SFT_EXPORT}: run `refinery run-all` first")
    sft = _read(src, SFT_EXPORT)
    rows = len(sft)
    if rows < dcfg.min_rows:
        raise CollectError(f"{SFT_EXPORT} has {rows} rows, fewer than min_rows = {dcfg.min_rows} in "
                           "distill_config.json: too few to train on. Add sources (or accept partially "
                           "accepted rows: run-all --include-partial), or lower min_rows.")
    pref_src = ws.root / PREFERENCE_EXPORT
    pairs = _read(pref_src, PREFERENCE_EXPORT) if pref_src.is_file() else []
    rehearsal = rehearsal_rows() if dcfg.safety_rehearsal else []
    items = [Item(task_key({"prompt": r["instruction"], "id": r["id"]}), r["instruction"],
                  eval_sheet=group_of(r["source"]) == "eval_sheet") for r in sft]
    items += [Item(p["task_key"], p["prompt"]) for p in pairs]
    contamination = assign(items, test_fraction=dcfg.test_fraction, valid_fraction=dcfg.valid_fraction,
                           ngram=dcfg.decontam_ngram, threshold=dcfg.decontam_threshold,
                           fixed_train=[q for q, _ in REHEARSAL] if rehearsal else (), probes=SAFETY_PROBES)
    counter_name, count = token_counter(dcfg, ws)
    out = ws.root / dcfg.output_dir / "data"
    stats = {s: {"rows": 0, "tool_using": 0, "direct_answers": 0, "tokens": 0} for s in SPLITS}
    with publishing(out) as staging:
        (staging / PAIRS_DIR).mkdir()
        files = {s: open(staging / f"{s}.jsonl", "wb") for s in SPLITS}
        files["meta"] = open(staging / TEST_META, "wb")
        files.update({("pairs", s): open(staging / PAIRS_DIR / f"{s}.jsonl", "wb") for s in SPLITS})
        try:
            writers = {s: JsonlWriter(f) for s, f in files.items()}

            def put(split: str, out_row: dict[str, Any], tools: bool) -> None:
                writers[split].write(out_row)
                st = stats[split]
                st["rows"] += 1
                st["tool_using"] += tools
                st["direct_answers"] += not tools
                st["tokens"] += sum(count(_text(m)) for m in out_row["messages"])

            for row, it in zip(sft, items[:rows], strict=True):
                put(it.split, mlx_row(row), uses_tools(row))
                if it.split == "test":
                    writers["meta"].write({"id": row["id"], "source": row["source"], "provenance": row["provenance"]})
            pair_rows = dict.fromkeys(SPLITS, 0)
            for pair, it in zip(pairs, items[rows:], strict=True):
                writers[("pairs", it.split)].write({"id": pair["id"], **to_trl_chat(pair)})
                pair_rows[it.split] += 1
            for out_row in rehearsal:
                put("train", out_row, False)
        finally:
            for f in files.values():
                f.close()
        digests = Digests()
        outputs = [digests.of(staging / f"{s}.jsonl", f"{dcfg.output_dir}/data/{s}.jsonl") for s in SPLITS]
        outputs.append(digests.of(staging / TEST_META, f"{dcfg.output_dir}/data/{TEST_META}"))
        outputs += [digests.of(staging / PAIRS_DIR / f"{s}.jsonl", f"{dcfg.output_dir}/data/{PAIRS_DIR}/{s}.jsonl")
                    for s in SPLITS]
        splits = {s: {"rows": st["rows"], "tool_using": st["tool_using"], "direct_answers": st["direct_answers"],
                      "mean_tokens": round(st["tokens"] / st["rows"], 1) if st["rows"] else 0.0,
                      "pairs": pair_rows[s]}
                  for s, st in stats.items()}
        receipt = {
            "schema_version": 3, "stage": "train-collect",  # 3: split by task group, decontaminated; pairs
            "input": {"path": SFT_EXPORT, "sha256": file_sha256(src), "rows": rows},
            "preference_input": {"path": PREFERENCE_EXPORT, "sha256": file_sha256(pref_src), "rows": len(pairs)}
            if pref_src.is_file() else None,
            "split_rule": {"by": "sha256(task key), then decontaminated", "test_fraction": dcfg.test_fraction,
                           "valid_fraction": dcfg.valid_fraction, "min_rows": dcfg.min_rows,
                           "decontam_ngram": dcfg.decontam_ngram, "decontam_threshold": dcfg.decontam_threshold},
            "contamination": contamination,
            "token_counter": counter_name, "splits": splits,
            # counted in splits.train too; written after the export's rows
            "safety_rehearsal": {"rows": len(rehearsal), "split": "train", "source": "refinery/training/rehearsal.py"},
            "total": {"rows": rows + len(rehearsal), "pairs": len(pairs),
                      "tool_using": sum(s["tool_using"] for s in splits.values()),
                      "direct_answers": sum(s["direct_answers"] for s in splits.values())},
            "outputs": outputs,
        }
        write_json(staging / RECEIPT, receipt)  # published with the data it describes, never apart
    return receipt
