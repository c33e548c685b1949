"""The inspect_ai importer: eval logs (.json documents and .eval archives) → one evidence per sample.

Real files: tests/fixtures/real/inspect_ai/ (see its ORIGIN.md) — three .json logs of inspect
0.3.41, 0.3.43 and 0.3.95, and two .eval archives inspect itself wrote from one of them
(deflate and Zstandard members). The golden fixture tests/fixtures/inspect_ai/ covers the
defects (a sample error, a broken tool call, a truncated answer, a content filter, a missing
id, a missing attachment, a log without samples, a cut archive member).
"""

from __future__ import annotations

import json
import zipfile

import pytest

from conftest import (
    FIXTURES, builtin_importer, evidence_rows, fixture_inputs, foreign_inputs, materialize_files, probe_file,
    quarantine_rows, scored_rows, write_kb,
)
from refinery import score
from refinery.materialize import claims_for
from refinery.trace import trace

inspect_ai = builtin_importer("inspect_ai")

REAL = FIXTURES / "real" / "inspect_ai"
REAL_LOGS = sorted(p.name for p in REAL.iterdir() if p.suffix in (".json", ".eval"))
GOLDEN = FIXTURES / "inspect_ai"
INPUT_TASK = "2024-11-05T13-31-45-05-00_input-task_8zXjbRzCWrL9GXiXo2vus9.json"


_probe, _inputs = probe_file, fixture_inputs


def _run(ws, cfg, *names, folder=REAL):
    return materialize_files(ws, cfg, *(folder / n for n in names))


def _only(ws):
    (row,) = evidence_rows(ws)
    return row


def _categories(ws):
    return {r["task_id"]: (r["category"], r["rules_fired"])
            for r in scored_rows(ws)}


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_LOGS)
def test_detects_every_real_log(name):
    why = inspect_ai.detect(_probe(REAL / name))
    assert why and ("header.json" in why if name.endswith(".eval") else "eval spec" in why)


def test_claims_nothing_else():
    others = foreign_inputs("inspect_ai", "inspect")
    assert len(others) > 40
    claimed = [p.name for p in others if inspect_ai.detect(_probe(p))]
    assert claimed == []


def test_real_logs_are_claimed_by_inspect_ai_alone(ws, cfg):
    write_kb(ws, {name: (REAL / name).read_bytes() for name in REAL_LOGS})
    _, sources, _, claims = claims_for(ws, cfg)
    assert len(sources) == 5
    assert {c.name for c in claims} == {"inspect_ai"} and all(c.error is None for c in claims)


def test_a_log_still_being_written_is_recognised_by_its_journal(ws, cfg):
    """No header.json yet: the journal's start record stands in for it (the eval spec)."""
    src = zipfile.ZipFile(REAL / "log_read_sample.deflate.eval")
    out = ws.kb / "running.eval"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("_journal/start.json", "samples/1_epoch_1.json"):
            zf.writestr(name, src.read(name))
    assert inspect_ai.detect(_probe(out))
    files = _run(ws, cfg)
    assert (files["running.eval"].rows_in, files["running.eval"].evidence) == (1, 1)
    ev = _only(ws)
    assert (ev["task_name"], ev["model"], ev["provider"]) == ("popularity", "gemma3", "ollama")
    assert ev["recorded_at"] == "2025-07-05T13:59:40.952956Z" and ev["recorded_at_from"] == "record:events[0].timestamp"


# --- the real files, one by one ---------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_LOGS)
def test_each_real_log_gives_one_evidence_per_sample(ws, cfg, name):
    f = _run(ws, cfg, name)[name]
    assert (f.transform, f.rows_in, f.evidence, f.joined, f.quarantined, f.by_reason) == \
        ("inspect_ai", 1, 1, 0, 0, {})
    ev = _only(ws)
    assert ev["prompt"] and ev["response"] and ev["kind"] == "eval_sample" and ev["task_id"] == "1"
    assert "tc://" not in json.dumps(ev) and "attachment://" not in json.dumps(ev)
    assert trace(ws, ev["id"]).ok


