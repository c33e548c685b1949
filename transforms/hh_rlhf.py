"""Anthropic HH-RLHF style preference data: two whole dialogues, the better and the worse.

    {"chosen": "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: <better answer>",
     "rejected": "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: <worse answer>"}

Recognised by content (chosen/rejected texts in Human:/Assistant: turns). Each dialogue is split
at its last "\n\nAssistant:": what comes before is the prompt (parsed into user/assistant turns),
what follows is the answer. The row becomes two evidence records (parts chosen / rejected) that
answer the same prompt; when the two dialogues' prompts differ the row is refused. No times and
no scores: declare the source curated and give it a `recorded_at`.
"""

import re

from refinery.reasons import Reason
from refinery.transform import (
    RowError, TransformSpec, answered_turn, dated, message, new_evidence, new_signals, text_or_empty, wrong_type,
)

SPEC = TransformSpec(name="hh_rlhf", patterns=(), format="json", kind="preference_example",
                     description="HH-RLHF chosen/rejected dialogues (Human:/Assistant: text)")

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _is_hh(r):
    c, rj = r.get("chosen"), r.get("rejected")
    return isinstance(c, str) and isinstance(rj, str) and "Assistant:" in c and "Human:" in c and \
        set(r) <= {"chosen", "rejected", "id", "source"}


def detect(probe):
    if probe.mostly(_is_hh):
        return "records have chosen/rejected dialogues in Human:/Assistant: turns (HH-RLHF)"
    return None



def _dialogue(textv: str, field: str) -> list[dict]:
    textv = textv if textv.startswith("\n\n") else "\n\n" + textv.lstrip("\n")
    parts = _TURN.split(textv)
    if len(parts) < 3 or parts[0].strip():
        raise wrong_type(field, "a dialogue of '\\n\\nHuman:' / '\\n\\nAssistant:' turns", textv[:40])
    msgs = []
    for who, said in zip(parts[1::2], parts[2::2]):
        msgs.append(message("user" if who == "Human" else "assistant", said.strip()))
    if msgs[-1]["role"] != "assistant":
        raise wrong_type(field, "a dialogue that ends with the Assistant's answer", "...Human:")
    return msgs


def transform(row, ctx):
    recorded_at, when = dated(ctx)
    sides = {}
    for part in ("chosen", "rejected"):
        value = text_or_empty(row, part)
        if value is None:
            raise RowError(Reason.MISSING_FIELD, f"field '{part}' is missing or empty")
        sides[part] = _dialogue(value, part)
    if [m["content"] for m in sides["chosen"][:-1]] != [m["content"] for m in sides["rejected"][:-1]]:
        raise RowError(Reason.WRONG_TYPE, "chosen and rejected dialogues differ before their last answer: "
                                          "not two answers to one prompt")
    out = []
    for part, msgs in sides.items():
        turn = answered_turn(msgs)
        out.append(new_evidence(SPEC.kind, recorded_at=recorded_at, recorded_at_from=when, prompt=turn.prompt,
                                messages=msgs, response=turn.response, part=part,
                                signals=new_signals(preference=part)))
    return out
