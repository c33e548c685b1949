"""The langfuse importer: Langfuse exports (single-trace documents; traces, observations and
scores in JSON/JSONL) joined by trace id — one evidence record per GENERATION, scores and the
trace attached to the right one."""

from __future__ import annotations

import functools
import shutil

import orjson
import pytest

from conftest import (
    FIXTURES, REPO, copy_fixture, evidence_rows, foreign_inputs, probe_file, quarantine_rows,
    scored_categories, source_record, write_kb,
)
from refinery import materialize
from refinery.config import Config, load_config
from refinery.discovery import Registry
from refinery.trace import trace

REAL = FIXTURES / "real" / "langfuse"
GOLDEN = FIXTURES / "langfuse"
PYDANTIC = "pydantic-ai-trace-2025-06-06.json"
AGENTS = "openai-agents-2025-09-30.json"
T1 = "11111111111111111111111111111111"


def _lines(*records) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def _trace(tid=T1, **kw):
    return {"id": tid, "timestamp": "2025-03-01T10:00:00.000Z", "name": "qa", "input": "question?",
            "output": "answer.", "sessionId": "s-1", "userId": "u-1", "tags": [], "public": False, **kw}


def _obs(oid, typ="GENERATION", tid=T1, start="2025-03-01T10:00:01.000Z", end="2025-03-01T10:00:02.000Z", **kw):
    base = {"id": oid, "traceId": tid, "type": typ, "name": oid, "startTime": start, "endTime": end,
            "level": "DEFAULT", "statusMessage": None, "parentObservationId": None}
    if typ == "GENERATION":
        base |= {"model": "gpt-4o-mini", "input": [{"role": "user", "content": f"ask {oid}"}],
                 "output": {"role": "assistant", "content": f"answer {oid}"}, "usageDetails": {"input": 7, "output": 3}}
    return base | kw


def _score(sid, name, value, tid=T1, obs=None, dtype="NUMERIC", source="EVAL", **kw):
    return {"id": sid, "traceId": tid, "observationId": obs, "name": name, "value": value, "dataType": dtype,
            "source": source, "comment": None, "timestamp": "2025-03-01T10:01:00.000Z", **kw}


def _run(ws, cfg):
    result = materialize.run(ws, cfg, validate=True)
    assert result.transform_errors == 0, [f.first_transform_error for f in result.files]
    return result, {f.source_file.removeprefix("data/_kb/"): f for f in result.files}


def _by_obs(ws):
    """Evidence by the id of the observation (or trace) it was made from."""
    out = {}
    for ev in evidence_rows(ws):
        part = ev["provenance"].get("part")
        out[part.removeprefix("observation ") if part else source_record(ws, ev)["id"]] = ev
    return out


# --- detection ---------------------------------------------------------------------------------


@functools.cache
def _langfuse():
    return Registry.load(REPO, Config()).by_name["langfuse"]


def _detect(path):
    return _langfuse().detect(probe_file(path))


@pytest.mark.parametrize("path", sorted([*REAL.glob("*.json"), *(p for p in GOLDEN.iterdir() if p.suffix in (
    ".json", ".jsonl") and p.name != "expected.jsonl")]), ids=lambda p: p.name)
def test_detects_langfuse_files(path):
    assert _detect(path)


def test_claims_no_other_format():
    claimed = [str(p.relative_to(FIXTURES)) for p in foreign_inputs("langfuse") if _detect(p)]
    assert claimed == []


def test_detects_the_api_envelope_and_lines_of_single_trace_exports(ws):
    write_kb(ws, {"page.json": orjson.dumps({"data": [_trace(observations=[_obs("g1")])],
                                             "meta": {"page": 1, "limit": 50, "totalItems": 1}}).decode(),
                  "many.trace.jsonl": _lines({"trace": _trace(), "observations": [_obs("g1")]})})
    assert "API list" in _detect(ws.kb / "page.json")
    assert "single-trace" in _detect(ws.kb / "many.trace.jsonl")


def test_a_file_of_ordinary_records_with_id_and_timestamp_is_not_a_trace(ws):
    write_kb(ws, {"events.jsonl": _lines(*({"id": f"e{i}", "timestamp": "2025-01-01T00:00:00Z", "name": "x",
                                             "input": "a", "output": "b"} for i in range(3)))})
    assert _detect(ws.kb / "events.jsonl") is None


