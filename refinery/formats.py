"""Training-format adapters: the SFT and preference exports in the shapes trainers read.

    exports/sft/instruction_response.jsonl    ──▶ mlx-chat | mlx-tools | mlx-completions | alpaca | openai
    exports/preference/chosen_rejected.jsonl  ──▶ trl | trl-chat | openai-dpo

mlx-lm picks a file's format from its first row, so each output holds one format only.
In the flattened shapes (mlx-chat, mlx-completions, alpaca, trl, and openai-dpo's outputs:
OpenAI's DPO takes text only) an answer is its tool calls,
one `{"name", "arguments"}` JSON line each, then its text. In the message shapes (mlx-tools,
openai, trl-chat) calls are `{"id", "type": "function", "function": {"name",
"arguments"}}` — `arguments` an object for chat templates, a JSON string for OpenAI —, ids are 9
letters or digits (Mistral's templates refuse others), and every row has `tools` (a schema per
function called, an empty list when none: `datasets` needs every row to have the same keys).
Checked with the consumers themselves: tests/test_consumers.py renders every shape through
`transformers`' chat templates and loads every file with `datasets`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from refinery.errors import RefineryError
from refinery.jsonl import read_jsonl, write_jsonl_atomic
from refinery.normalize import answer_text, render_tool_calls

SFT_FORMATS = ("mlx-chat", "mlx-tools", "mlx-completions", "alpaca", "openai")
PREFERENCE_FORMATS = ("trl", "trl-chat", "openai-dpo")
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS


class FormatError(RefineryError, ValueError):
    pass


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def call_id(original: str | None, fallback: str) -> str:
    """A tool-call id every common chat template accepts: 9 letters or digits (Mistral's refuse
    any other, e.g. `call_0000002_0`). An id of that shape is kept; any other is replaced by 9
    base-62 digits of the sha256 of the original — of `fallback` (row id and position) when the
    source gave none —, so a call and the tool message answering it keep matching ids."""
    if original and len(original) == 9 and original.isascii() and original.isalnum():
        return original
    n = int.from_bytes(hashlib.sha256((original or fallback).encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        n, d = divmod(n, 62)
        digits.append(_BASE62[d])
    return "".join(digits)


def _call(c: dict[str, Any], fallback: str, string_args: bool) -> dict[str, Any]:
    args = c["arguments"] if c["arguments"] is not None else {}
    return {"id": call_id(c["id"], fallback), "type": "function",
            "function": {"name": c["name"], "arguments": orjson.dumps(args).decode() if string_args else args}}


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), "string")


def all_calls(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every tool call of an SFT row: those of its conversation, else its answer's."""
    in_messages = [c for m in row["messages"] or [] for c in m.get("tool_calls") or []]
    return in_messages or row["tool_calls"]


def tool_schemas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool schema per function called, inferred from the calls: each parameter named, typed
    from the values passed, and `required` when every call passes it. No description is made
    up: the trace does not say what the tool does."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for c in calls:
        if c["name"]:
            by_name.setdefault(c["name"], []).append(c["arguments"] if isinstance(c["arguments"], dict) else {})
    out = []
    for name, used in sorted(by_name.items()):
        props: dict[str, Any] = {}
        for args in used:
            for k, v in args.items():
                if props.get(k, {"type": "null"})["type"] == "null":  # the first value that says its type
                    props[k] = {"type": _json_type(v)}
        required = [k for k in props if all(k in args for args in used)]
        out.append({"type": "function", "function": {
            "name": name, "parameters": {"type": "object", "properties": props, "required": required}}})
    return out


def _well_formed(c: dict[str, Any]) -> bool:
    return bool(c["name"]) and not c.get("problem")


def _messages(msgs: list[dict[str, Any]], rid: str, string_args: bool, tool_names: bool) -> list[dict[str, Any]]:
    """Messages in chat-template shape: ids every template accepts, the tool's name on a tool
    message only where the format has one (`tool_names`), and a malformed call (no name, or
    made with "tool" instead of "name") kept in the text as it was made — it cannot be a
    structured call."""
    out = []
    n = 0
    pending: list[str] = []  # calls not answered yet, in the order they were made
    for k, m in enumerate(msgs):
        calls = m.get("tool_calls") or []
        bad = [c for c in calls if not _well_formed(c)]
        content = "\n".join(filter(None, [render_tool_calls(bad) if bad else "", m["content"] or ""]))
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        good = [c for c in calls if _well_formed(c)]
        if good:
            msg["tool_calls"] = [_call(c, f"{rid}\x1f{n + i}", string_args) for i, c in enumerate(good)]
            pending += [c["id"] for c in msg["tool_calls"]]
            n += len(good)
        if m.get("tool_call_id"):
            msg["tool_call_id"] = call_id(m["tool_call_id"], "")
            if msg["tool_call_id"] in pending:
                pending.remove(msg["tool_call_id"])
        elif m["role"] == "tool":  # a result the source did not tie to its call: the oldest call unanswered
            msg["tool_call_id"] = pending.pop(0) if pending else call_id(None, f"{rid}\x1ftool\x1f{k}")
        if tool_names and m["role"] == "tool" and m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tool_messages(row: dict[str, Any], string_args: bool, tool_names: bool) -> list[dict[str, Any]]:
    """An SFT row's conversation in chat-template shape."""
    if row["messages"]:
        return _messages(row["messages"], row.get("id") or "", string_args, tool_names)
    answer = {"role": "assistant", "content": row["response"], "tool_calls": row["tool_calls"]}
    return _messages([{"role": "user", "content": row["instruction"]}, answer], row.get("id") or "",
                     string_args, tool_names)


