"""Replay without a model: retrieval (golden), prompt assembly (golden), answer checks, the trace
row and its round trip through run-all, escalation against a local OpenAI-compatible server,
replay-eval with a scripted generator, and the CLI's usage errors."""

from __future__ import annotations

import os
import shutil
import socket
import time

import jsonschema
import orjson
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, evidence_rows, quarantine_rows, read_jsonl_file, sample_workspace
from refinery.answers import check_answer
from refinery.canonical import sig_hash
from refinery.cli import app
from refinery.config import load_config
from refinery.generation import Generation
from refinery.replay.model import OfflineModel
from refinery.replay.prompt import SYSTEM, build_messages
from refinery.replay.retrieval import RagIndex, RetrievalError
from refinery.replay.session import REPLAY_LOG, ReplayUsageError, replay
from refinery.schemas import load_schema
from refinery.workspace import Workspace

pytest.importorskip("bm25s")
runner = CliRunner()
RETRIEVAL = FIXTURES / "retrieval"
IDX = "distill_out/rag-index"
MODEL = OfflineModel("distill_out/tiny-base")
Q_TICKETS = "How many tickets were opened in September 2026?"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def golden(name: str, data: bytes) -> None:
    path = RETRIEVAL / name
    if os.environ.get("REFINERY_UPDATE_GOLDEN") == "1":
        path.write_bytes(data)
    assert path.exists(), f"no golden file {path}: run with REFINERY_UPDATE_GOLDEN=1"
    assert data.decode() == path.read_text(encoding="utf-8")


@pytest.fixture
def rag(ws: Workspace) -> Workspace:
    """A workspace whose RAG export is the hand-made fixture (8 playbooks)."""
    dest = ws.root / "exports" / "rag"
    dest.mkdir(parents=True)
    shutil.copy(RETRIEVAL / "playbooks.jsonl", dest / "playbooks.jsonl")
    return ws


def scripted(*answers: str, finish: str = "stop"):
    """A generator that answers from a script and keeps the messages it was given."""
    script = iter(answers)

    def generate(messages, max_tokens):
        generate.calls.append(messages)
        return Generation(next(script), finish, 3)

    generate.calls = []
    return generate


# --- retrieval ------------------------------------------------------------------------------


def search_all(index: RagIndex) -> dict[str, list]:
    queries = orjson.loads((RETRIEVAL / "queries.json").read_bytes())
    return {q: [[h.id, h.line, h.score] for h in index.search(q, 3)] for q in queries}