# --- the real exports ----------------------------------------------------------------------------


@pytest.fixture
def real(ws, cfg):
    for p in REAL.glob("*.json"):
        shutil.copy(p, ws.kb / p.name)
    return _run(ws, cfg)


def test_real_files_exact_counts(real):
    result, files = real
    assert (files[PYDANTIC].rows_in, files[PYDANTIC].evidence, files[PYDANTIC].joined,
            files[PYDANTIC].quarantined) == (4, 1, 3, 0)  # trace + SPAN + SPAN + GENERATION
    assert (files[AGENTS].rows_in, files[AGENTS].evidence, files[AGENTS].joined,
            files[AGENTS].quarantined) == (6, 2, 4, 0)  # trace + AGENT x2 + GENERATION x2 + TOOL
    assert result.by_reason == {}


def test_pydantic_ai_generation(real, ws):
    ev = _by_obs(ws)["5cb389a3bdd21a6e"]
    assert ev["kind"] == "generation"
    assert ev["prompt"] == "What is Langfuse?"
    assert ev["response"].startswith("Langfuse is a tool designed for observability")
    assert [m["role"] for m in ev["messages"]] == ["system", "user", "assistant"]
    assert (ev["model"], ev["provider"]) == ("gpt-4o", "openai")
    assert (ev["prompt_tokens"], ev["completion_tokens"]) == (31, 96)
    assert ev["latency_ms"] == 4794.0  # endTime - startTime; the observation's own latency field says 4794 (ms)
    assert (ev["recorded_at"], ev["recorded_at_from"]) == ("2025-06-06T14:40:28.562000Z", "record:startTime")
    assert (ev["task_id"], ev["task_name"]) == ("25f4bdeebaab60e6e1bee7e8469554bc", "pydantic-ai-qa-trace")
    assert [j["record"] for j in ev["provenance"]["joined"]] == ["$.trace", "$.observations[0]", "$.observations[1]"]
    assert ev["signals"]["scores"] == [] and ev["signals"]["error"] is None


def test_openai_agents_generations_tools_and_trace_scores(real, ws):
    by = _by_obs(ws)
    final, plan = by["90d94774e8e3724d"], by["98870087af69bf06"]
    # the first call only decides on the tool
    assert plan["response"] is None
    assert [(c["name"], c["arguments"]) for c in plan["tool_calls"]] == [("get_weather", {"city": "Tokyo"})]
    assert (plan["prompt_tokens"], plan["completion_tokens"], plan["latency_ms"]) == (55, 15, 1036.0)
    assert plan["signals"]["scores"] == []
    # the second answers with the tool's result in its conversation (Responses input items)
    assert final["prompt"] == "What's the weather in Tokyo?"
    assert final["response"].startswith("The weather in Tokyo is currently sunny.")
    roles = [(m["role"], m["tool_call_id"]) for m in final["messages"]]
    assert roles == [("system", None), ("user", None), ("assistant", None),
                     ("tool", "call_Kud0j0DxWSmLzv9W5m6qVqXn"), ("assistant", None)]
    assert final["messages"][0]["content"] == "You are a helpful agent."  # Responses `instructions`
    assert final["messages"][3]["name"] == "get_weather"
    assert (final["prompt_tokens"], final["completion_tokens"], final["latency_ms"]) == (85, 29, 1150.0)
    assert (final["model"], final["provider"], final["signals"]["stop_reason"]) == (
        "gpt-4.1-2025-04-14", "openai", "stop")
    # trace.scores[] (trace-level, EVAL) go to the trace's last generation, read lower-is-better
    sig = final["signals"]
    assert [(s["name"], s["value"], s["normalized"], s["by"]) for s in sig["scores"]] == [
        ("toxicity", 0.8, 0.2, "automated"), ("hallucination", 0, 1.0, "automated")]
    assert (sig["eval_score"], sig["human_rating"], sig["approved"]) == (0.6, None, None)
    assert [j["record"] for j in final["provenance"]["joined"]] == [
        "$.trace", "$.observations[0]", "$.observations[1]", "$.observations[4]"]