def test_log_formats_2024_incorrect_answer(ws, cfg):
    _run(ws, cfg, "log_formats.json")
    ev = _only(ws)
    assert (ev["model"], ev["provider"], ev["task_name"]) == ("llama3.1", "ollama", "popularity")
    assert ev["prompt"].startswith("Is the following statement something you would say?\n")
    assert ev["messages"][0]["role"] == "system" and ev["messages"][0]["content"].startswith("\nPlease note:")
    assert ev["response"] == "No" and ev["signals"]["expected"] == " Yes"
    s = ev["signals"]
    assert (s["verdict"], s["eval_score"], s["stop_reason"], s["error"]) == ("fail", 0.0, "stop", None)
    assert [(x["name"], x["value"], x["normalized"], x["by"]) for x in s["scores"]] == \
        [("match", "I", 0.0, "automated")]
    assert (ev["prompt_tokens"], ev["completion_tokens"], ev["latency_ms"]) == (66, 2, None)
    # its first event, 12:53:13.264282-04:00 (transcript.events in this version), in UTC
    assert ev["recorded_at"] == "2024-10-15T16:53:13.264282Z"
    assert ev["recorded_at_from"] == "record:transcript.events[0].timestamp"


def test_input_task_model_graded_two_user_turns(ws, cfg):
    _run(ws, cfg, INPUT_TASK)
    ev = _only(ws)
    # two user messages: the prompt is the whole exchange, never the first turn paired with the answer
    assert ev["prompt"] == ("User: Hey there, hipster! Please answer any questions that I answer using the type of "
                            "lingo that Gen Z would use.\n\nUser: What is average low temperature in St. Paul, "
                            "Minnesota during the month of February?")
    assert ev["response"].startswith("Yo, in February, St. Paul usually chills")
    assert (ev["model"], ev["provider"], ev["task_name"]) == ("gpt-4o-mini", "openai", "input_task")
    s = ev["signals"]
    assert (s["verdict"], s["eval_score"], s["expected"]) == ("pass", 1.0, None)  # target ""
    assert [(x["name"], x["value"]) for x in s["scores"]] == [("model_graded_fact", "C")]
    assert (ev["prompt_tokens"], ev["completion_tokens"]) == (53, 46)  # the answer's call, not the grader's
    assert ev["recorded_at"] == "2024-11-05T18:31:45.581641Z"


def test_json_and_both_eval_archives_give_the_same_evidence(ws, cfg):
    names = ["log_read_sample.json", "log_read_sample.deflate.eval", "log_read_sample.zstd.eval"]
    files = _run(ws, cfg, *names)
    assert [files[n].evidence for n in names] == [1, 1, 1]
    rows = {r["provenance"]["source_file"].removeprefix("data/_kb/"): r for r in evidence_rows(ws)}
    assert rows["log_read_sample.zstd.eval"]["provenance"]["record"] == "samples/1_epoch_1.json"
    assert rows["log_read_sample.json"]["provenance"]["record"] == "$.samples[0]"
    content = [{k: v for k, v in rows[n].items() if k not in ("id", "source", "provenance")} for n in names]
    assert content[0] == content[1] == content[2]
    ev = rows["log_read_sample.json"]
    assert (ev["response"], ev["model"], ev["provider"]) == ("Yes\n", "gemma3", "ollama")
    assert ev["latency_ms"] == 2113.0  # total_time 2.113 s
    assert (ev["signals"]["verdict"], ev["signals"]["eval_score"], ev["signals"]["expected"]) == ("pass", 1.0, " Yes")
    # the .json carries local offsets (09:59:40.952956-04:00), the archives UTC: the same instant
    assert ev["recorded_at"] == "2025-07-05T13:59:40.952956Z"
    for n in names:
        assert trace(ws, rows[n]["id"]).ok


def test_scoring_the_real_logs(ws, cfg):
    _run(ws, cfg, *REAL_LOGS)
    score.run(ws, cfg)
    runs = scored_rows(ws)
    by_source = {r["source"]: (r["category"], r["rules_fired"]) for r in runs}
    assert by_source == {
        "log_formats": ("rejected", ["audit_fail", "low_eval_score", "no_approval"]),
        INPUT_TASK.removesuffix(".json"): ("accepted", []),
        "log_read_sample": ("accepted", []),
        "log_read_sample.deflate": ("accepted", []),
        "log_read_sample.zstd": ("accepted", []),
    }


