"""Training-format adapters: the SFT and preference exports in the shapes trainers read.

    exports/sft/instruction_response.jsonl    ──▶ mlx-chat | mlx-tools | mlx-completions | alpaca | openai
    exports/preference/chosen_rejected.jsonl  ──▶ trl

mlx-lm picks a file's format from its first row, so each output holds one format only.
Tool calls are always `{"name", "arguments"}`; in the chat-template shapes (mlx-tools,
openai) they are wrapped as `{"id", "type": "function", "function": {"name", "arguments"}}`,
with `arguments` an object for mlx-lm's templates and a JSON string for OpenAI fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from refinery.jsonl import read_jsonl, write_jsonl_atomic
from refinery.normalize import answer_text

SFT_FORMATS = ("mlx-chat", "mlx-tools", "mlx-completions", "alpaca", "openai")
PREFERENCE_FORMATS = ("trl",)
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS


class FormatError(ValueError):
    pass


def _call(c: dict[str, Any], i: int, string_args: bool) -> dict[str, Any]:
    args = c["arguments"] if c["arguments"] is not None else {}
    return {"id": c["id"] or f"call_{i}", "type": "function",
            "function": {"name": c["name"], "arguments": orjson.dumps(args).decode() if string_args else args}}


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), "string")


def _tools(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool schema per function the row calls, its parameters inferred from the arguments used."""
    by_name: dict[str, dict[str, Any]] = {}
    for c in calls:
        props = by_name.setdefault(c["name"], {})
        if isinstance(c["arguments"], dict):
            for k, v in c["arguments"].items():
                props.setdefault(k, {"type": _json_type(v)})
    return [{"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                               "parameters": {"type": "object", "properties": props}}}
            for name, props in sorted(by_name.items())]


def _tool_messages(row: dict[str, Any], string_args: bool) -> list[dict[str, Any]]:
    """The conversation with tool calls in chat-template shape."""
    if row["messages"]:
        out = []
        n = 0
        for m in row["messages"]:
            msg: dict[str, Any] = {"role": m["role"], "content": m["content"] or ""}
            if m.get("tool_calls"):
                msg["tool_calls"] = [_call(c, n + i, string_args) for i, c in enumerate(m["tool_calls"])]
                n += len(m["tool_calls"])
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            if m["role"] == "tool" and m.get("name"):
                msg["name"] = m["name"]
            out.append(msg)
        return out
    msgs: list[dict[str, Any]] = [{"role": "user", "content": row["instruction"]}]
    assistant: dict[str, Any] = {"role": "assistant", "content": row["response"] or ""}
    if row["tool_calls"]:
        assistant["tool_calls"] = [_call(c, i, string_args) for i, c in enumerate(row["tool_calls"])]
    msgs.append(assistant)
    return msgs


def to_mlx_chat(row: dict[str, Any]) -> dict[str, Any]:
    system = [m for m in row["messages"] or [] if m["role"] == "system" and m["content"]]
    return {"messages": [*({"role": "system", "content": m["content"]} for m in system[:1]),
                         {"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": answer_text(row)}]}


def to_mlx_tools(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": _tool_messages(row, string_args=False), "tools": _tools(row["tool_calls"])}


def to_openai(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": _tool_messages(row, string_args=True)}
    if row["tool_calls"]:
        out["tools"] = _tools(row["tool_calls"])
    return out


def to_mlx_completions(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["instruction"], "completion": answer_text(row)}


def to_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": row["instruction"], "input": row["input"], "output": answer_text(row),
            "meta": {"id": row["id"], "source": row["source"], "quality_score": row["quality_score"],
                     "score": row["score"], "provenance": row["provenance"]}}


def to_trl(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mlx-chat": to_mlx_chat, "mlx-tools": to_mlx_tools, "mlx-completions": to_mlx_completions,
    "alpaca": to_alpaca, "openai": to_openai, "trl": to_trl,
}


def default_input(fmt: str) -> str:
    return ("exports/preference/chosen_rejected.jsonl" if fmt in PREFERENCE_FORMATS
            else "exports/sft/instruction_response.jsonl")


def convert(src: Path, dest: Path, fmt: str) -> int:
    """Convert every row of `src` into `fmt`, writing `dest` atomically; returns rows written."""
    if fmt not in CONVERTERS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fn = CONVERTERS[fmt]
    need = "chosen" if fmt in PREFERENCE_FORMATS else "instruction"

    def rows() -> Iterator[dict[str, Any]]:
        for line in read_jsonl(src):
            if line.obj is None:
                raise FormatError(f"{src}:{line.offset}: {line.reason} ({line.detail})")
            if need not in line.obj:
                raise FormatError(f"{src}:{line.offset}: not a{'' if fmt in PREFERENCE_FORMATS else 'n SFT'} "
                                  f"{'preference pair' if fmt in PREFERENCE_FORMATS else 'row'} "
                                  f"(no {need!r} field); {fmt} converts {default_input(fmt)}")
            yield fn(line.obj)

    n, _ = write_jsonl_atomic(dest, rows())
    return n