def test_real_evidence_traces_back_and_scores(real, ws, cfg):
    for ev in evidence_rows(ws):
        assert trace(ws, ev["id"]).ok
    got = scored_categories(ws, cfg)
    by = _by_obs(ws)
    assert got[by["90d94774e8e3724d"]["id"]] == ("partially_accepted", ["below_accept_score", "no_approval"])
    assert got[by["98870087af69bf06"]["id"]] == ("needs_human_review", ["no_signal", "no_approval"])
    assert got[by["5cb389a3bdd21a6e"]["id"]] == ("needs_human_review", ["no_signal", "no_approval"])


# --- the golden fixture, scored --------------------------------------------------------------------


def test_golden_fixture_counts_and_categories(ws):
    cfg = copy_fixture(ws, GOLDEN)
    result, files = _run(ws, cfg)
    counts = {n: (f.rows_in, f.evidence, f.joined, f.quarantined, f.by_reason) for n, f in files.items()}
    assert counts == {
        "observations.jsonl": (11, 5, 3, 3, {"duplicate_row": 1, "missing_field": 1, "unmatched_join": 1}),
        "scores.jsonl": (10, 0, 6, 4, {"missing_field": 2, "unmatched_join": 2}),
        "support-agent.trace.json": (4, 1, 3, 0, {}),
        "traces.jsonl": (7, 1, 3, 3, {"invalid_json": 1, "missing_field": 2}),
    }
    q = {(r["provenance"]["source_file"].removeprefix("data/_kb/"), r["provenance"]["line_offset"]): r["reason"]
         for r in quarantine_rows(ws)}
    assert q[("observations.jsonl", 10)] == "unmatched_join"  # a SPAN of a trace in no file
    cats = scored_categories(ws, cfg)
    by = _by_obs(ws)
    assert {k: cats[ev["id"]][0] for k, ev in by.items()} == {
        "c3d4e5f60718293a": "accepted",            # human BOOLEAN approval + EVAL 0.9
        "4d5e6f708192a3b4": "accepted",            # verdict pass, toxicity 0.02, rating 4 on 1..5
        "2b3c4d5e6f708192": "rejected",            # tool-choice 0.4: low_eval_score
        "6f708192a3b4c5d6": "rejected",            # level ERROR (429)
        "708192a3b4c5d6e7": "rejected",            # stop_reason max_tokens
        "92a3b4c5d6e7f809": "needs_human_review",  # a generation whose trace is in no file: no signal
        "c47a1e2b3d4f5a6b7c8d9e0f1a2b3c4d": "rejected",  # trace-level evidence, human thumbs down
    }


# --- joins -------------------------------------------------------------------------------------------


def test_split_files_join_by_trace_and_scores_go_where_they_belong(ws, cfg):
    write_kb(ws, {
        "traces.jsonl": _lines(_trace()),
        # g2 is read first but ends last: it is the trace's last generation
        "observations.jsonl": _lines(_obs("g2", start="2025-03-01T10:00:03Z", end="2025-03-01T10:00:05Z"),
                                     _obs("g1"), _obs("span", "SPAN")),
        "scores.jsonl": _lines(_score("s1", "accuracy", 0.9, obs="g1"), _score("s2", "toxicity", 0.1),
                               _score("s3", "on-span", 0.5, obs="span")),
    })
    _run(ws, cfg)
    by = _by_obs(ws)
    assert [s["name"] for s in by["g1"]["signals"]["scores"]] == ["accuracy"]
    assert [s["name"] for s in by["g2"]["signals"]["scores"]] == ["toxicity", "on-span"]
    joined = {(j["source_file"].removeprefix("data/_kb/"), j["line_offset"]) for j in by["g2"]["provenance"]["joined"]}
    assert joined == {("traces.jsonl", 0), ("observations.jsonl", 2), ("scores.jsonl", 1), ("scores.jsonl", 2)}
    assert by["g2"]["task_name"] == "qa" and by["g1"]["task_id"] == T1


