"""Escalation: a task the local model failed goes to an OpenAI-compatible chat-completions
endpoint, configured in refinery.toml under [replay.escalation]. The API key is read from the
environment variable named there (`api_key_env`) at call time; it is never written anywhere.

Standard library HTTP only (one POST, JSON in and out): nothing to install for it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refinery.config import EscalationConfig


class EscalationUnavailable(Exception):
    """--allow-escalation cannot work as configured (bad usage: exit 2); the message says what to set."""


class EscalationFailed(Exception):
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


def _answer_text(message: dict[str, Any]) -> str:
    """The reply as one text; tool calls rendered as {"name", "arguments"} JSON, like local answers."""
    calls = message.get("tool_calls") or []
    rendered = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        rendered.append(json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False))
    content = message.get("content") or ""
    return "\n".join(filter(None, [content, *rendered]))


def escalate(ecfg: EscalationConfig, messages: list[dict[str, Any]], key: str | None) -> Escalated:
    """POST the messages to <base_url>/chat/completions (temperature 0); raises EscalationFailed."""
    url = ecfg.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": ecfg.model, "messages": messages, "temperature": 0,
                       "max_tokens": ecfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    too_slow = f"{url} did not answer within {ecfg.timeout_s:g} s (replay.escalation.timeout_s)"
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=ecfg.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read(300).decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            detail = ""
        raise EscalationFailed(f"{url} answered HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")) from None
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        raise EscalationFailed(too_slow) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise EscalationFailed(too_slow) from None
        raise EscalationFailed(f"cannot reach {url}: {e.reason}") from None
    except OSError as e:
        raise EscalationFailed(f"cannot reach {url}: {e}") from None
    latency = round((time.monotonic() - t0) * 1000, 1)
    try:
        doc = json.loads(raw)
        choice = doc["choices"][0]
        answer = _answer_text(choice["message"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise EscalationFailed(f"{url} did not return a chat-completions reply "
                               f"(got {raw[:120].decode('utf-8', 'replace')!r})") from None
    return Escalated(answer, str(doc.get("model") or ecfg.model), choice.get("finish_reason"), latency)
