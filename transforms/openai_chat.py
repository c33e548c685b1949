"""OpenAI chat-completions logs (`openai_chat*.jsonl`): a logged request and its response.

    {"request": {"model", "messages", "tools"},
     "response": {"id", "created" (epoch s), "model",
                  "choices": [{"message": {"content", "tool_calls", "refusal"}, "finish_reason"}],
                  "usage": {"prompt_tokens", "completion_tokens"}}}

No feedback field: `finish_reason` length/content_filter and `refusal` are the failure signals.
"""

from refinery.transform import (
    TransformSpec, first_user_text, get, integer, messages, missing, new_evidence, new_signals,
    parse_timestamp, text, wrong_type,
)

SPEC = TransformSpec(name="openai_chat", patterns=("openai_chat*.jsonl",), format="jsonl",
                     kind="chat_completion", description="OpenAI chat-completions request/response log")


def transform(row, ctx):
    recorded_at = parse_timestamp(get(row, "response.created"), "response.created")
    msgs = messages(row, "request.messages")
    if not msgs:
        raise missing("request.messages")
    choices = get(row, "response.choices")
    if not isinstance(choices, list) or not choices:
        raise missing("response.choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise wrong_type("response.choices[0]", "an object", choice)
    answer = messages({"m": [{"role": "assistant", **{k: v for k, v in (choice.get("message") or {}).items()
                                                      if k in ("content", "tool_calls", "name")}}]}, "m")[0]
    refusal = get(choice, "message.refusal")
    finish = choice.get("finish_reason")
    flags = (["refusal"] if refusal else []) + (["content_filter"] if finish == "content_filter" else [])
    prompt = first_user_text(msgs)
    if prompt is None:
        raise missing("request.messages[role=user].content")
    return new_evidence(
        SPEC.kind, recorded_at=recorded_at, recorded_at_from="record:response.created",
        task_id=text(row, "response.id"),
        prompt=prompt, messages=[*msgs, answer], response=answer["content"],
        tool_calls=answer["tool_calls"] or [],
        model=text(row, "response.model") or text(row, "request.model"), provider="openai",
        prompt_tokens=integer(row, "response.usage.prompt_tokens"),
        completion_tokens=integer(row, "response.usage.completion_tokens"),
        signals=new_signals(error=f"refusal: {refusal}" if isinstance(refusal, str) and refusal else None,
                            tool_call_count=len(answer["tool_calls"] or []),
                            stop_reason=finish if isinstance(finish, str) else None, safety_flags=flags),
    )
