"""Escalation: a task the local model failed goes to an OpenAI-compatible chat-completions
endpoint, configured in refinery.toml under [replay.escalation]. The API key is read from the
environment variable named there (`api_key_env`) at call time; it is never written anywhere.

Standard library HTTP only (one POST, JSON in and out): nothing to install for it. The reply is
read with a deadline and a size cap, so a slow or runaway endpoint cannot hold a replay.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from refinery.config import EscalationConfig
from refinery.errors import RefineryError
from refinery.normalize import answer_text
from refinery.transform import tool_call


class EscalationUnavailable(RefineryError):
    """--allow-escalation cannot work as configured (bad usage: exit 2); the message says what to set."""


class EscalationFailed(RefineryError):
    """The endpoint did not answer usefully: HTTP error, timeout, unreachable, not chat-completions JSON."""


@dataclass(frozen=True)
class Escalated:
    answer: str
    model: str
    finish_reason: str | None
    latency_ms: float


SETUP_HINT = ('add to refinery.toml:\n  [replay.escalation]\n  base_url = "https://api.openai.com/v1"\n'
              '  model = "gpt-4o-mini"\n  api_key_env = "OPENAI_API_KEY"   # the variable\'s name, not the key')


def api_key(ecfg: EscalationConfig | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The key to send (None for an endpoint without authentication); raises EscalationUnavailable
    when escalation is not configured or the named variable is not set."""
    if ecfg is None:
        raise EscalationUnavailable(f"--allow-escalation needs an endpoint: {SETUP_HINT}")
    if ecfg.api_key_env is None:
        return None
    key = env.get(ecfg.api_key_env, "")
    if not key:
        raise EscalationUnavailable(f"--allow-escalation: the environment variable {ecfg.api_key_env} "
                                    "(replay.escalation.api_key_env in refinery.toml) is not set; export it "
                                    "with the endpoint's API key")
    return key


#: A chat reply is a few KB; more than this is not one (and would not fit a trace row).
MAX_REPLY_BYTES = 256 << 10


def _answer_text(message: dict[str, Any]) -> str:
    """The reply as one text, like a local answer: the content, then each tool call as a
    {"name", "arguments"} JSON line. Raises ValueError when it is not a chat message."""
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(calls, list) or not (content is None or isinstance(content, str)):
        raise ValueError("not a chat message")
    return answer_text({"response": content, "tool_calls": [tool_call(c) for c in calls]})


def escalate(ecfg: EscalationConfig, messages: list[dict[str, Any]], key: str | None) -> Escalated:
    """POST the messages to <base_url>/chat/completions (temperature 0); raises EscalationFailed.
    `timeout_s` bounds the whole exchange (checked between reads of the reply), not each read."""
    url = ecfg.base_url.rstrip("/") + "/chat/completions"
    body = orjson.dumps({"model": ecfg.model, "messages": messages, "temperature": 0,
                         "max_tokens": ecfg.max_tokens})
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    too_slow = f"{url} did not answer within {ecfg.timeout_s:g} s (replay.escalation.timeout_s)"
    t0 = time.monotonic()
    deadline = t0 + ecfg.timeout_s
    try:
        with urllib.request.urlopen(request, timeout=ecfg.timeout_s) as response:
            chunks, size = [], 0
            while chunk := response.read1(64 << 10):
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise EscalationFailed(f"{url} sent more than {MAX_REPLY_BYTES >> 10} KiB: not a chat reply")
                if time.monotonic() > deadline:
                    raise EscalationFailed(too_slow)
                chunks.append(chunk)
            raw = b"".join(chunks)
    except urllib.error.HTTPError as e:
        try:
            detail = e.read(300).decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            detail = ""
        raise EscalationFailed(f"{url} answered HTTP {e.code} {e.reason}"
                               + (f": {detail}" if detail else "")) from None
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        raise EscalationFailed(too_slow) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise EscalationFailed(too_slow) from None
        raise EscalationFailed(f"cannot reach {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # ValueError: http.client.InvalidURL and kin
        raise EscalationFailed(f"cannot reach {url}: {e}") from None
    latency = round((time.monotonic() - t0) * 1000, 1)
    try:
        doc = orjson.loads(raw)
        choice = doc["choices"][0]
        answer = _answer_text(choice["message"])
        model = doc.get("model") or ecfg.model
        if not isinstance(model, str):
            raise ValueError("model is not a string")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):  # orjson's error is a ValueError
        raise EscalationFailed(f"{url} did not return a chat-completions reply "
                               f"(got {raw[:120].decode('utf-8', 'replace')!r})") from None
    finish = choice.get("finish_reason")
    return Escalated(answer, model, finish if isinstance(finish, str) else None, latency)
