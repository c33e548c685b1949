"""OpenAI fine-tuning files: chat examples, and DPO preference pairs.

    chat   {"messages": [{"role", "content", "tool_calls"}, ...], "tools", "parallel_tool_calls"}
    DPO    {"input": {"messages", "tools"}, "preferred_output": [{"role": "assistant", ...}],
            "non_preferred_output": [{"role": "assistant", ...}]}

Recognised by content. A chat example's prompt is its conversation up to the last user
message and its response the assistant turn(s) after it (text and tool calls). A DPO row
becomes two evidence records — parts `chosen` and `rejected`, marked with the preference — so
the scorer and the preference export see them as a pair. Fine-tuning data carries no scores
and no times: declare the source curated (`[sources.<name>] trust = "curated"`) to have it
approved, and give it a `recorded_at` to date it.
"""

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, answered_turn, dated, messages, missing, new_evidence, new_signals, wrong_type,
)

SPEC = TransformSpec(name="openai_finetune", patterns=(), format="json", kind="sft_example",
                     description="OpenAI fine-tuning chat examples and DPO pairs")

#: LLaMA-Factory's "openai"-style datasets add media lists beside the messages.
CHAT_KEYS = {"messages", "tools", "parallel_tool_calls", "functions", "metadata", "images", "videos", "audios"}
DPO_KEYS = {"input", "preferred_output", "non_preferred_output"}


def _is_chat(r):
    msgs = r.get("messages")
    return (set(r) <= CHAT_KEYS and isinstance(msgs, list) and bool(msgs)
            and all(isinstance(m, dict) and "role" in m for m in msgs))


def _is_dpo(r):
    return "input" in r and ("preferred_output" in r or "non_preferred_output" in r) and isinstance(r["input"], dict)


def detect(probe):
    if probe.mostly(_is_dpo):
        return "records have input, preferred_output and non_preferred_output (DPO)"
    if probe.mostly(_is_chat):
        return "records are {messages[, tools]} chat examples"
    return None


def transform(row, ctx):
    recorded_at, when = dated(ctx)
    if "preferred_output" in row or "non_preferred_output" in row:
        prompt_msgs = messages(row, "input.messages")
        if not prompt_msgs:
            raise missing("input.messages")
        turn = answered_turn(prompt_msgs)
        if turn.prompt is None:
            raise missing("input.messages[role=user]")
        out = []
        for part, field in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
            answer = messages(row, field)
            if not answer:
                raise missing(field)
            if any(m["role"] != "assistant" for m in answer):
                raise RowError(Reason.WRONG_TYPE, f"field '{field}': expected assistant messages only")
            msgs = [*prompt_msgs, *answer]
            t = answered_turn(msgs)
            out.append(new_evidence(
                "preference_example", recorded_at=recorded_at, recorded_at_from=when, prompt=t.prompt,
                messages=msgs, response=t.response, tool_calls=t.tool_calls, part=part,
                signals=new_signals(tool_call_count=len(t.tool_calls), preference=part)))
        return out
    msgs = messages(row, "messages")
    if not msgs:
        raise missing("messages")
    if msgs[-1]["role"] != "assistant":
        raise wrong_type("messages", "a conversation that ends with the assistant's answer",
                         f"...{msgs[-1]['role']}")
    t = answered_turn(msgs)
    if t.prompt is None:
        raise missing("messages[role=user]")
    return new_evidence(SPEC.kind, recorded_at=recorded_at, recorded_at_from=when, prompt=t.prompt, messages=msgs,
                        response=t.response, tool_calls=t.tool_calls,
                        signals=new_signals(tool_call_count=len(t.tool_calls)))
