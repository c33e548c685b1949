"""The LangSmith importer: runs (create/update wire records, run exports) and feedback, joined by trace.

Real files: tests/fixtures/real/langsmith/ (see its ORIGIN.md) — two `{post, patch}` wire records
from langsmith-py's own tests (one wrap_openai run each, create + update of the same id), and a
capture of what the official SDK sends: one `POST /runs/batch` body (a chain with an llm run, a
tool run and a tool run that raised) and two `POST /feedback` bodies on the chain (no trace_id).
The golden fixture tests/fixtures/langsmith/ covers the other shapes and defects: a LangChain
tool-calling agent (serialised messages, LLMResult generations), an error, epoch-ms times, an
Anthropic Message cut by max_tokens, a trace with no llm run, a run export (JSON array with
feedback_stats), a LangChain completion model with two generations, a cut line, an update with
no create, feedback on a child run, on a missing trace, with a bad score, with no run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import (
    FIXTURES, evidence_rows, fixture_inputs, foreign_inputs, materialize_files, probe_file, quarantine_rows,
    scored_rows, write_kb,
)
from refinery import score
from refinery.materialize import claims_for
from refinery.models import EvidenceRecord
from refinery.trace import trace
from transforms import langsmith

REAL = FIXTURES / "real" / "langsmith"
WRAP = REAL / "langsmith_py_wrap_openai_.json"
WRAP_REASONING = REAL / "langsmith_py_wrap_openai_reasoning.json"
SDK_RUNS = REAL / "langsmith_sdk_runs_batch_capture.jsonl"
SDK_FEEDBACK = REAL / "langsmith_sdk_feedback_capture.jsonl"
REAL_FILES = (WRAP, WRAP_REASONING, SDK_RUNS, SDK_FEEDBACK)
GOLDEN = FIXTURES / "langsmith"
GOLDEN_INPUTS = ("langsmith_runs_batch.jsonl", "langsmith_feedback.jsonl", "langsmith_runs_export.json")

WEATHER_TRACE = "c0afb7a6-2d47-487c-9fe7-6bd993bbfb89"
WEATHER_LLM = "01a22942-7335-7cf0-8dc9-b88059921716"
# the golden fixture's traces
T1, L1, TOOL, L2 = ("3f2c1a9e-5b7d-4e21-9c0a-7d5e8b1f2a63", "01a2f0c1-1c2d-7a10-8e4b-2f6a1c9d3e01",
                    "01a2f0c1-1f90-7b22-9d3c-5e7b2a8c4f02", "01a2f0c1-2215-7c31-a4e6-8d9f3b1c5a03")
T2, T3, T4 = ("7c4e9d20-8a31-4f5b-b6c2-1e9a7f3d0b44", "a1b2c3d4-0e1f-4a5b-8c7d-9e0f1a2b3c4d",
              "c9d8e7f6-5a4b-4c3d-8e2f-1a0b9c8d7e6f")
T6, T7 = "4b5c6d7e-8f90-4a1b-9c2d-3e4f5a6b7c8d", "8e9f0a1b-2c3d-4e5f-a6b7-c8d9e0f1a2b3"


_probe, _inputs = probe_file, fixture_inputs


def _run(ws, cfg, *paths):
    return materialize_files(ws, cfg, *paths)


def _counts(files):
    return {n: (f.rows_in, f.evidence, f.joined, f.quarantined, f.by_reason) for n, f in files.items()}


def _by_task(ws):
    """Evidence by (run id, part)."""
    return {(r["task_id"], r["provenance"].get("part")): r for r in evidence_rows(ws)}


def _scored(ws):
    return {r["id"]: r for r in scored_rows(ws)}


def _scores(ev):
    return {s["name"]: (s["value"], s["normalized"], s["by"], s["used"]) for s in ev["signals"]["scores"]}


def _joined(ev):
    return [(j["source_file"].removeprefix("data/_kb/"), j.get("record") or j["line_offset"])
            for j in ev["provenance"].get("joined", [])]


def _details(ws):
    return {(q["provenance"]["source_file"].removeprefix("data/_kb/"), q["provenance"].get("record")
             or q["provenance"]["line_offset"]): (q["reason"], q["detail"]) for q in quarantine_rows(ws)}


# --- detection --------------------------------------------------------------------------------


def test_detects_the_real_files_and_every_golden_shape():
    batch = "documents are LangSmith run batches"
    assert batch in langsmith.detect(_probe(WRAP))
    assert batch in langsmith.detect(_probe(WRAP_REASONING))
    assert batch in langsmith.detect(_probe(SDK_RUNS))
    assert "records are LangSmith feedback" in langsmith.detect(_probe(SDK_FEEDBACK))
    assert batch in langsmith.detect(_probe(GOLDEN / "langsmith_runs_batch.jsonl"))
    assert "records are LangSmith feedback" in langsmith.detect(_probe(GOLDEN / "langsmith_feedback.jsonl"))
    assert "records are LangSmith runs" in langsmith.detect(_probe(GOLDEN / "langsmith_runs_export.json"))


def test_claims_nothing_else():
    others = foreign_inputs("langsmith", "langsmith_runs.jsonl")
    assert len(others) > 40
    assert [p.name for p in others if langsmith.detect(_probe(p))] == []


def test_every_file_is_claimed_by_langsmith_alone(ws, cfg):
    for p in (*REAL_FILES, *(GOLDEN / n for n in GOLDEN_INPUTS)):
        shutil.copy(p, ws.kb / p.name)
    _, sources, _, claims = claims_for(ws, cfg)
    got = {s.kb_rel: (c.name, c.error) for s, c in zip(sources, claims)}
    assert got == {p.name: ("langsmith", None) for p in REAL_FILES} | {n: ("langsmith", None) for n in GOLDEN_INPUTS}


def test_foreign_lookalikes_are_not_claimed(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"post": [{"title": "hello", "id": "1"}]}) + "\n")  # a blog post, not a run
    assert langsmith.detect(_probe(p)) is None
    observation = {"id": "o1", "traceId": "t1", "type": "GENERATION", "startTime": "2025-01-01T00:00:00Z"}
    p.write_text(json.dumps(observation) + "\n")
    assert langsmith.detect(_probe(p)) is None  # a Langfuse observation
    p.write_text(json.dumps({"run_id": "r1", "key": "k"}) + "\n")  # no score, value or source
    assert langsmith.detect(_probe(p)) is None


# --- the real files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path, prompt, answer, tokens, latency, model, at", [
    (WRAP, "howdy", "Howdy! How can I assist you today?", (9, 9), 1118.333, "gpt-4o-mini-2024-07-18",
     "2024-10-11T20:58:23.298773Z"),
    (WRAP_REASONING, "Write a bash script that takes a matrix", "Certainly! Below is a **Bash script**", (43, 2497),
     15138.093, "o1-mini-2024-09-12", "2024-10-11T20:58:24.544431Z"),
])
def test_real_wire_record_merges_create_and_update(ws, cfg, path, prompt, answer, tokens, latency, model, at):
    files = _run(ws, cfg, path)
    assert _counts(files) == {path.name: (2, 1, 1, 0, {})}  # the post is the evidence, the patch joins it
    (ev,) = evidence_rows(ws)
    EvidenceRecord.model_validate(ev)
    assert ev["prompt"].startswith(prompt) and ev["response"].startswith(answer)
    assert [m["role"] for m in ev["messages"]] == ["user", "assistant"]
    # usage_metadata (the SDK's replacement of OpenAI's usage); latency = end_time - start_time, in ms
    assert (ev["prompt_tokens"], ev["completion_tokens"], ev["latency_ms"]) == (*tokens, latency)
    assert (ev["model"], ev["provider"], ev["kind"]) == (model, "openai", "chat_completion")
    assert (ev["recorded_at"], ev["recorded_at_from"]) == (at, "record:start_time")
    assert ev["signals"]["stop_reason"] == "stop" and ev["signals"]["error"] is None
    assert ev["provenance"]["record"] == "$.post[0]" and _joined(ev) == [(path.name, "$.patch[0]")]
    assert ev["task_id"] == json.loads(path.read_text())["post"][0]["id"]


def test_real_sdk_capture_joins_runs_and_feedback(ws, cfg):
    files = _run(ws, cfg, SDK_RUNS, SDK_FEEDBACK)
    assert _counts(files) == {SDK_RUNS.name: (4, 1, 3, 0, {}), SDK_FEEDBACK.name: (2, 0, 2, 0, {})}
    (ev,) = evidence_rows(ws)
    assert (ev["task_id"], ev["task_name"]) == (WEATHER_LLM, "weather_agent")  # the llm run, in the agent's trace
    assert ev["provenance"]["record"] == "line 0 $.post[1]"
    # the root chain, both tool runs and both feedback records are joined into the trace's only llm run
    assert _joined(ev) == [(SDK_RUNS.name, "line 0 $.post[0]"), (SDK_RUNS.name, "line 0 $.post[2]"),
                           (SDK_RUNS.name, "line 0 $.post[3]"), (SDK_FEEDBACK.name, 0), (SDK_FEEDBACK.name, 1)]
    assert ev["prompt"] == "What's the weather in Paris?" and ev["response"] is None
    assert ev["tool_calls"] == [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"},
                                 "problem": None}]
    assert (ev["model"], ev["provider"]) == ("gpt-4o-mini", "openai")  # extra.metadata ls_model_name / ls_provider
    assert (ev["prompt_tokens"], ev["completion_tokens"], ev["latency_ms"]) == (12, 7, 0.196)
    s = ev["signals"]
    # the Atlantis tool run raised, but that is a step's error, not this call's
    assert (s["error"], s["stop_reason"], s["tool_call_count"]) == (None, "tool_calls", 1)
    # correctness: score 1.0 from an "api" source (a person); user_thumbs: 0 from a "model" source,
    # with a correction — the model says the answer was not right as given
    assert _scores(ev) == {"correctness": (1.0, 1.0, "human", True), "user_thumbs": (0, 0.0, "automated", True)}
    assert (s["human_rating"], s["eval_score"]) == (1.0, 0.0)
    assert (s["verdict"], s["expected"], s["approved"]) == ("fail", "It is sunny in Paris (22C).", None)


def test_real_runs_without_their_feedback_and_feedback_without_runs(ws, cfg):
    files = _run(ws, cfg, SDK_FEEDBACK)
    assert _counts(files) == {SDK_FEEDBACK.name: (2, 0, 0, 2, {"unmatched_join": 2})}
    detail = quarantine_rows(ws)[0]["detail"]
    assert f"run {WEATHER_TRACE} is in no source file — add the file holding the runs" in detail
    shutil.copy(SDK_RUNS, ws.kb / SDK_RUNS.name)
    (ws.kb / SDK_FEEDBACK.name).unlink()
    files = _run(ws, cfg)
    assert _counts(files) == {SDK_RUNS.name: (4, 1, 3, 0, {})}
    assert evidence_rows(ws)[0]["signals"]["scores"] == []


def test_real_files_score_and_trace(ws, cfg):
    _run(ws, cfg, *REAL_FILES)
    score.run(ws, cfg)
    scored = _scored(ws)
    got = {r["task_id"]: (r["category"], r["rules_fired"]) for r in scored.values()}
    assert got == {
        "d0d84d31-923d-4cb5-94a8-40a0a0087578": ("needs_human_review", ["no_signal", "no_approval"]),
        "a8b34ded-ccd2-4fb7-bccb-9cd625066a14": ("needs_human_review", ["no_signal", "no_approval"]),
        WEATHER_LLM: ("rejected", ["audit_fail", "low_eval_score", "no_approval"]),
    }
    for ev in evidence_rows(ws):
        t = trace(ws, ev["id"])
        assert t.ok, t.to_json()


# --- the golden fixture -----------------------------------------------------------------------


@pytest.fixture
def golden(ws, cfg):
    files = _run(ws, cfg, *(GOLDEN / n for n in GOLDEN_INPUTS))
    return files, _by_task(ws)


def test_golden_counts_and_categories(ws, cfg, golden):
    files, _ = golden
    assert _counts(files) == {
        # 17 records: evidence from T1's two llm runs, T2, T3 and T4's root chain (no llm run); joined: T1's
        # root (post + patch), its tool run and the second llm's patch, T2's and T3's patches, T4's two steps
        "langsmith_runs_batch.jsonl": (17, 5, 8, 4, {"invalid_json": 1, "missing_field": 1, "unmatched_join": 1,
                                                     "wrong_type": 1}),
        # the conciseness feedback names only its (child) run, L2: found through the run's id
        "langsmith_feedback.jsonl": (9, 0, 6, 3, {"missing_field": 1, "unmatched_join": 1, "wrong_type": 1}),
        "langsmith_runs_export.json": (2, 3, 0, 0, {}),  # T7's two generations: one record, two parts
    }
    q = _details(ws)
    assert q[("langsmith_runs_batch.jsonl", "line 4 $.patch[0]")] == (
        "unmatched_join", "an update (patch) of run 5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9: its create (post) record "
                          "with the inputs is in no source file")
    assert q[("langsmith_runs_batch.jsonl", "line 6 $.post[0]")][1].startswith(
        "field 'inputs.messages': expected a list of messages, got str")
    assert q[("langsmith_runs_batch.jsonl", "line 6 $.post[1]")][1].startswith("not a LangSmith run")
    assert ("langsmith_feedback.jsonl", 2) not in q
    assert q[("langsmith_feedback.jsonl", 4)] == (
        "wrong_type", "field 'score' of feedback 'rating': expected a number or a boolean, got 'high'")
    assert q[("langsmith_feedback.jsonl", 8)][0] == "missing_field"  # run_id null: feedback on a session
    score.run(ws, cfg)
    by_id = {r["id"]: (r["task_id"], r["provenance"].get("part")) for r in evidence_rows(ws)}
    got = {by_id[i]: (r["category"], r["rules_fired"]) for i, r in _scored(ws).items()}
    assert got == {
        (L1, None): ("needs_human_review", ["no_signal", "no_approval"]),  # a step: only an uncounted score
        # thumbs up, but helpfulness 0.9 and conciseness 0.4 average below accept_min_score
        (L2, None): ("needs_human_review", ["conflicting_signals", "below_accept_score"]),
        (T2, None): ("rejected", ["error", "empty_answer", "missing_stop", "no_approval"]),
        (T3, None): ("rejected", ["truncated", "no_approval"]),               # max_tokens
        (T4, None): ("partially_accepted", ["no_approval"]),                 # kind trace: no stop reason needed
        (T6, None): ("needs_human_review", ["conflicting_signals", "human_rejection", "no_approval"]),
        (T7, "choice-0"): ("needs_human_review", ["no_signal", "no_approval"]),
        (T7, "choice-1"): ("needs_human_review", ["no_signal", "no_approval"]),
    }
    for ev in evidence_rows(ws):
        assert trace(ws, ev["id"]).ok


def test_langchain_agent_trace(golden):
    _, ev = golden
    first, last = ev[(L1, None)], ev[(L2, None)]
    # serialised SystemMessage + HumanMessage (one list per prompt); the AIMessage's tool_calls
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["prompt"] == "Where is my order A-1042? It was due yesterday."
    assert first["tool_calls"] == [{"id": "call_Zk2pQ8rT", "name": "lookup_order", "arguments": {"order_id": "A-1042"},
                                    "problem": None}]
    assert (first["signals"]["stop_reason"], first["prompt_tokens"], first["completion_tokens"]) == (
        "tool_calls", 88, 17)
    assert (first["model"], first["provider"], first["latency_ms"]) == ("gpt-4o-mini-2024-07-18", "openai", 1271.074)
    # the second call saw the tool's result (a ToolMessage) and answered
    assert [m["role"] for m in last["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert last["messages"][3]["tool_call_id"] == "call_Zk2pQ8rT"
    assert last["response"].startswith("Your order A-1042 shipped on 18 November with DHL")
    assert (last["prompt_tokens"], last["completion_tokens"], last["signals"]["stop_reason"]) == (141, 46, "stop")
    # the create (post) is the evidence; its update (patch), the root chain (post + patch) and the
    # root's feedback join the last llm run; the tool run joins the llm run that asked for it
    assert last["provenance"]["record"] == "line 0 $.post[3]"
    assert _joined(last) == [("langsmith_runs_batch.jsonl", "line 0 $.patch[0]"),
                             ("langsmith_runs_batch.jsonl", "line 0 $.post[0]"),
                             ("langsmith_runs_batch.jsonl", "line 0 $.patch[1]"),
                             ("langsmith_feedback.jsonl", 0), ("langsmith_feedback.jsonl", 1),
                             ("langsmith_feedback.jsonl", 2)]
    assert _joined(first) == [("langsmith_runs_batch.jsonl", "line 0 $.post[2]"), ("langsmith_feedback.jsonl", 3)]
    assert first["task_name"] == last["task_name"] == "support_agent"


def test_feedback_on_the_root_judges_the_last_answer(golden):
    _, ev = golden
    s = ev[(L2, None)]["signals"]
    assert (s["approved"], s["approver"]) == (True, "maria.k")  # a person's thumbs up (source app)
    assert (s["human_rating"], s["eval_score"]) == (1.0, 0.65)
    assert _scores(ev[(L2, None)]) == {"user_thumbs": (1, 1.0, "human", True),
                                       "helpfulness": (0.9, 0.9, "automated", True),
                                       "conciseness": (0.4, 0.4, "automated", True)}  # on L2 itself, by run id


def test_feedback_on_a_step_is_kept_but_not_counted(golden):
    _, ev = golden
    # tool_accuracy is on the tool run (the record names the trace): it judges the step, not an answer
    first = ev[(L1, None)]
    assert _scores(first) == {"tool_accuracy": (1, 1.0, "human", False)}
    assert (first["signals"]["eval_score"], first["signals"]["human_rating"], first["signals"]["approved"]) == (
        None, None, None)


def test_operator_can_count_a_steps_score(ws):
    (ws.root / "refinery.toml").write_text("[signals.tool_accuracy]\nuse = true\n")
    from refinery.config import load_config

    _run(ws, load_config(ws.root), *(GOLDEN / n for n in GOLDEN_INPUTS))
    first = _by_task(ws)[(L1, None)]
    assert _scores(first) == {"tool_accuracy": (1, 1.0, "human", True)} and first["signals"]["human_rating"] == 1.0


def test_error_and_epoch_ms_times(golden):
    _, ev = golden
    err = ev[(T2, None)]
    assert err["signals"]["error"].startswith("RateLimitError(\"Error code: 429") and "Traceback" not in \
        err["signals"]["error"]
    assert (err["response"], err["latency_ms"], err["prompt"]) == (None, 395.647, "My parcel arrived damaged.")
    assert [m["role"] for m in err["messages"]] == ["system", "user"]
    cut = ev[(T3, None)]  # langsmith-js: start_time / end_time in epoch milliseconds
    assert (cut["recorded_at"], cut["latency_ms"]) == ("2026-11-20T10:15:00.123000Z", 2748.0)
    assert (cut["provider"], cut["model"], cut["signals"]["stop_reason"]) == (
        "anthropic", "claude-3-5-haiku-20241022", "max_tokens")
    assert [m["role"] for m in cut["messages"]] == ["system", "user", "assistant"]  # Anthropic's system kwarg


def test_trace_without_llm_run_is_its_root(golden):
    _, ev = golden
    root = ev[(T4, None)]
    assert (root["kind"], root["task_name"], root["prompt"], root["response"]) == (
        "trace", "classify_ticket", "I was charged twice for my November invoice.", "billing")
    assert (root["model"], root["latency_ms"]) == (None, 41.288)
    assert _joined(root) == [("langsmith_runs_batch.jsonl", "line 5 $.post[1]"),
                             ("langsmith_runs_batch.jsonl", "line 5 $.post[2]"), ("langsmith_feedback.jsonl", 6)]
    assert _scores(root) == {"label_match": ("correct", 1.0, "human", True)}  # a categorical value


def test_run_export_correction_and_feedback_stats(golden):
    _, ev = golden
    r = ev[(T6, None)]
    assert r["response"].startswith("No: annual plans") and r["signals"]["stop_reason"] == "end_turn"
    assert (r["provider"], r["model"], r["prompt_tokens"], r["completion_tokens"]) == (
        "anthropic", "claude-3-5-haiku-20241022", 41, 38)
    assert (r["recorded_at"], r["latency_ms"]) == ("2026-11-21T14:02:11.503201Z", 1474.439)  # naive ISO = UTC
    s = r["signals"]
    assert (s["approved"], s["approver"]) == (False, "maria.k")  # a person corrected the answer
    assert s["expected"].startswith("Yes: annual plans can be refunded in full within 30 days")
    # correctness comes from the feedback record; feedback_stats adds only conciseness (author unknown)
    assert _scores(r) == {"correctness": (0, 0.0, "human", True), "conciseness": (0.8, 0.8, None, True)}
    assert (s["human_rating"], s["eval_score"]) == (0.0, 0.8)


def test_several_generations_are_parts(golden):
    _, ev = golden
    a, b = ev[(T7, "choice-0")], ev[(T7, "choice-1")]
    assert a["prompt"] == b["prompt"] == "Write a subject line for an email telling a customer their parcel is " \
                                         "delayed by two days."
    assert (a["response"], b["response"]) == ("\n\nYour parcel is running two days late - here is the new date",
                                              "\n\nUpdate on your delivery: a short delay")
    assert (a["model"], a["prompt_tokens"], a["completion_tokens"]) == ("gpt-3.5-turbo-instruct", 19, 21)


# --- other shapes and defects, one at a time --------------------------------------------------

TRACE = "11111111-2222-4333-8444-555555555555"
CHILD = "01a30000-0000-7000-8000-000000000001"


def _seg(t, run_id):
    return f"20261201T10000{t}000000Z{run_id}"


def _llm(run_id=TRACE, parent=None, t=0, **over):
    dotted = _seg(t, run_id) if parent is None else f"{_seg(0, parent)}.{_seg(t, run_id)}"
    run = {"id": run_id, "trace_id": parent or run_id, "dotted_order": dotted, "parent_run_id": parent,
           "name": "ChatOpenAI", "run_type": "llm", "start_time": f"2026-12-01T10:00:0{t}+00:00",
           "end_time": f"2026-12-01T10:00:0{t}.500000+00:00",
           "inputs": {"messages": [{"role": "user", "content": f"question {t}"}]},
           "outputs": {"choices": [{"message": {"role": "assistant", "content": f"answer {t}"},
                                    "finish_reason": "stop"}], "model": "gpt-4o-mini"}}
    return run | over


def _chain(run_id=TRACE, **over):
    return {"id": run_id, "trace_id": run_id, "dotted_order": _seg(0, run_id), "name": "agent", "run_type": "chain",
            "start_time": "2026-12-01T10:00:00+00:00", "end_time": "2026-12-01T10:00:09+00:00",
            "inputs": {"question": "q"}, "outputs": {"output": "a"}} | over


def _feedback(run_id=TRACE, key="score", **over):
    return {"id": f"fb-{key}", "run_id": run_id, "key": key, "feedback_source": {"type": "app"}} | over


def _jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_runs_and_feedback_in_one_file(ws, cfg):
    write_kb(ws, {"mixed.jsonl": _jsonl(_llm(), _feedback(score=1))})
    assert langsmith.detect(_probe(ws.kb / "mixed.jsonl")) == "records are LangSmith runs and feedback"
    files = _run(ws, cfg)
    assert _counts(files) == {"mixed.jsonl": (2, 1, 1, 0, {})}


def test_an_update_read_before_its_create_still_merges(ws, cfg):
    create = _llm(outputs={}, end_time=None)
    update = {"id": TRACE, "trace_id": TRACE, "dotted_order": create["dotted_order"], "end_time":
              "2026-12-01T10:00:02+00:00", "outputs": _llm()["outputs"], "inputs": {}, "error": None}
    write_kb(ws, {"a_updates.json": json.dumps({"patch": [update]}), "b_creates.json": json.dumps({"post": [create]})})
    files = _run(ws, cfg)
    assert _counts(files) == {"a_updates.json": (1, 0, 1, 0, {}), "b_creates.json": (1, 1, 0, 0, {})}
    (ev,) = evidence_rows(ws)
    # the create is the evidence; the update's empty inputs and null error erase nothing
    assert (ev["prompt"], ev["response"], ev["latency_ms"]) == ("question 0", "answer 0", 2000.0)
    assert ev["provenance"]["record"] == "$.post[0]" and _joined(ev) == [("a_updates.json", "$.patch[0]")]


def test_flat_run_exports_and_a_runs_query_answer(ws, cfg):
    write_kb(ws, {"runs.jsonl": _jsonl(_chain(), _llm(CHILD, TRACE, t=1)),
                  "query.json": json.dumps({"runs": [_llm("99999999-2222-4333-8444-555555555555")],
                                            "cursors": {"next": None}})})
    files = _run(ws, cfg)
    assert _counts(files) == {"query.json": (1, 1, 0, 0, {}), "runs.jsonl": (2, 1, 1, 0, {})}
    ev = _by_task(ws)
    assert ev[(CHILD, None)]["task_name"] == "agent" and ev[(CHILD, None)]["response"] == "answer 1"


def test_trace_id_from_dotted_order_and_feedback_naming_its_trace(ws, cfg):
    child = _llm(CHILD, TRACE, t=1)
    del child["trace_id"]  # the first segment of dotted_order names the trace
    write_kb(ws, {"runs.jsonl": _jsonl(_chain(), child),
                  "feedback.jsonl": _jsonl(_feedback(CHILD, "accuracy", score=0.3, trace_id=TRACE,
                                                     feedback_source={"type": "model"}))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    # feedback on the llm run itself (found through its trace_id) is that answer's score
    assert _scores(ev) == {"accuracy": (0.3, 0.3, "automated", True)} and ev["signals"]["eval_score"] == 0.3


def test_root_error_is_the_trace_failing(ws, cfg):
    root = _chain(error="TimeoutError('tool took too long')\n\nTraceback (most recent call last):\n  ...",
                  outputs=None, status="error")
    write_kb(ws, {"runs.jsonl": _jsonl(root, _llm(CHILD, TRACE, t=1))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert ev["signals"]["error"] == "the trace failed: TimeoutError('tool took too long')"
    write_kb(ws, {"runs.jsonl": _jsonl(_chain(status="error"))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert (ev["kind"], ev["signals"]["error"]) == ("trace", "run status: error")


def test_missing_root_and_missing_partner(ws, cfg):
    tool = {"id": CHILD, "trace_id": TRACE, "parent_run_id": TRACE, "run_type": "tool", "name": "search",
            "start_time": "2026-12-01T10:00:01+00:00", "inputs": {"q": "x"}, "outputs": {"output": "y"}}
    write_kb(ws, {"runs.jsonl": _jsonl(tool), "feedback.jsonl": _jsonl(_feedback(score=1))})
    files = _run(ws, cfg)
    assert _counts(files) == {"feedback.jsonl": (1, 0, 0, 1, {"unmatched_join": 1}),
                              "runs.jsonl": (1, 0, 0, 1, {"unmatched_join": 1})}
    q = {r["provenance"]["source_file"]: r["detail"] for r in quarantine_rows(ws)}
    assert f"its root run {TRACE} is in no source file" in q["data/_kb/runs.jsonl"]
    assert f"run {TRACE} is in no source file" in q["data/_kb/feedback.jsonl"]
    # with an llm run the trace has an answer: only the feedback on the absent root is unmatched
    write_kb(ws, {"runs.jsonl": _jsonl(_llm(CHILD, TRACE, t=1))})
    files = _run(ws, cfg)
    assert _counts(files)["feedback.jsonl"] == (1, 0, 0, 1, {"unmatched_join": 1})
    assert quarantine_rows(ws)[0]["detail"] == (
        f"feedback 'score' on run {TRACE}: run {TRACE} is in no source file — add the file holding the runs to "
        "data/_kb/")


@pytest.mark.parametrize("fb, approved, rating", [
    ({"score": True}, True, 1.0),                                     # a boolean score
    ({"score": 0, "value": "thumbs_down"}, False, 0.0),              # a thumbs value
    ({"key": "thumbs", "score": 1}, True, 1.0),                       # a "thumb" key scored 0/1
    ({"score": 0.8}, None, 0.8),                                      # a rating, no approval
    ({"score": 1, "correction": "a better answer"}, False, 1.0),      # corrected: not right as given
])
def test_human_feedback_shapes(ws, cfg, fb, approved, rating):
    write_kb(ws, {"runs.jsonl": _jsonl(_llm()), "feedback.jsonl": _jsonl(_feedback(**{
        "feedback_source": {"type": "app", "user_id": "u-1"}} | fb))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    s = ev["signals"]
    assert (s["approved"], s["human_rating"], s["eval_score"]) == (approved, rating, None)
    assert s["approver"] == (None if approved is None else "u-1")
    assert s["expected"] == fb.get("correction")


@pytest.mark.parametrize("source", ["model", "auto_eval"])
def test_model_feedback_is_automated(ws, cfg, source):
    write_kb(ws, {"runs.jsonl": _jsonl(_llm()), "feedback.jsonl": _jsonl(_feedback(
        score=0, value="thumbs_down", feedback_source={"type": source}))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert (ev["signals"]["approved"], ev["signals"]["eval_score"], ev["signals"]["human_rating"]) == (None, 0.0, None)


def test_langchain_shapes(ws, cfg):
    lc = {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "AIMessageChunk"],
          "kwargs": {"content": [{"type": "text", "text": "Let me check."},
                                 {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}}],
                     "tool_calls": [{"name": "search", "args": {"q": "x"}, "id": "toolu_1", "type": "tool_call"}],
                     "invalid_tool_calls": [{"name": "lookup", "args": "{oops", "id": "toolu_2", "error": "bad json"}],
                     "response_metadata": {"stop_reason": "tool_use", "model_name": "claude-3-5-sonnet-20241022"},
                     "usage_metadata": {"input_tokens": 20, "output_tokens": 9, "total_tokens": 29}}}
    run = _llm(inputs={"messages": [[{"type": "system", "data": {"content": "be brief"}},
                                     {"type": "human", "content": "find x"}]]},
               outputs={"generations": [[{"text": "Let me check.", "message": lc}]], "llm_output": None},
               extra={"invocation_params": {"_type": "anthropic-chat", "model": "claude-3-5-sonnet-latest"}})
    write_kb(ws, {"runs.jsonl": _jsonl(run)})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert [m["role"] for m in ev["messages"]] == ["system", "user", "assistant"]
    assert ev["response"] == "Let me check."
    # the tool_use block repeats the tool call: read once; the invalid call is kept, malformed
    assert [(c["name"], c["problem"]) for c in ev["tool_calls"]] == [("search", None), ("lookup", "arguments_not_json")]
    assert (ev["provider"], ev["model"]) == ("anthropic", "claude-3-5-sonnet-20241022")
    assert (ev["prompt_tokens"], ev["completion_tokens"], ev["signals"]["stop_reason"]) == (20, 9, "tool_use")


def test_graph_state_outputs_of_a_chain_trace(ws, cfg):
    asked = [{"type": "human", "content": "hi, book me a table"}]
    said = asked + [{"type": "ai", "content": "", "tool_calls": [{"name": "book", "args": {"n": 2}, "id": "c1"}]},
                    {"type": "tool", "content": "booked", "tool_call_id": "c1"},
                    {"type": "ai", "content": "Done: a table for two."}]
    write_kb(ws, {"runs.jsonl": _jsonl(_chain(inputs={"messages": asked}, outputs={"messages": said}))})
    _run(ws, cfg)
    (ev,) = evidence_rows(ws)
    assert [m["role"] for m in ev["messages"]] == ["user", "assistant", "tool", "assistant"]  # no repeated question
    assert (ev["prompt"], ev["response"]) == ("hi, book me a table", "Done: a table for two.")
    assert [c["name"] for c in ev["tool_calls"]] == ["book"]


@pytest.mark.parametrize("over, detail", [
    ({"inputs": {}}, "field 'inputs' of run 11111111-2222-4333-8444-555555555555 is missing or empty"),
    ({"inputs": {"messages": [{"content": "no role"}]}}, "field 'inputs.messages[0]': a message needs a role"),
    ({"start_time": "yesterday"}, "field 'start_time': cannot parse 'yesterday'"),
    ({"end_time": "soon"}, "field 'end_time': cannot parse 'soon'"),
])
def test_defects_are_refused_with_the_field_named(ws, cfg, over, detail):
    write_kb(ws, {"runs.jsonl": _jsonl(_llm(**over)), "feedback.jsonl": _jsonl(_feedback(score=1))})
    files = _run(ws, cfg)
    assert (files["runs.jsonl"].evidence, files["runs.jsonl"].quarantined) == (0, 1)
    run_q, fb_q = sorted(quarantine_rows(ws), key=lambda q: q["source"], reverse=True)
    assert detail in run_q["detail"], run_q["detail"]
    assert fb_q["detail"].startswith(f"joined into run {TRACE}, which was refused: ")
