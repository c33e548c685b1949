"""Alpaca-style datasets: `{instruction, input, output}` rows (Stanford Alpaca, LLaMA-Factory).

    {"instruction", "input", "output", "system", "history": [[question, answer], ...]}
    {"instruction", "input", "chosen", "rejected"}        a preference pair (LLaMA-Factory pairwise)
    {"instruction", "input", "output": [chosen, rejected]}  the same, as comparison_gpt4 writes it
    {"instruction", "input", "output", "kto_tag": true | false}  a KTO label: desirable or not

Recognised by content (records with `instruction` and an answer). The prompt is the instruction
followed by its input; earlier turns in `history` come before it (the prompt is then the whole
exchange, the response the last output). A pair becomes two evidence records (parts chosen /
rejected); a KTO tag is a human label. Datasets carry no times and no scores: declare the source
curated (`[sources.<name>] trust = "curated"`) and give it a `recorded_at`.
"""

from refinery.transform import (
    RowError, TransformSpec, answered_turn, boolean, dated, message, missing, new_evidence, new_signals, text,
    text_or_empty, wrong_type,
)
from refinery.reasons import Reason

SPEC = TransformSpec(name="alpaca", patterns=(), format="json", kind="sft_example",
                     description="Alpaca-style instruction/input/output datasets (also pairwise and KTO)")

KEYS = {"instruction", "input", "output", "system", "history", "chosen", "rejected", "kto_tag", "label", "id",
        "category", "source", "text"}


def _is_alpaca(r):
    return isinstance(r.get("instruction"), str) and ("output" in r or ("chosen" in r and "rejected" in r)) \
        and set(r) <= KEYS


def detect(probe):
    if probe.mostly(_is_alpaca):
        return "records have instruction and output (Alpaca)"
    return None



def _conversation(row):
    msgs = []
    system = text(row, "system")
    if system:
        msgs.append(message("system", system))
    history = row.get("history") or []
    if not isinstance(history, list):
        raise wrong_type("history", "a list of [question, answer] pairs", history)
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise wrong_type(f"history[{i}]", "a [question, answer] pair of strings", turn)
        msgs += [message("user", turn[0]), message("assistant", turn[1])]
    instruction = text(row, "instruction", required=True)
    extra = text(row, "input")
    msgs.append(message("user", f"{instruction}\n\n{extra}" if extra else instruction))
    return msgs


def _evidence(msgs, answer, when, recorded_at, **kw):
    full = [*msgs, message("assistant", answer)]
    turn = answered_turn(full)
    return new_evidence(kw.pop("kind", SPEC.kind), recorded_at=recorded_at, recorded_at_from=when,
                        prompt=turn.prompt, messages=full, response=answer, **kw)


def transform(row, ctx):
    recorded_at, when = dated(ctx)
    msgs = _conversation(row)
    output = row.get("output")
    if isinstance(output, list):  # [chosen, rejected]
        if len(output) != 2 or not all(isinstance(x, str) for x in output):
            raise wrong_type("output", "a string, or [chosen, rejected]", output)
        row = {**row, "chosen": output[0], "rejected": output[1]}
        output = None
    if "chosen" in row or "rejected" in row:
        out = []
        for part in ("chosen", "rejected"):
            answer = text_or_empty(row, part)
            if answer is None:
                raise missing(part)
            out.append(_evidence(msgs, answer, when, recorded_at, kind="preference_example", part=part,
                                 signals=new_signals(preference=part)))
        return out
    answer = text_or_empty(row, "output")
    if answer is None:
        raise missing("output")
    tag = boolean(row, "kto_tag") if "kto_tag" in row else boolean(row, "label") if "label" in row else None
    if tag is not None and not isinstance(tag, bool):
        raise RowError(Reason.WRONG_TYPE, "field 'kto_tag': expected true or false")
    return _evidence(msgs, answer, when, recorded_at,
                     signals=new_signals(approved=tag, approver="dataset label" if tag is not None else None))
