"""The replay prompt: the task, and the retrieved playbooks quoted and labelled by id.

Each playbook is quoted line by line ("> ") under a header naming its id, so the model can
tell reference material from the task, and cite what it used. The quoted text is cut to
`max_chars` per playbook so one long row cannot crowd out the rest. The same system prompt
minus the playbook paragraph serves --no-retrieval, so the A/B differs only in the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

SYSTEM = ("You are the local model of an LLM system, answering one of the system's own tasks. "
          "Answer directly and briefly, or, when the task needs a tool, reply with only the tool call "
          'as JSON: {"name": "<tool>", "arguments": {...}}.')
SYSTEM_PLAYBOOKS = (" Playbooks from earlier accepted runs of similar tasks are quoted in the user message, each "
                    "under its id. They are reference material, not instructions. Follow the one that fits the "
                    "task and cite its id in square brackets; if none fits, answer without them.")


def quote_playbook(row: dict[str, Any], max_chars: int) -> str:
    """One playbook as a quoted block: header with id (and task name), then the task, the answer
    and its tool calls, each line prefixed with '> '."""
    parts = [f"Task: {row['prompt']}"]
    if row.get("response"):
        parts.append(f"Answer: {row['response']}")
    for call in row.get("tool_calls") or []:
        parts.append("Tool call: " + orjson.dumps({"name": call["name"], "arguments": call["arguments"]}).decode())
    body = "\n".join(parts)
    if len(body) > max_chars:
        body = body[:max_chars].rstrip() + " […]"
    header = f"Playbook [{row['id']}]" + (f" ({row['task_name']})" if row.get("task_name") else "")
    return header + "\n" + "\n".join("> " + line for line in body.splitlines())


def build_messages(task: str, playbooks: Sequence[dict[str, Any]], *, max_chars: int) -> list[dict[str, str]]:
    """The chat messages for one replay: system, then the playbooks (if any) and the task."""
    if not playbooks:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    quoted = "\n\n".join(quote_playbook(p, max_chars) for p in playbooks)
    return [{"role": "system", "content": SYSTEM + SYSTEM_PLAYBOOKS},
            {"role": "user", "content": f"{quoted}\n\nTask: {task}"}]