# --- shapes the real files do not have, built from them --------------------------------------


def _log(name="log_formats.json"):
    return json.loads((REAL / name).read_text())


def test_tc_references_in_messages_are_resolved_and_a_missing_one_refused(ws, cfg):
    log = _log()
    sample = log["samples"][0]
    sample["messages"][1]["content"] = "tc://dfedc191e05d9d04e0c236656454a610"  # stored in transcript.content
    broken = json.loads(json.dumps(sample))
    broken["messages"][0]["content"] = "tc://00000000000000000000000000000000"
    log["samples"].append(broken)
    write_kb(ws, {"refs.json": json.dumps(log)})
    f = _run(ws, cfg)["refs.json"]
    assert (f.rows_in, f.evidence, f.by_reason) == (2, 1, {"missing_field": 1})
    assert _only(ws)["prompt"].startswith("Is the following statement something you would say?")
    (q,) = quarantine_rows(ws)
    assert "messages[0].content" in q["detail"] and "tc://00000000" in q["detail"]


def test_an_eval_that_errored_marks_its_samples_with_an_error(ws, cfg):
    log = _log("log_read_sample.json")
    log["status"] = "error"
    log["error"] = {"message": "RateLimitError('429')", "traceback": "..."}
    write_kb(ws, {"errored.json": json.dumps(log)})
    _run(ws, cfg)
    assert _only(ws)["signals"]["error"] == "eval status error: RateLimitError('429')"
    score.run(ws, cfg)
    assert _categories(ws)["1"][0] == "rejected" and "error" in _categories(ws)["1"][1]


def test_without_messages_the_input_and_output_make_the_conversation(ws, cfg):
    log = _log("log_read_sample.json")
    sample = log["samples"][0]
    sample["messages"] = []
    sample["input"] = [{"role": "user", "content": [{"type": "text", "text": "Say yes."}]}]
    sample["output"]["choices"][0]["stop_reason"] = "max_tokens"
    write_kb(ws, {"bare.json": json.dumps(log)})
    _run(ws, cfg)
    ev = _only(ws)
    assert (ev["prompt"], ev["response"], ev["signals"]["stop_reason"]) == ("Say yes.", "Yes\n", "max_tokens")
    score.run(ws, cfg)
    assert "truncated" in _categories(ws)["1"][1]


# --- the golden fixture, scored ---------------------------------------------------------------


def test_golden_fixture_counts_and_categories(ws, cfg):
    files = _run(ws, cfg, *[p.name for p in _inputs(GOLDEN)], folder=GOLDEN)
    got = {name.split("_")[1] + ("/no-samples" if "NoSamples" in name else ""):
           (f.rows_in, f.evidence, f.joined, f.quarantined, f.by_reason) for name, f in files.items()}
    assert got == {
        "bash-math": (9, 7, 0, 2, {"missing_field": 2}),           # no sample id; a body not in attachments
        "bash-math/no-samples": (1, 0, 0, 1, {"missing_field": 1}),  # --no-log-samples: the log itself
        "persona-honesty": (1, 1, 0, 0, {}),
        "capitals": (2, 1, 0, 1, {"invalid_json": 1}),              # a cut archive member
    }
    score.run(ws, cfg)
    runs = scored_rows(ws)
    assert sorted((r["task_id"], r["category"], r["rules_fired"]) for r in runs) == [
        ("1", "accepted", []),                                               # capitals: exact = true
        ("7", "rejected", ["error"]),                                        # answered right, but the eval errored
        ("q1", "accepted", []),                                              # epoch 1: C
        ("q1", "rejected", ["audit_fail", "low_eval_score", "no_approval"]),  # epoch 2: I
        ("q2", "rejected", ["truncated", "below_accept_score", "no_approval"]),  # max_tokens, graded P
        ("q3", "accepted", []),                                              # dict score, every key correct
        ("q4", "rejected", ["error", "no_approval"]),                        # the sandbox died, no score
        ("q5", "rejected", ["malformed_tool_call"]),                         # a tool call with parse_error
        ("q6", "rejected", ["error", "safety_flag", "audit_fail", "low_eval_score", "no_approval"]),  # filtered, N
    ]
