"""Training-format adapters over the SFT and preference exports."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from conftest import read_jsonl_file
from refinery.cli import app
from refinery.formats import FormatError, call_id, convert, tool_schemas

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
    # the call first, then the answer built on its result: the order a model must learn to write them in
    assert tools["messages"][-1]["content"] == '{"name":"run_sql","arguments":{"query":"SELECT 1","limit":5}}\n1,312.'


def test_mlx_tools_keeps_the_conversation_and_declares_the_tools(sft, tmp_path):
    direct, tools = run(sft, tmp_path, "mlx-tools")
    call = tools["messages"][2]["tool_calls"][0]
    cid = call_id("c1", "")
    assert call == {"id": cid, "type": "function", "function": {"name": "run_sql",
                                                                "arguments": {"query": "SELECT 1", "limit": 5}}}
    assert tools["messages"][3] == {"role": "tool", "content": "[1312]", "tool_call_id": cid, "name": "run_sql"}
    assert tools["tools"] == [{"type": "function", "function": {
        "name": "run_sql", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query", "limit"]}}}]
    assert direct["tools"] == []


def test_openai_uses_string_arguments_and_no_name_on_tool_messages(sft, tmp_path):
    direct, tools = run(sft, tmp_path, "openai")
    assert direct["tools"] == []  # on every row: datasets needs the same keys everywhere
    args = tools["messages"][2]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(args, str) and orjson.loads(args) == CALL["arguments"]
    tool_msg = tools["messages"][3]
    assert tool_msg == {"role": "tool", "content": "[1312]", "tool_call_id": call_id("c1", "")}


def test_tool_call_ids_are_nine_letters_or_digits_and_stay_paired():
    assert call_id("abcDEF123", "") == "abcDEF123"  # already acceptable: kept
    ids = {call_id(x, "") for x in ("call_0000002_0", "call_0000002_1", "toolu_01A", "c1")}
    assert len(ids) == 4 and all(len(i) == 9 and i.isascii() and i.isalnum() for i in ids)
    assert call_id("call_0000002_0", "") == call_id("call_0000002_0", "other")  # same call, same id
    assert call_id(None, "sft-1\x1f0") != call_id(None, "sft-1\x1f1")  # no id: from the row and position


def test_inferred_tool_schemas_name_every_parameter_and_the_required_ones():
    calls = [{"name": "read", "arguments": {"path": "a", "lines": None}},
             {"name": "read", "arguments": {"path": "c", "lines": 3}},
             {"name": None, "arguments": {}},  # a malformed call declares nothing
             {"name": "read", "arguments": {"path": "b", "follow": True}},
             {"name": "run_sql", "arguments": {"query": "SELECT 1"}}]
    read, sql = tool_schemas(calls)
    assert read["function"]["name"] == "read" and "description" not in read["function"]
    assert read["function"]["parameters"] == {"type": "object", "required": ["path"], "properties": {
        "path": {"type": "string"}, "lines": {"type": "integer"}, "follow": {"type": "boolean"}}}
    assert sql["function"]["parameters"]["required"] == ["query"]


def test_completions_and_alpaca(sft, tmp_path):
    assert run(sft, tmp_path, "mlx-completions")[0] == {"prompt": "How many orders?", "completion": "1,312."}
    assert run(sft, tmp_path, "mlx-completions")[1]["completion"].startswith('{"name":"run_sql"')
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


BAD = {"id": None, "name": "run_sql", "arguments": {"q": 1}, "problem": "tool_key_instead_of_name"}
PAIR = {"schema_version": 2, "id": "pp-1", "task_key": "tk-1", "prompt": "How many orders?",
        "system": "You are an agent.", "chosen": "...", "rejected": "...", "chosen_id": "ev-a", "rejected_id": "ev-b",
        "chosen_reply": TOOLS["messages"][2:],  # the call, its result, the answer
        "rejected_reply": [{"role": "assistant", "content": None, "name": None, "tool_calls": [BAD],
                            "tool_call_id": None}]}


def test_conversational_preference_formats(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(orjson.dumps(PAIR) + b"\n")
    [trl] = run(pairs, tmp_path, "trl-chat")
    assert trl["prompt"] == [{"role": "system", "content": "You are an agent."},
                             {"role": "user", "content": "How many orders?"}]
    cid = call_id("c1", "")
    assert trl["chosen"] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": "run_sql", "arguments": CALL["arguments"]}}]},
        {"role": "tool", "content": "[1312]", "tool_call_id": cid, "name": "run_sql"},
        {"role": "assistant", "content": "1,312."}]
    # a call made with "tool" instead of "name" cannot be a structured call: it stays as the text it was
    assert trl["rejected"] == [{"role": "assistant", "content": PAIR["rejected"]}]  # its flattened text
    assert [t["function"]["name"] for t in trl["tools"]] == ["run_sql"]
    [dpo] = run(pairs, tmp_path, "openai-dpo")  # text outputs only: each side flattened
    assert dpo == {"input": {"messages": trl["prompt"]},
                   "preferred_output": [{"role": "assistant", "content": "..."}],
                   "non_preferred_output": [{"role": "assistant", "content": "..."}]}
    old = tmp_path / "v1.jsonl"
    old.write_bytes(orjson.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + b"\n")
    with pytest.raises(FormatError, match="run-all"):
        convert(old, tmp_path / "x.jsonl", "trl-chat")
    assert run(old, tmp_path, "openai-dpo")[0]["preferred_output"][0]["content"] == "good"


def test_cli(ws):
    runner = CliRunner()
    assert runner.invoke(app, ["convert", "--to", "nope"]).exit_code == 2
    result = runner.invoke(app, ["convert", "--to", "mlx-chat"])
    assert result.exit_code == 2 and "export-all" in result.output
