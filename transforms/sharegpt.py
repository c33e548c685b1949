"""ShareGPT-style datasets: `{conversations: [{from, value}]}` (ShareGPT, LLaMA-Factory, Glaive).

    {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation", "value"}],
     "system", "tools": "<JSON text of tool specs>"}
    {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {"from": "gpt", "value"}}
    {"conversations": [...], "kto_tag": true | false}

Recognised by content. Roles: human/user → user, gpt/assistant/bot → assistant, system → system,
function_call → an assistant tool call (its value is JSON text `{"name", "arguments"}`, several
calls as a JSON list), observation/tool → the tool's result. The prompt is the conversation up
to the last human turn, the response what follows it (calls, results, final answer). A pair
becomes two evidence records (parts chosen / rejected); a KTO tag is a label. No times and no
scores: declare the source curated and give it a `recorded_at` (see `[sources.<name>]`).
"""

import orjson

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, answered_turn, boolean, dated, message, missing, new_evidence, new_signals,
    tool_call, wrong_type,
)

SPEC = TransformSpec(name="sharegpt", patterns=(), format="json", kind="sft_example",
                     description="ShareGPT-style conversations (from/value), with tool calls, pairs and KTO tags")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "chatgpt": "assistant", "model": "assistant", "system": "system", "observation": "tool", "tool": "tool",
         "function": "tool", "function_call": "call"}


def _turns(r):
    conv = r.get("conversations")
    return isinstance(conv, list) and bool(conv) and all(isinstance(t, dict) and ("from" in t or "role" in t)
                                                         for t in conv)


def detect(probe):
    if probe.mostly(_turns):
        return "records have conversations of {from, value} turns (ShareGPT)"
    return None



def _calls(value, where):
    try:
        parsed = orjson.loads(value) if isinstance(value, str) else value
    except orjson.JSONDecodeError:
        return [{"id": None, "name": None, "arguments": value, "problem": "arguments_not_json"}]
    items = parsed if isinstance(parsed, list) else [parsed]
    return [tool_call(c) for c in items]


def _messages(turns, field):
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise wrong_type(f"{field}[{i}]", "a {from, value} turn", t)
        who = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        role = ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise RowError(Reason.WRONG_TYPE, f"field '{field}[{i}].from': unknown speaker {who!r}")
        if role == "call":
            msgs.append(message("assistant", None, _calls(value, f"{field}[{i}].value")))
            continue
        if value is not None and not isinstance(value, str):
            raise wrong_type(f"{field}[{i}].value", "a string", value)
        msgs.append(message(role, value))
    return msgs


def transform(row, ctx):
    recorded_at, when = dated(ctx)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise missing("conversations")
    msgs = _messages(turns, "conversations")
    system = row.get("system")
    if isinstance(system, str) and system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, message("system", system))
    if "chosen" in row or "rejected" in row:
        out = []
        for part in ("chosen", "rejected"):
            side = row.get(part)
            if side is None:
                raise missing(part)
            answer = _messages(side if isinstance(side, list) else [side], part)
            full = [*msgs, *answer]
            turn = answered_turn(full)
            out.append(new_evidence("preference_example", recorded_at=recorded_at, recorded_at_from=when,
                                    prompt=turn.prompt, messages=full, response=turn.response,
                                    tool_calls=turn.tool_calls, part=part,
                                    signals=new_signals(preference=part, tool_call_count=len(turn.tool_calls))))
        return out
    if msgs[-1]["role"] not in ("assistant",):
        raise wrong_type("conversations", "a conversation that ends with the assistant's answer",
                         f"...{turns[-1].get('from', turns[-1].get('role'))}")
    turn = answered_turn(msgs)
    if turn.prompt is None:
        raise missing("conversations[from=human]")
    tag = boolean(row, "kto_tag") if "kto_tag" in row else None
    return new_evidence(SPEC.kind, recorded_at=recorded_at, recorded_at_from=when, prompt=turn.prompt,
                        messages=msgs, response=turn.response, tool_calls=turn.tool_calls,
                        signals=new_signals(tool_call_count=len(turn.tool_calls), approved=tag,
                                            approver="dataset label" if tag is not None else None))