def to_mlx_chat(row: dict[str, Any]) -> dict[str, Any]:
    system = [m for m in row["messages"] or [] if m["role"] == "system" and m["content"]]
    return {"messages": [*({"role": "system", "content": m["content"]} for m in system[:1]),
                         {"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": answer_text(row)}]}


def to_mlx_tools(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": _tool_messages(row, string_args=False, tool_names=True), "tools": tool_schemas(all_calls(row))}


def to_openai(row: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's fine-tuning chat shape: arguments as JSON text, no `name` on tool messages, and
    `tools` on every row (an empty list when none: a key missing from some rows breaks
    `datasets`)."""
    return {"messages": _tool_messages(row, string_args=True, tool_names=False), "tools": tool_schemas(all_calls(row))}


def to_mlx_completions(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["instruction"], "completion": answer_text(row)}


def to_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["instruction"], "input": row["input"], "output": answer_text(row),
            "meta": {"id": row["id"], "source": row["source"], "quality_score": row["quality_score"],
                     "score": row["score"], "provenance": row["provenance"]}}


def to_trl(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def _pair_prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]}]


def _pair_tools(row: dict[str, Any]) -> list[dict[str, Any]]:
    return tool_schemas([c for side in ("chosen_reply", "rejected_reply") for m in row[side]
                         for c in m.get("tool_calls") or [] if _well_formed(c)])


def to_trl_chat(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's conversational preference shape: the prompt as system/user messages, each side as
    the conversation after it — assistant messages with their tool calls (arguments as objects,
    as chat templates take them), the tool results, the final text."""
    return {"prompt": _pair_prompt(row), "chosen": _side(row, "chosen"), "rejected": _side(row, "rejected"),
            "tools": _pair_tools(row)}


def _side(row: dict[str, Any], side: str) -> list[dict[str, Any]]:
    """A side's reply as messages; a reply holding a malformed call (no name, or "tool" instead
    of "name") cannot be structured calls and results, and is its flattened text, as it was written."""
    reply = row[f"{side}_reply"]
    if all(_well_formed(c) for m in reply for c in m.get("tool_calls") or []):
        return _messages(reply, row[f"{side}_id"], string_args=False, tool_names=True)
    return [{"role": "assistant", "content": row[side]}]


def to_openai_dpo(row: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's preference fine-tuning (DPO) shape: the input messages, then one preferred and
    one non-preferred assistant message. OpenAI's DPO takes text outputs only, so each side is
    its flattened answer: its tool calls as JSON lines, then its text."""
    return {"input": {"messages": _pair_prompt(row)},
            "preferred_output": [{"role": "assistant", "content": row["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": row["rejected"]}]}


CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mlx-chat": to_mlx_chat, "mlx-tools": to_mlx_tools, "mlx-completions": to_mlx_completions,
    "alpaca": to_alpaca, "openai": to_openai, "trl": to_trl, "trl-chat": to_trl_chat, "openai-dpo": to_openai_dpo,
}


def default_input(fmt: str) -> str:
    from refinery.workspace import EXPORT_FILES

    return EXPORT_FILES["preference" if fmt in PREFERENCE_FORMATS else "sft"]


def convert(src: Path, dest: Path, fmt: str) -> int:
    """Convert every row of `src` into `fmt`, writing `dest` atomically; returns rows written."""
    if fmt not in CONVERTERS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fn = CONVERTERS[fmt]
    need = ("chosen_reply" if fmt == "trl-chat" else "chosen") if fmt in PREFERENCE_FORMATS \
        else "instruction"

    def rows() -> Iterator[dict[str, Any]]:
        for line in read_jsonl(src):
            if line.obj is None:
                raise FormatError(f"{src}:{line.offset}: {line.reason} ({line.detail})")
            if need == "chosen_reply" and "chosen" in line.obj and need not in line.obj:
                raise FormatError(f"{src}:{line.offset}: a preference pair written before schema 2 (no chosen_reply, "
                                  f"which {fmt} needs): run `refinery run-all` again")
            if need not in line.obj:
                raise FormatError(f"{src}:{line.offset}: not a{'' if fmt in PREFERENCE_FORMATS else 'n SFT'} "
                                  f"{'preference pair' if fmt in PREFERENCE_FORMATS else 'row'} "
                                  f"(no {need!r} field); {fmt} converts {default_input(fmt)}")
            yield fn(line.obj)

    n, _ = write_jsonl_atomic(dest, rows())
    return n
