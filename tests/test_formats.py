"""Training-format adapters over the SFT and preference exports."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from conftest import read_jsonl_file
from refinery.cli import app
from refinery.formats import FormatError, convert

PROV = {"source_file": "data/scored-runs/x.jsonl", "line_offset": 0, "sig_hash": "0" * 64, "recorded_at": None}
DIRECT = {"schema_version": 1, "id": "sft-1", "instruction": "How many orders?", "input": "", "messages": None,
          "response": "1,312.", "tool_calls": [], "quality_score": "accepted", "score": 0.9, "source": "eval",
          "provenance": PROV}
CALL = {"id": "c1", "name": "run_sql", "arguments": {"query": "SELECT 1", "limit": 5}, "problem": None}
TOOLS = {**DIRECT, "id": "sft-2", "messages": [
    {"role": "system", "content": "You are an agent.", "name": None, "tool_calls": None, "tool_call_id": None},
    {"role": "user", "content": "How many orders?", "name": None, "tool_calls": None, "tool_call_id": None},
    {"role": "assistant", "content": None, "name": None, "tool_calls": [CALL], "tool_call_id": None},
    {"role": "tool", "content": "[1312]", "name": "run_sql", "tool_calls": None, "tool_call_id": "c1"},
    {"role": "assistant", "content": "1,312.", "name": None, "tool_calls": None, "tool_call_id": None}],
    "tool_calls": [CALL]}


@pytest.fixture
def sft(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (DIRECT, TOOLS)))
    return p


def run(src, tmp_path, fmt):
    out = tmp_path / f"{fmt}.jsonl"
    assert convert(src, out, fmt) == len(src.read_bytes().splitlines())
    return read_jsonl_file(out)


def test_mlx_chat(sft, tmp_path):
    direct, tools = run(sft, tmp_path, "mlx-chat")
    assert direct == {"messages": [{"role": "user", "content": "How many orders?"},
                                   {"role": "assistant", "content": "1,312."}]}
    assert tools["messages"][0] == {"role": "system", "content": "You are an agent."}
    assert tools["messages"][-1]["content"].endswith('{"name":"run_sql","arguments":{"query":"SELECT 1","limit":5}}')


def test_mlx_tools_keeps_the_conversation_and_declares_the_tools(sft, tmp_path):
    _, tools = run(sft, tmp_path, "mlx-tools")
    call = tools["messages"][2]["tool_calls"][0]
    assert call == {"id": "c1", "type": "function", "function": {"name": "run_sql",
                                                                 "arguments": {"query": "SELECT 1", "limit": 5}}}
    assert tools["messages"][3] == {"role": "tool", "content": "[1312]", "tool_call_id": "c1", "name": "run_sql"}
    assert tools["tools"] == [{"type": "function", "function": {
        "name": "run_sql", "description": "the run_sql tool",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}}}]


def test_openai_uses_string_arguments(sft, tmp_path):
    direct, tools = run(sft, tmp_path, "openai")
    assert "tools" not in direct
    args = tools["messages"][2]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(args, str) and orjson.loads(args) == CALL["arguments"]


def test_completions_and_alpaca(sft, tmp_path):
    assert run(sft, tmp_path, "mlx-completions")[0] == {"prompt": "How many orders?", "completion": "1,312."}
    alpaca = run(sft, tmp_path, "alpaca")[0]
    assert alpaca["instruction"] == "How many orders?" and alpaca["output"] == "1,312."
    assert alpaca["meta"]["provenance"] == PROV and alpaca["meta"]["quality_score"] == "accepted"


def test_trl_and_wrong_input(sft, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(orjson.dumps({"prompt": "p", "chosen": "good", "rejected": "bad", "id": "pp-1"}) + b"\n")
    assert run(pairs, tmp_path, "trl") == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    with pytest.raises(FormatError, match="not a preference pair"):
        convert(sft, tmp_path / "x.jsonl", "trl")
    with pytest.raises(FormatError, match="not an SFT row"):
        convert(pairs, tmp_path / "x.jsonl", "alpaca")
    assert not (tmp_path / "x.jsonl").exists()  # nothing half-written


def test_cli(ws):
    runner = CliRunner()
    assert runner.invoke(app, ["convert", "--to", "nope"]).exit_code == 2
    result = runner.invoke(app, ["convert", "--to", "mlx-chat"])
    assert result.exit_code == 2 and "export-all" in result.output