def test_score_types_sources_and_scales(ws):
    (ws.root / "refinery.toml").write_text("[signals.stars]\nscale = [1, 5]\n")
    write_kb(ws, {"lf.jsonl": _lines(
        _trace(), _obs("g1"),
        _score("s1", "correct", 1, dtype="BOOLEAN", source="ANNOTATION", stringValue="True", authorUserId="rev-1"),
        _score("s2", "stars", 5, source="ANNOTATION"),
        _score("s3", "judge", None, dtype="CATEGORICAL", stringValue="pass"),
        _score("s4", "latency-points", 42, source="API"))})
    _run(ws, load_config(ws.root))
    sig = _by_obs(ws)["g1"]["signals"]
    assert [(s["name"], s["value"], s["normalized"], s["by"], s["scale"]) for s in sig["scores"]] == [
        ("correct", True, 1.0, "human", None), ("stars", 5, 1.0, "human", [1.0, 5.0]),
        ("judge", "pass", 1.0, "automated", None), ("latency-points", 42, None, "human", None)]
    assert (sig["approved"], sig["approver"], sig["verdict"]) == (True, "rev-1", "pass")
    assert (sig["human_rating"], sig["eval_score"]) == (1.0, 1.0)


def test_a_human_false_boolean_is_a_disapproval(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(_trace(), _obs("g1"), _score(
        "s1", "user-feedback", 0, dtype="BOOLEAN", source="API", stringValue="False"))})
    _run(ws, cfg)
    sig = _by_obs(ws)["g1"]["signals"]
    assert (sig["approved"], sig["approver"], sig["human_rating"]) == (False, "langfuse:API", 0.0)


def test_errors_of_the_call_and_of_its_trace(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(
        _trace(), _obs("g1", level="ERROR", statusMessage="Error code: 500", output=None),
        _obs("g2", start="2025-03-01T10:00:03Z", end="2025-03-01T10:00:04Z"),
        _obs("tool", "TOOL", level="ERROR", statusMessage="timeout after 30s"))})
    _run(ws, cfg)
    by = _by_obs(ws)
    assert by["g1"]["signals"]["error"] == "GENERATION g1: Error code: 500"
    assert by["g1"]["response"] is None
    assert by["g2"]["signals"]["error"] == "TOOL tool: timeout after 30s"  # joined into the last generation


def test_json_text_input_and_latency_field_in_milliseconds(ws, cfg):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    write_kb(ws, {"lf.jsonl": _lines(_trace(), _obs("g1", end=None, latency=812, input=orjson.dumps(msgs).decode(),
                                                    output='"4"', usageDetails={}, inputUsage=0, outputUsage=0))})
    _run(ws, cfg)
    ev = _by_obs(ws)["g1"]
    assert (ev["prompt"], ev["response"], ev["messages"][0]["role"]) == ("2+2?", "4", "system")
    assert ev["latency_ms"] == 812.0
    assert (ev["prompt_tokens"], ev["completion_tokens"]) == (None, None)  # 0/0 means "not recorded"


def test_a_trace_without_generation_is_evidence_itself(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(
        _trace(input='{"query": "refund policy"}', output='"30 days."', latency=0.42), _obs("span", "SPAN"),
        _score("s1", "helpfulness", 0.8))})
    _run(ws, cfg)
    [ev] = evidence_rows(ws)
    assert (ev["kind"], ev["prompt"], ev["response"], ev["latency_ms"]) == ("trace", "refund policy", "30 days.", 420.0)
    assert (ev["recorded_at"], ev["recorded_at_from"]) == ("2025-03-01T10:00:00.000000Z", "record:timestamp")
    assert ev["signals"]["eval_score"] == 0.8
    assert len(ev["provenance"]["joined"]) == 2