def test_retrieval_is_golden_deterministic_and_breaks_ties_by_line(rag):
    index = RagIndex.open(rag, IDX)
    assert index.built and index.rows == 8
    result = search_all(index)
    golden("expected_retrieval.json", orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    assert result[Q_TICKETS][0][0] == "rag-0000000000000001"
    # lines 3 and 4 hold the same text under two ids: equal scores, the earlier line first
    tie = index.search("rotate the payments API key", 2)
    assert [h.line for h in tie] == [3, 4] and tie[0].score == tie[1].score
    assert index.search("zebra quokka", 3) == []  # no shared term: nothing, rather than noise
    assert index.search(Q_TICKETS, 3)[0].row["prompt"] == Q_TICKETS  # rows come back whole

    reused = RagIndex.open(rag, IDX)
    assert not reused.built and search_all(reused) == result
    elsewhere = RagIndex.open(rag, "other-index")  # a second build: the same ranking and scores
    assert elsewhere.built and search_all(elsewhere) == result


def test_the_index_is_rebuilt_when_the_export_changes_or_is_damaged(rag):
    first = RagIndex.open(rag, IDX)
    export = rag.root / "exports" / "rag" / "playbooks.jsonl"
    export.write_bytes(b"".join(export.read_bytes().splitlines(keepends=True)[:3]))
    second = RagIndex.open(rag, IDX)
    assert second.built and second.rows == 3 and second.export_sha256 != first.export_sha256
    # the two key-rotation playbooks are gone; only "checkout-api" still shares a term ("api")
    assert [h.line for h in second.search("rotate the payments API key", 3)] == [2]
    assert not RagIndex.open(rag, IDX).built
    (rag.root / IDX / "manifest.json").write_text("{damaged")
    assert RagIndex.open(rag, IDX).built
    assert sorted(p.name for p in (rag.root / IDX).parent.iterdir()) == [".rag-index.lock", "rag-index"]
    export.unlink()
    with pytest.raises(RetrievalError, match="run `refinery run-all` first"):
        RagIndex.open(rag, IDX)


def _open_and_search(root: str) -> list:
    index = RagIndex.open(Workspace.at(root), IDX)
    return [[h.id, h.score] for h in index.search(Q_TICKETS, 3)]


def test_concurrent_replays_share_one_index_build(rag):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.map(_open_and_search, [str(rag.root)] * 12)
    assert all(r == results[0] for r in results) and results[0]
    assert not RagIndex.open(rag, IDX).built  # one of them built it; the others loaded it


def test_an_export_republished_under_an_open_index_is_noticed(rag):
    index = RagIndex.open(rag, IDX)
    export = rag.root / "exports" / "rag" / "playbooks.jsonl"
    export.write_bytes(b"".join(reversed(export.read_bytes().splitlines(keepends=True))))  # same size, new order
    with pytest.raises(RetrievalError, match="changed while this replay read it"):
        index.search(Q_TICKETS, 3)


def test_words_of_any_script_are_tokens():
    from refinery.replay.retrieval import tokens

    assert tokens("INV-4471 was charged TWICE") == ["inv", "4471", "charged", "twice"]
    assert tokens("café naïve Сколько заказов Straße") == ["café", "naïve", "сколько", "заказов", "strasse"]


def test_excluded_lines_are_never_retrieved(rag):
    index = RagIndex.open(rag, IDX)
    assert index.search(Q_TICKETS, 1)[0].line == 0
    assert 0 not in [h.line for h in index.search(Q_TICKETS, 8, exclude={0})]


# --- prompt ---------------------------------------------------------------------------------


def test_prompt_assembly_is_golden(rag):
    hits = RagIndex.open(rag, IDX).search("summarise the checkout incident", 2)
    msgs = build_messages("Summarise the checkout incident of 3 November.", [h.row for h in hits], max_chars=300)
    golden("expected_prompt.json", orjson.dumps(msgs, option=orjson.OPT_INDENT_2) + b"\n")
    user = msgs[1]["content"]
    assert all(f"Playbook [{h.id}]" in user for h in hits)
    quoted = [line for line in user.split("\n\nTask: ")[0].splitlines() if not line.startswith("Playbook [")]
    assert quoted and all(line.startswith("> ") for line in quoted if line)
    assert "[…]" in user  # the long incident playbook is cut at max_chars
    assert build_messages("t", [], max_chars=300) == [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": "t"}]


# --- answer checks --------------------------------------------------------------------------


@pytest.mark.parametrize("text, finish, expected", [
    ("", "stop", "empty"),
    ("  \n", None, "empty"),
    ('{"tool": "run_sql", "args": {}}', "stop", "malformed_tool_call"),
    ('{"name": "run_sql", "arguments": {"q"', "stop", "malformed_tool_call"),
    ("I'm sorry, but I can't help with that.", "stop", "refusal"),
    ("As an AI model I cannot do this.", "stop", "refusal"),
    ("x" * 101, "stop", "over_length_cap"),
    ("Raise the limit", "length", "over_length_cap"),
    ('{"name": "run_sql", "arguments": {"query": "SELECT 1"}}', "stop", None),
    ("It is OOMKilled; raise the memory limit to 512Mi.", "stop", None),
    ("Sorry for the wait: the refund is on its way.", "stop", None),
    ("I’m sorry, but I can’t help with that.", "stop", "refusal"),  # curly apostrophes
    ("I apologize, but I cannot assist with that.", "stop", "refusal"),
    # what the prompt asks for is not malformed: citations, a call with a citation, parallel calls
    ("[rag-7e2890ec0aa75b4d] Use a half-open date range: 1,319 tickets.", "stop", None),
    ('{"name": "run_sql", "arguments": {"q": 1}} [rag-0000000000000001]', "stop", None),
    ('{"name": "lookup", "arguments": {}}\n{"name": "refund", "arguments": {"amount": 49}}', "stop", None),
    ('Set {"limit": 512} in the deployment.', "stop", None),  # JSON, but not a call
    ('Calling {"name": "run_sql", "arguments": {"q"', "stop", "malformed_tool_call"),
])
def test_answer_checks(text, finish, expected):
    assert check_answer(text, max_chars=100, finish_reason=finish) == expected


def test_tool_calls_are_read_in_every_shape():
    from refinery.answers import parse_tool_calls

    openai = '{"id": "c1", "type": "function", "function": {"name": "run_sql", "arguments": "{\\"q\\": 1}"}}'
    assert parse_tool_calls(openai) == [{"name": "run_sql", "arguments": {"q": 1}}]  # string arguments read
    two = '{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"x": 2}}'
    assert parse_tool_calls(two) == [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 2}}]
    assert parse_tool_calls('[{"name": "a", "arguments": {}}]') == [{"name": "a", "arguments": {}}]
    assert parse_tool_calls("[rag-1] no call here") is None
    assert parse_tool_calls('{"tool": "run_sql", "args": {}}') == []


