"""An OpenAI-compatible chat-completions server on 127.0.0.1 for escalation tests. The first
path segment picks its behaviour:

    ok        a text answer              tool      one tool call (arguments as a JSON string)
    tools     two tool calls             parts     content as a list of text parts
    fail      HTTP 500                   slow      answers after 1.5 s
    trickle   sends a byte every 0.4 s   huge      a 1 MB answer
    garbage   not JSON                   odd       tool_calls is a string
    surrogate a lone surrogate escape (U+D800) in the content
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        kind = self.path.split("/")[1]
        if kind == "fail":
            return self._send(500, b'{"error": {"message": "boom"}}')
        if kind == "slow":
            time.sleep(1.5)
        if kind == "garbage":
            return self._send(200, b"<html>not json</html>")
        if kind == "surrogate":  # a lone surrogate: JSON-legal text that is not valid Unicode
            return self._send(200, b'{"choices": [{"message": {"role": "assistant", "content": "\\ud800"}}]}')
        if kind == "trickle":
            return self._trickle()
        message = {"role": "assistant", "content": "Refund the second $49.00 charge and send the reference."}
        if kind == "huge":
            message["content"] = "x" * 1_000_000
        if kind == "parts":
            message["content"] = [{"type": "text", "text": "Refund the second "}, {"type": "text", "text": "charge."}]
        if kind == "odd":
            message["tool_calls"] = "oops"
        if kind == "tools":
            fns = [{"name": "lookup_invoice", "arguments": '{"id": "INV-1"}'},
                   {"name": "refund", "arguments": '{"amount": 49}'}]
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": f"c{i}", "type": "function", "function": f} for i, f in enumerate(fns)]}
        if kind == "tool":
            call = {"name": "run_sql", "arguments": '{"query": "SELECT 1"}'}  # arguments as a JSON string
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "c1", "type": "function", "function": call}]}
        self._send(200, json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": "big-model-2026",
                                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.4)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    """A running stub server; `endpoint.url` is its base, `endpoint.requests` what it received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.requests = []
    # shutdown() waits for serve_forever's next poll: 0.05 s, not the default 0.5 s per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