def test_records_whose_trace_is_in_no_file(ws, cfg):
    other = "22222222222222222222222222222222"
    write_kb(ws, {"lf.jsonl": _lines(
        _obs("lonely", tid=other), _score("s1", "accuracy", 1.0, tid=other, obs="lonely"),
        _obs("span", "SPAN", tid="3" * 32), _score("s2", "accuracy", 1.0, tid="4" * 32),
        _score("s3", "accuracy", 1.0, tid=other, obs="not-exported"),
        _score("s4", "csat", 1.0, tid=None, sessionId="sess"))})
    result, _ = _run(ws, cfg)
    ev = _by_obs(ws)["lonely"]  # a generation carries its own prompt and answer: it stands alone
    assert (ev["response"], ev["signals"]["eval_score"], ev["task_name"]) == ("answer lonely", 1.0, None)
    assert result.by_reason == {"missing_field": 1, "unmatched_join": 3}
    details = sorted(r["detail"] for r in quarantine_rows(ws))
    assert "score 'accuracy' is on observation 'not-exported', which is in no source file" in details
    assert any("has no traceId" in d for d in details)


def test_trace_records_that_embed_their_observations(ws, cfg):
    full = _trace(observations=[_obs("span", "SPAN"), _obs("g1")], scores=[_score("s1", "accuracy", 0.75)])
    write_kb(ws, {"detail.jsonl": _lines(full),  # JSONL: the reader hands each observation over
                  "page.json": orjson.dumps({"data": [{**full, "id": "5" * 32, "observations": [
                      _obs("g5", tid="5" * 32)], "scores": []}], "meta": {"page": 1}}).decode()})
    result, files = _run(ws, cfg)
    by = _by_obs(ws)
    assert by["g1"]["task_name"] == "qa" and by["g1"]["signals"]["eval_score"] == 0.75
    assert by["g5"]["provenance"]["record"] == "$.data[0]"  # part of the trace record in an envelope
    assert by["g5"]["provenance"]["part"] == "observation g5"
    assert (files["detail.jsonl"].evidence, files["detail.jsonl"].joined) == (1, 1)
    assert result.quarantined == 0


def test_duplicate_observations_across_files_are_joined_once(ws, cfg):
    write_kb(ws, {"a.jsonl": _lines(_trace(), _obs("g1")), "b.jsonl": _lines(_obs("g1"))})
    result, files = _run(ws, cfg)
    assert result.evidence == 1 and files["b.jsonl"].joined == 1


def test_a_generation_without_input_is_refused_and_its_trace_goes_to_the_next(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(
        _trace(), _obs("g1"), _obs("g2", start="2025-03-01T10:00:05Z", end="2025-03-01T10:00:06Z", input=None),
        _score("s1", "accuracy", 0.9), _score("s2", "accuracy", 0.1, obs="g2"))})
    result, _ = _run(ws, cfg)
    by = _by_obs(ws)
    assert list(by) == ["g1"] and by["g1"]["signals"]["eval_score"] == 0.9
    assert result.by_reason == {"missing_field": 2}
    assert sorted(r["detail"][:40] for r in quarantine_rows(ws)) == [
        "field 'input' of GENERATION observation ", "its generation g2 was refused: field 'in"]


def test_a_generation_with_no_time_is_never_the_last_one(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(_trace(), _obs("timed"), _obs("untimed", start=None, end=None),
                                     _score("s1", "accuracy", 0.9))})
    _run(ws, cfg)
    by = _by_obs(ws)
    assert by["timed"]["signals"]["eval_score"] == 0.9 and by["untimed"]["signals"]["scores"] == []
    assert (by["untimed"]["recorded_at"], by["untimed"]["recorded_at_from"]) == (
        "2025-03-01T10:00:00.000000Z", "parent:timestamp")  # its trace's time


def test_a_score_without_a_name_is_refused(ws, cfg):
    write_kb(ws, {"lf.jsonl": _lines(_trace(), _obs("g1"), _score("s1", "", 0.9))})
    result, _ = _run(ws, cfg)
    assert result.by_reason == {"missing_field": 1}
    assert quarantine_rows(ws)[0]["detail"] == "field 'name' is missing or empty"


def test_a_trace_listing_observation_ids_is_read_as_a_trace(ws, cfg):
    write_kb(ws, {"traces.jsonl": _lines(_trace(observations=["g1"], scores=[]), _trace("6" * 32, observations=[])),
                  "observations.jsonl": _lines(_obs("g1"))})
    result, files = _run(ws, cfg)
    assert files["traces.jsonl"].rows_in == 2 and result.quarantined == 0
    assert _by_obs(ws)["g1"]["task_name"] == "qa"