# --- the replay and its trace row -----------------------------------------------------------


def test_a_replay_appends_one_trace_row(rag, cfg):
    index = RagIndex.open(rag, IDX)
    gen = scripted("Use a half-open date range [rag-0000000000000001].")
    row = replay(rag, cfg, f"  {Q_TICKETS}\n", model=MODEL, generate=gen, index=index)
    assert row["task"] == Q_TICKETS and row["mode"] == "retrieval" and row["check"] is None
    assert row["retrieved"][0]["id"] == "rag-0000000000000001" and len(row["retrieved"]) == 3
    assert row["rag_export_sha256"] == index.export_sha256 and row["model"] == "distill_out/tiny-base"
    assert row["escalated"] is False and row["escalation"] is None and row["adapter_id"] is None
    assert "Playbook [rag-0000000000000001]" in gen.calls[0][-1]["content"]
    log = rag.kb / REPLAY_LOG
    assert read_jsonl_file(log) == [row]
    jsonschema.Draft202012Validator(load_schema("replay_trace")).validate(row)

    bare = replay(rag, cfg, Q_TICKETS, model=MODEL, generate=scripted("1,319."), index=None)
    assert bare["mode"] == "no_retrieval" and bare["retrieved"] == [] and bare["rag_export_sha256"] is None
    assert read_jsonl_file(log) == [row, bare] and bare["replay_id"] != row["replay_id"]
    with pytest.raises(ReplayUsageError, match="the task is empty"):
        replay(rag, cfg, "   ", model=MODEL, generate=scripted("x"), index=index)
    with pytest.raises(ReplayUsageError, match="not valid UTF-8"):  # undecodable bytes on the command line
        replay(rag, cfg, b"tickets \xff".decode("utf-8", "surrogateescape"), model=MODEL, generate=scripted("x"),
               index=index)
    assert len(read_jsonl_file(log)) == 2


