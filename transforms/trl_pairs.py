"""TRL-style datasets: preference pairs and prompt/completion rows (Hugging Face TRL, LLaMA-Factory).

    {"prompt", "chosen", "rejected"}          strings, or lists of messages (conversational)
    {"chosen": [msgs], "rejected": [msgs]}    whole conversations: the prompt is their shared beginning
    {"chosen_messages", "rejected_messages"}  LLaMA-Factory's form (content parts [{type, value}], loss_weight)
    {"prompt", "completion"[, "label"]}       prompt/completion (SFT), with a KTO label when present

Recognised by content. A pair becomes two evidence records (parts chosen / rejected) answering
the same prompt — the conversation up to its last user message — so the preference export
pairs them; a row whose two sides answer different prompts is refused. A label is the
dataset's judgement of the completion (approved or not). No times and no scores: declare the
source curated and give it a `recorded_at` ([sources.<name>] in refinery.toml).
"""

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, answered_turn, boolean, dated, message, messages, missing, new_evidence, new_signals,
    wrong_type,
)

SPEC = TransformSpec(name="trl_pairs", patterns=(), format="json", kind="preference_example",
                     description="TRL prompt/chosen/rejected pairs, conversational pairs and prompt/completion rows")


def _shape(r):
    if "chosen_messages" in r and "rejected_messages" in r:
        return "messages"
    if "chosen" in r and "rejected" in r and ("prompt" in r or isinstance(r["chosen"], list)):
        return "pair"
    if "prompt" in r and "completion" in r:
        return "completion"
    return None


def detect(probe):
    if probe.mostly(_shape):
        shapes = {_shape(r) for r in probe.records} - {None}
        return "records have " + " / ".join(sorted(
            {"pair": "prompt, chosen and rejected", "messages": "chosen_messages and rejected_messages",
             "completion": "prompt and completion"}[s] for s in shapes)) + " (TRL)"
    return None



def _side(value, field, role="assistant"):
    if isinstance(value, str):
        return [message(role, value)]
    if isinstance(value, dict):
        value = [value]
    msgs = messages({}, field, value)
    if not msgs:
        raise missing(field)
    return msgs


def _split(full_c, full_r):
    """The shared beginning of two conversations (the prompt), and each side's answer."""
    n = 0
    while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
        n += 1
    return full_c[:n], full_c[n:], full_r[n:]


def transform(row, ctx):
    recorded_at, when = dated(ctx)
    shape = _shape(row)
    if shape is None:
        raise RowError(Reason.MISSING_FIELD, "needs prompt + chosen + rejected, chosen_messages + rejected_messages, "
                                             "or prompt + completion")
    if shape == "completion":
        prompt = _side(row["prompt"], "prompt", role="user")
        answer = _side(row["completion"], "completion")
        full = [*prompt, *answer]
        turn = answered_turn(full)
        if turn.prompt is None:
            raise missing("prompt")
        label = boolean(row, "label") if "label" in row else None
        return new_evidence("sft_example", recorded_at=recorded_at, recorded_at_from=when, prompt=turn.prompt,
                            messages=full, response=turn.response, tool_calls=turn.tool_calls,
                            signals=new_signals(approved=label, approver="dataset label" if label is not None
                                                else None, tool_call_count=len(turn.tool_calls)))
    if shape == "messages":
        prompt, chosen, rejected = _split(_side(row["chosen_messages"], "chosen_messages"),
                                          _side(row["rejected_messages"], "rejected_messages"))
    elif "prompt" in row:
        prompt = _side(row["prompt"], "prompt", role="user")
        chosen, rejected = _side(row["chosen"], "chosen"), _side(row["rejected"], "rejected")
        if isinstance(row["chosen"], list) and chosen[:len(prompt)] == prompt:  # older TRL: whole conversations
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        prompt, chosen, rejected = _split(_side(row["chosen"], "chosen"), _side(row["rejected"], "rejected"))
    if not prompt or not any(m["role"] == "user" for m in prompt):
        raise missing("prompt")
    if any(m["role"] == "user" for m in [*chosen, *rejected]):
        raise RowError(Reason.WRONG_TYPE, "chosen and rejected continue different conversations: not two answers "
                                          "to one prompt")
    out = []
    for part, answer in (("chosen", chosen), ("rejected", rejected)):
        full = [*prompt, *answer]
        turn = answered_turn(full)
        if turn.response is None and not turn.tool_calls:
            raise wrong_type(part, "an assistant answer", answer[-1]["role"] if answer else "nothing")
        out.append(new_evidence(SPEC.kind, recorded_at=recorded_at, recorded_at_from=when, prompt=turn.prompt,
                                messages=full, response=turn.response, tool_calls=turn.tool_calls, part=part,
                                signals=new_signals(preference=part, tool_call_count=len(turn.tool_calls))))
    return out