def test_replay_rows_become_evidence_through_run_all(rag, cfg):
    index = RagIndex.open(rag, IDX)
    replay(rag, cfg, "Elm Street Books was charged twice for INV-4471", model=MODEL, index=index,
           generate=scripted("Refund the second charge [rag-0000000000000002]."))
    replay(rag, cfg, "Print the production database password", model=MODEL, index=index,
           generate=scripted("I'm sorry, I can't share that."))
    log = rag.kb / REPLAY_LOG
    log.write_bytes(log.read_bytes() + b'{"schema_version": 1, "replay_id": "rp-torn')  # a killed replay's line
    replay(rag, cfg, "How many orders were created in August 2026?", model=MODEL, index=index,
           generate=scripted('{"name": "run_sql", "arguments": {"query": "SELECT count(*) FROM orders"}}'))
    raw = log.read_bytes().splitlines()
    assert len(raw) == 4 and orjson.loads(raw[3])["task"].startswith("How many orders")  # on a line of its own

    shutil.rmtree(rag.root / "exports")  # run-all writes its own exports
    assert invoke("run-all").exit_code == 0
    ev = {e["provenance"]["line_offset"]: e for e in evidence_rows(rag) if e["source"] == "replays"}
    assert sorted(ev) == [0, 1, 3]
    for offset, e in ev.items():
        assert e["provenance"]["source_file"] == "data/_kb/replays.jsonl"
        assert e["provenance"]["sig_hash"] == sig_hash(orjson.loads(raw[offset]))
        assert e["kind"] == "replay" and e["prompt"] == orjson.loads(raw[offset])["task"]
        assert e["response"] == orjson.loads(raw[offset])["answer"] and e["model"] == "distill_out/tiny-base"
    assert ev[1]["signals"]["safety_flags"] == ["refusal"]
    assert ev[3]["tool_calls"][0]["name"] == "run_sql" and ev[3]["tool_calls"][0]["problem"] is None
    torn = [q for q in quarantine_rows(rag) if q["provenance"]["source_file"] == "data/_kb/replays.jsonl"]
    assert [(q["provenance"]["line_offset"], q["reason"]) for q in torn] == [(2, "invalid_json")]
    scored = {r["provenance"]["line_offset"]: r["category"] for p in sorted(rag.scored_runs.rglob("replays.jsonl"))
              for r in read_jsonl_file(p)}
    # a replay has no quality signal of its own: a human reviews it; a refusal is rejected
    assert [scored[i] for i in range(3)] == ["needs_human_review", "rejected", "needs_human_review"]


# --- escalation -----------------------------------------------------------------------------


def with_endpoint(ws: Workspace, base_url: str, *, timeout: float = 5.0, key_env: str | None = "REFINERY_TEST_KEY"):
    env_line = f'api_key_env = "{key_env}"\n' if key_env else ""
    (ws.root / "refinery.toml").write_text(f'[replay.escalation]\nbase_url = "{base_url}"\nmodel = "big-model"\n'
                                           f"{env_line}timeout_s = {timeout}\n")
    return load_config(ws.root)


KEY = {"REFINERY_TEST_KEY": "sk-test-0123456789abcdef"}


def test_a_failed_local_answer_is_escalated(rag, endpoint):
    cfg = with_endpoint(rag, endpoint.url + "/ok/v1")
    index = RagIndex.open(rag, IDX)
    row = replay(rag, cfg, "Elm Street Books was charged twice", model=MODEL, generate=scripted(""), index=index,
                 allow_escalation=True, env=KEY)
    assert row["local_check"] == "empty" and row["escalated"] is True and row["check"] is None
    assert row["answer"] == "Refund the second $49.00 charge and send the reference."
    assert row["escalation"]["ok"] and row["escalation"]["model"] == "big-model-2026"
    assert row["latency_ms"] >= row["escalation"]["latency_ms"]
    req = endpoint.requests[-1]
    assert req["path"] == "/ok/v1/chat/completions" and req["auth"] == "Bearer sk-test-0123456789abcdef"
    assert req["body"]["model"] == "big-model" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][-1]["content"].endswith("Task: Elm Street Books was charged twice")
    assert b"sk-test" not in (rag.kb / REPLAY_LOG).read_bytes()  # the key is never written

    before = len(endpoint.requests)
    ok = replay(rag, cfg, "Elm Street Books was charged twice", model=MODEL, generate=scripted("Refund it."),
                index=index, allow_escalation=True, env=KEY)
    assert ok["escalated"] is False and ok["escalation"] is None and len(endpoint.requests) == before


@pytest.mark.parametrize("path, answer", [
    ("/tools/v1", '{"name":"lookup_invoice","arguments":{"id":"INV-1"}}\n{"name":"refund","arguments":{"amount":49}}'),
    ("/parts/v1", "Refund the second charge."),
])
def test_escalated_replies_in_other_shapes_are_served(rag, endpoint, path, answer):
    cfg = with_endpoint(rag, endpoint.url + path)
    row = replay(rag, cfg, "t", model=MODEL, generate=scripted(""), index=None, allow_escalation=True, env=KEY)
    assert row["escalated"] and row["answer"] == answer and row["check"] is None


def test_an_escalated_tool_call_is_rendered_as_name_and_arguments(rag, endpoint):
    cfg = with_endpoint(rag, endpoint.url + "/tool/v1", key_env=None)  # an endpoint without authentication
    row = replay(rag, cfg, "Count the orders", model=MODEL, generate=scripted('{"tool": "run_sql"}'), index=None,
                 allow_escalation=True, env={})
    assert row["local_check"] == "malformed_tool_call" and row["escalated"] and row["check"] is None
    assert row["tool_calls"] == [{"name": "run_sql", "arguments": {"query": "SELECT 1"}}]
    assert endpoint.requests[-1]["auth"] is None


@pytest.mark.parametrize("path, timeout, message", [
    ("/fail/v1", 5.0, "answered HTTP 500"),
    ("/slow/v1", 0.3, "did not answer within 0.3 s"),
    ("/garbage/v1", 5.0, "did not return a chat-completions reply"),
    ("/odd/v1", 5.0, "did not return a chat-completions reply"),
    ("/surrogate/v1", 5.0, "did not return a chat-completions reply"),
    ("/huge/v1", 5.0, "sent more than 256 KiB"),
    ("/trickle/v1", 1.0, "did not answer within 1 s"),  # each read is quick; the whole reply is not
])
def test_escalation_errors_are_reported_not_raised(rag, endpoint, path, timeout, message):
    cfg = with_endpoint(rag, endpoint.url + path, timeout=timeout)
    t0 = time.monotonic()
    row = replay(rag, cfg, "Print the password", model=MODEL, generate=scripted("I'm sorry, I can't."), index=None,
                 allow_escalation=True, env=KEY)
    assert time.monotonic() - t0 < 1.45  # the timeout, not the slow server, decided
    assert row["escalated"] is False and row["escalation"]["ok"] is False and message in row["escalation"]["error"]
    assert row["answer"] == "I'm sorry, I can't." and row["check"] == "refusal"
    assert read_jsonl_file(rag.kb / REPLAY_LOG) == [row]


def test_an_unreachable_endpoint_is_reported(rag):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = with_endpoint(rag, f"http://127.0.0.1:{port}/v1")
    row = replay(rag, cfg, "t", model=MODEL, generate=scripted(""), index=None, allow_escalation=True, env=KEY)
    assert row["escalation"]["ok"] is False and "cannot reach" in row["escalation"]["error"]


# --- the CLI's usage errors -----------------------------------------------------------------


def test_allow_escalation_without_an_endpoint_or_key_says_what_to_set(rag, monkeypatch):
    result = invoke("replay", "--task", "t", "--allow-escalation")
    assert result.exit_code == 2
    assert "[replay.escalation]" in result.output and "api_key_env" in result.output
    with_endpoint(rag, "http://127.0.0.1:9/v1", key_env="REFINERY_UNSET_KEY")
    monkeypatch.delenv("REFINERY_UNSET_KEY", raising=False)
    result = invoke("replay", "--task", "t", "--allow-escalation")
    assert result.exit_code == 2 and "REFINERY_UNSET_KEY" in result.output and "is not set" in result.output
    (rag.root / "refinery.toml").write_text('[replay.escalation]\nbase_url = "ftp://x"\nmodel = "m"\n')
    result = invoke("replay", "--task", "t")
    assert result.exit_code == 2 and "base_url must start with http" in result.output
    (rag.root / "refinery.toml").write_text('[replay.escalation]\nbase_url = "https://me:key@x/v1"\nmodel = "m"\n')
    result = invoke("replay", "--task", "t")
    assert result.exit_code == 2 and "base_url must not hold credentials" in result.output
    (rag.root / "refinery.toml").write_text("[replay]\ntop_kk = 3\n")
    result = invoke("replay", "--task", "t")
    assert result.exit_code == 2 and "unknown key 'replay.top_kk'" in result.output


def test_replay_without_a_model_or_a_task_says_what_to_do(rag):
    result = invoke("replay", "--task", "t")
    assert result.exit_code == 2 and "refinery train tiny-model" in result.output
    result = invoke("replay", "--task", "  ")
    assert result.exit_code == 2 and "the task is empty" in result.output
    assert not (rag.kb / REPLAY_LOG).exists()


# --- replay-eval ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The bundled sample run, and its SFT export collected (test split: 24 rows)."""
    return sample_workspace(tmp_path_factory.mktemp("replay"), "run-all", "train collect")


def copy_first_playbook(messages, max_tokens):
    """A model that answers with the first quoted playbook's answer (or tool call), else gives up."""
    lines = messages[-1]["content"].splitlines()
    for prefix in ("> Answer: ", "> Tool call: "):
        hit = next((line for line in lines if line.startswith(prefix)), None)
        if hit and "Playbook [" in messages[-1]["content"]:
            return Generation(hit.removeprefix(prefix), "stop", 10)
    return Generation("No idea.", "stop", 2)


def test_replay_eval_compares_retrieval_with_none(sample):
    from refinery.replay.evaluate import eval_tasks, replay_eval
    from refinery.training.config import load_distill_config

    ws, cfg, dcfg = Workspace.at(sample), load_config(sample), load_distill_config(sample)
    index = RagIndex.open(ws, IDX)
    report = replay_eval(ws, cfg, dcfg, generate=copy_first_playbook, index=index, model_label="scripted")
    tasks = eval_tasks(ws, dcfg, None)
    r, n = report["modes"]["retrieval"], report["modes"]["no_retrieval"]
    assert report["tasks"] == len(tasks) == 22 and r["rows"] == n["rows"] == 22
    assert n["grounding"] == 0.0 and r["grounding"] > 0.8  # copying a retrieved playbook is grounded
    assert r["answer_match"] > n["answer_match"] and 0 < r["format_valid"] <= 1
    assert set(r["latency_ms"]) == {"mean", "p50", "p95"}
    out = sample / "distill_out" / "replay-eval"
    rows = read_jsonl_file(out / "rows.jsonl")
    assert len(rows) == 44 and orjson.loads((out / "report.json").read_bytes()) == report
    assert "| retrieval | 22 |" in (out / "report.md").read_text()
    assert not (sample / "data" / "_kb" / REPLAY_LOG).exists()  # an evaluation, not traces

    # a task's own row, and other runs of the same task, are in the RAG export too: never retrieved for it
    rag = {x["id"]: x for x in read_jsonl_file(sample / "exports" / "rag" / "playbooks.jsonl")}
    by_row = {t["row"]: t for t in tasks}
    for row in rows:
        t = by_row[row["row"]]
        for p in row["playbooks"]:
            assert rag[p["id"]]["task_key"] != t["task_key"]
            assert rag[p["id"]]["provenance"]["line_offset"] != t["provenance"]["line_offset"] or \
                rag[p["id"]]["provenance"]["source_file"] != t["provenance"]["source_file"]
    same_task = sum(any(h.row["task_key"] == t["task_key"] for h in index.search(t["task"], cfg.replay.top_k))
                    for t in tasks)
    assert same_task == len(tasks)  # without the exclusion every task would get its own answer back

    limited = replay_eval(ws, cfg, dcfg, generate=copy_first_playbook, index=index, model_label="s", limit=5)
    assert limited["tasks"] == 5 and len(read_jsonl_file(out / "rows.jsonl")) == 10
