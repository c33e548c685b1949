"""Score + exports on a hand-made fixture (tests/fixtures/exports/): golden files, accounting,
the three SFT defences, secrets, pairing rules, staleness, edge cases, determinism."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import jsonschema
import orjson
import pytest

from conftest import FIXTURES, read_jsonl_file, tree_bytes, write_kb
from refinery import export, materialize, score
from refinery.exporters import sft
from refinery.config import load_config
from refinery.schemas import load_schema

FIXTURE = FIXTURES / "exports"
UPDATE = os.environ.get("REFINERY_UPDATE_GOLDEN") == "1"


def pipeline(ws, cfg, **kw):
    materialize.run(ws, cfg)
    s = score.run(ws, cfg)
    e = export.run(ws, cfg, **kw)
    return s, e


@pytest.fixture
def fixture_ws(ws):
    for p in FIXTURE.iterdir():
        if p.suffix in (".csv", ".jsonl") and not p.name.startswith("expected"):
            shutil.copy(p, ws.kb / p.name)
    return ws


def test_golden_exports(fixture_ws, cfg):
    ws = fixture_ws
    pipeline(ws, cfg)
    for name, rel in export.PATHS.items():
        got = (ws.exports / rel).read_bytes()
        golden = FIXTURE / f"expected_{name}.jsonl"
        if UPDATE:
            golden.write_bytes(got)
        assert got == golden.read_bytes(), f"{name} differs from {golden.name} (REFINERY_UPDATE_GOLDEN=1 to accept)"


def test_fixture_counts_and_accounting(fixture_ws, cfg):
    s, e = pipeline(fixture_ws, cfg)
    assert s.rows_in == s.scored == 16
    assert s.by_category == {"accepted": 8, "partially_accepted": 1, "rejected": 5, "needs_human_review": 2}
    ex = e.exports
    assert (ex["rag"]["rows"], ex["sft"]["rows"], ex["preference"]["rows"]) == (6, 5, 7)
    assert ex["preference"]["rows_out"] == 9  # rows used in at least one pair
    assert ex["rag"]["by_reason"] == {"category_excluded": 7, "duplicate_answer": 1, "pii_detected": 1,
                                      "secret_detected": 1}
    assert ex["sft"]["by_reason"] == {"category_excluded": 8, "duplicate_answer": 1, "pii_detected": 1,
                                      "secret_detected": 1}
    assert ex["preference"]["by_reason"] == {"category_excluded": 2, "duplicate_answer": 1, "missing_text": 1,
                                             "no_pair": 1, "pii_detected": 1, "secret_detected": 1}
    for name, x in ex.items():
        assert x["rows_in"] == x["rows_out"] + x["quarantined"], name
        q = list(export.refusals(fixture_ws, name))
        assert len(q) == x["quarantined"]
        assert Counter(r["reason"] for r in q) == x["by_reason"]
        assert all(r["stage"] in ("export", f"export-{name}") and r["preview"] is None
                   and r["raw_length"] is None for r in q)
        # what a merge refuses is in the export's own file; what reading refuses, in the shared one
        assert {r["stage"] for r in read_jsonl_file(fixture_ws.root / x["quarantine"])} <= {f"export-{name}"}
    # one record per refused row and reason, naming every export that refused it: a
    # needs_human_review row is one record for all three exports, not three
    shared = read_jsonl_file(fixture_ws.root / "exports/quarantine/export.jsonl")
    assert Counter(tuple(r["exports"]) for r in shared if r["reason"] == "category_excluded") == {
        ("rag", "sft", "preference"): 2, ("rag", "sft"): 5, ("sft",): 1}
    assert len({(r["provenance"]["line_offset"], r["provenance"]["source_file"], r["reason"]) for r in shared}) \
        == len(shared) == len({r["id"] for r in shared})


def test_every_output_row_validates_against_its_schema(fixture_ws, cfg):
    pipeline(fixture_ws, cfg)
    ws = fixture_ws
    checks = {"scored_run": [p for p in ws.scored_runs.rglob("*.jsonl")],
              "rag_sample": [ws.exports / export.PATHS["rag"]], "sft_sample": [ws.exports / export.PATHS["sft"]],
              "preference_pair": [ws.exports / export.PATHS["preference"]],
              "quarantine_record": list(ws.quarantine.glob("*.jsonl"))}
    n: Counter[str] = Counter()
    for schema_name, files in checks.items():
        validator = jsonschema.Draft202012Validator(load_schema(schema_name))
        for f in files:
            for row in read_jsonl_file(f):
                validator.validate(row)
                n[schema_name] += 1
    assert n.keys() == checks.keys() and n.total() > 40


def test_sft_takes_accepted_only_unless_include_partial(fixture_ws, cfg):
    pipeline(fixture_ws, cfg)
    sft = read_jsonl_file(fixture_ws.exports / export.PATHS["sft"])
    assert {r["quality_score"] for r in sft} == {"accepted"}
    export.run(fixture_ws, cfg, include_partial=True)
    sft = read_jsonl_file(fixture_ws.exports / export.PATHS["sft"])
    assert {r["quality_score"] for r in sft} == {"accepted", "partially_accepted"}


def test_schema_enum_refuses_forbidden_categories():  # defence 1
    from refinery.models import SftSample

    validator = jsonschema.Draft202012Validator(load_schema("sft_sample"))
    for bad in ("rejected", "needs_human_review"):
        assert not validator.is_valid({"quality_score": bad})
        with pytest.raises(ValueError):
            SftSample.model_validate({"id": "x", "instruction": "i", "response": "r", "quality_score": bad,
                                      "score": 0.1, "source": "s", "provenance": {
                                          "source_file": "f", "line_offset": 0, "sig_hash": "0" * 64,
                                          "recorded_at": None}})


def test_never_list_stops_a_rejected_row_even_if_admitted(fixture_ws, cfg, monkeypatch):  # defence 2
    materialize.run(fixture_ws, cfg)
    score.run(fixture_ws, cfg)
    monkeypatch.setattr(sft.Sft, "admits", lambda self, category, s: True)
    with pytest.raises(export.LeakError, match="about to be written to SFT"):
        export.run(fixture_ws, cfg)
    assert not (fixture_ws.exports / export.PATHS["sft"]).exists()


def test_reread_fails_loudly_and_publishes_nothing(fixture_ws, cfg, monkeypatch):  # defence 3
    pipeline(fixture_ws, cfg)
    before = tree_bytes(fixture_ws.exports)
    monkeypatch.setattr(sft.Sft, "admits", lambda self, category, s: True)
    monkeypatch.setattr(sft, "SFT_NEVER", frozenset())
    with pytest.raises(export.LeakError, match="must never be in SFT"):
        export.run(fixture_ws, cfg)
    assert tree_bytes(fixture_ws.exports) == before  # the previous exports are untouched


def test_reread_catches_a_mislabelled_row(fixture_ws, cfg):
    pipeline(fixture_ws, cfg)
    path = fixture_ws.exports / export.PATHS["sft"]
    rows = read_jsonl_file(path)
    # point an "accepted" SFT row at a scored run that is really rejected
    scored = [(p, i, r) for p in sorted(fixture_ws.scored_runs.rglob("*.jsonl"))
              for i, r in enumerate(read_jsonl_file(p)) if r["category"] == "rejected"]
    p, i, _ = scored[0]
    rows[0]["provenance"] = {**rows[0]["provenance"], "source_file": fixture_ws.rel(p), "line_offset": i}
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with pytest.raises(export.LeakError, match="its scored run is 'rejected'"):
        export.verify_sft(path, fixture_ws, {"accepted"})


def test_secrets_never_reach_an_export(fixture_ws, cfg):
    from refinery import sensitive
    from refinery.invariants import scanned_fields
    from refinery.sensitive.check import second_pass

    pipeline(fixture_ws, cfg)
    for rel in export.PATHS.values():
        for r in read_jsonl_file(fixture_ws.exports / rel):
            assert sensitive.scan(scanned_fields(r)) == [] and second_pass(scanned_fields(r)) == [], (rel, r["id"])
        assert "sk-live-" not in (fixture_ws.exports / rel).read_text()


def test_redact_mode_keeps_the_row_without_the_secret(fixture_ws):
    (fixture_ws.root / "refinery.toml").write_text('[export]\nsensitive = "redact"\n')
    cfg = load_config(fixture_ws.root)
    _, e = pipeline(fixture_ws, cfg)
    sft = (fixture_ws.exports / export.PATHS["sft"]).read_text()
    assert "[REDACTED:api_key]" in sft and "[REDACTED:email]" in sft
    assert "sk-live-" not in sft and "jane.doe@" not in sft
    assert e.exports["sft"]["redacted"] == {"api_key": 1, "email": 1}
    assert "secret_detected" not in e.exports["sft"]["by_reason"]


def test_a_row_the_redaction_leaves_a_secret_in_is_quarantined(fixture_ws, monkeypatch):
    # the re-scan after redaction is the guarantee: a redaction that misses (here: one that
    # changes nothing) must not let the row through
    from refinery import sensitive

    (fixture_ws.root / "refinery.toml").write_text('[export]\nsensitive = "redact"\n')  # small: in-process
    monkeypatch.setattr(sensitive, "redact", lambda value, allow=(): (value, []))
    _, e = pipeline(fixture_ws, load_config(fixture_ws.root))
    sft = (fixture_ws.exports / export.PATHS["sft"]).read_text()
    assert "sk-live-" not in sft and "jane.doe@" not in sft
    q = list(export.refusals(fixture_ws, "sft"))
    survived = [r for r in q if r["reason"] == "secret_detected" and r["detail"].endswith("survived redaction")]
    assert survived and e.exports["sft"]["by_reason"]["secret_detected"] == len(survived)


def test_preference_rules(fixture_ws, cfg):
    from refinery.normalize import normalize_text

    pipeline(fixture_ws, cfg)
    pairs = read_jsonl_file(fixture_ws.exports / export.PATHS["preference"])
    assert pairs
    for p in pairs:
        assert p["chosen_id"] != p["rejected_id"]
        assert normalize_text(p["chosen"]) != normalize_text(p["rejected"])
        assert p["chosen_score"] > p["rejected_score"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    # the malformed tool call is shown the way it was made, on the rejected side
    assert any('{"tool":"lookup_invoice"' in p["rejected"] for p in pairs)


def row(id_, cat, score, text, tk="tk-1", calls=()):
    return {"task_key": tk, "id": id_, "category": cat, "score": score, "text": text, "text_key": text.lower(),
            "prompt": "p", "source": "s", "prov": {}, "system": None,
            "reply": [{"role": "assistant", "content": "" if calls else text, "name": None, "tool_call_id": None,
                       "tool_calls": [{"id": None, "name": n, "arguments": a, "problem": None}
                                      for n, a in calls] or None}]}


def test_pair_group_single_answer_ties_identical_texts_and_limit():
    assert pair_group([row("a", "accepted", 0.9, "x")]) == ([], {"a": "no_pair"})
    # a tie: no strictly better answer, so no pair
    picked, left = pair_group([row("a", "partially_accepted", 0.3, "x"), row("b", "rejected", 0.3, "y")])
    assert picked == [] and left == {"a": "no_pair", "b": "no_pair"}
    # identical texts on both sides never pair
    picked, left = pair_group([row("a", "accepted", 0.9, "Same"), row("b", "rejected", 0.1, "same")])
    assert picked == [] and set(left) == {"a", "b"}
    # every answer used once before any is used twice; the limit holds
    rows = [row(f"c{i}", "accepted", 0.9 - i / 100, f"good {i}") for i in range(3)] + \
           [row(f"r{i}", "rejected", 0.1 + i / 100, f"bad {i}") for i in range(12)]
    picked, left = export.pair_group(rows, 8)
    assert len(picked) == 8
    used = {x["id"] for pair in picked for x in pair}
    assert {"c0", "c1", "c2"} <= used
    assert all(left[i] == "pair_limit" for i in left)
    assert len(used) + len(left) == len(rows)


def test_a_rejected_tool_call_the_chosen_text_writes_out_is_not_paired():
    sql = {"query": "SELECT count(*) FROM tickets"}
    # the chosen text, which makes no call, writes the rejected call out (a run that stopped after the right call)
    written = row("c", "accepted", 1.0, "I ran SELECT count(*) FROM tickets: 1,326 rows.")
    stopped = row("r", "rejected", 0.0, '{"name":"run_sql",...}', calls=[("run_sql", sql)])
    assert pair_group([written, stopped]) == ([], {"c": "same_tool_call", "r": "same_tool_call"})
    # a chosen answer that makes the same call and goes on is a fair pair: DPO learns to go on after the result
    made = row("c", "accepted", 1.0, "1,326 rows.", calls=[("run_sql", sql)])
    made["reply"][0]["content"] = "1,326 rows."
    assert pair_group([made, stopped])[0] == [("c", "r")]
    # a call made badly ("tool" for "name") is the point of its pair, whatever the chosen text says
    bad = row("r4", "rejected", 0.0, '{"tool":"run_sql",...}', calls=[("run_sql", sql)])
    bad["reply"][0]["tool_calls"][0]["problem"] = "tool_key_instead_of_name"
    assert pair_group([written, bad])[0] == [("c", "r4")]
    # a short value the text happens to mention is not a written-out call: the decline of a drop pairs with it
    declined = row("c2", "accepted", 1.0, "I won't drop the orders table without approval.")
    drop = row("r5", "rejected", 0.0, '{"name":"drop_table",...}', calls=[("drop_table", {"table": "orders"})])
    assert pair_group([declined, drop])[0] == [("c2", "r5")]
    # a different (wrong) call is a real preference; so is a rejected answer with text
    wrong = row("r2", "rejected", 0.0, '{"name":"run_sql","arguments":"DROP"}',
                calls=[("run_sql", {"query": "DROP TABLE t"})])
    assert pair_group([written, wrong])[0] == [("c", "r2")]
    chatty = row("r3", "rejected", 0.0, "no idea", calls=[("run_sql", sql)])
    chatty["reply"][0]["content"] = "no idea"
    assert pair_group([written, chatty])[0] == [("c", "r3")]
    # with another partner, the chosen answer pairs; only the stopped run is left, and says why
    assert pair_group([written, stopped, wrong]) == ([("c", "r2")], {"r": "same_tool_call"})


def test_a_reply_is_the_conversation_after_the_question_or_the_answer_alone():
    call = {"id": "c1", "name": "run_sql", "arguments": {"q": 1}, "problem": None}
    msg = {"name": None, "tool_calls": None, "tool_call_id": None}
    ev = {"response": "1,312.", "tool_calls": [call], "messages": [
        {**msg, "role": "user", "content": "How many?"}, {**msg, "role": "assistant", "content": None,
                                                          "tool_calls": [call]},
        {**msg, "role": "tool", "content": "[1312]", "tool_call_id": "c1"},
        {**msg, "role": "assistant", "content": "1,312."}]}
    assert [m["role"] for m in export.reply(ev)] == ["assistant", "tool", "assistant"]
    # only a tool result after the question (no assistant turn): the answer as one assistant message
    ev["messages"] = ev["messages"][:1] + ev["messages"][2:3]
    assert export.reply(ev) == [{**msg, "role": "assistant", "content": "1,312.", "tool_calls": [call]}]
    ev["messages"] = None
    assert export.reply(ev)[0]["content"] == "1,312."


def pair_group(rows):
    picked, left = export.pair_group(rows, 8)
    return [(c["id"], r["id"]) for c, r in picked], {k: v.value for k, v in left.items()}


def test_stale_scores_are_refused(fixture_ws, cfg):
    pipeline(fixture_ws, cfg)
    ev = sorted(fixture_ws.evidence.rglob("*.jsonl"))[0]
    ev.write_bytes(ev.read_bytes().replace(b'"score"', b'"score"', 1) + b"")
    with open(ev, "ab") as f:
        f.write(b"\n")
    with pytest.raises(score.StaleInputError, match="changed since it was scored"):
        export.run(fixture_ws, cfg)


def test_exports_need_scores_first(ws, cfg):
    with pytest.raises(score.StaleInputError, match="run `refinery score` first"):
        export.run(ws, cfg)
    with pytest.raises(score.StaleInputError, match="run `refinery materialize` first"):
        score.run(ws, cfg)


def test_score_quarantines_an_unreadable_evidence_line(fixture_ws, cfg):
    materialize.run(fixture_ws, cfg)
    ev = sorted(fixture_ws.evidence.rglob("*.jsonl"))[0]
    with open(ev, "ab") as f:
        f.write(b'{"truncated": \n{"id": "ev-1"}\n')
    s = score.run(fixture_ws, cfg)
    assert s.to_json()["by_reason"] == {"invalid_evidence": 2}
    assert s.rows_in == s.scored + s.quarantined
    export.run(fixture_ws, cfg)  # the exports line up with the scored runs that exist


def test_empty_sources_and_only_bad_lines(ws, cfg):
    write_kb(ws, {"eval.csv": "", "human_feedback.jsonl": "{broken\n\xff\n"})
    s, e = pipeline(ws, cfg)
    assert s.rows_in == 0
    for name, x in e.exports.items():
        assert x["rows"] == 0 and x["rows_in"] == 0, name
        assert (ws.exports / export.PATHS[name]).read_bytes() == b""


def test_determinism_and_worker_count_do_not_change_bytes(fixture_ws):
    cfg1 = load_config(fixture_ws.root, None, {"materialize": {"workers": 1}})
    pipeline(fixture_ws, cfg1)
    first = tree_bytes(fixture_ws.exports) | tree_bytes(fixture_ws.scored_runs)
    cfg2 = load_config(fixture_ws.root, None, {"materialize": {"workers": 2, "parallel_min_bytes": 0}})
    pipeline(fixture_ws, cfg2)
    assert tree_bytes(fixture_ws.exports) | tree_bytes(fixture_ws.scored_runs) == first


def test_merge_units_and_buckets_do_not_change_bytes(fixture_ws, monkeypatch):
    """The merges run as units side by side — runs of files (dedup decided across all of them
    first), task buckets —: however the work is cut, the exports are the same bytes."""
    cfg = load_config(fixture_ws.root, None, {"materialize": {"workers": 1}})
    pipeline(fixture_ws, cfg)
    whole = tree_bytes(fixture_ws.exports)
    monkeypatch.setattr(export, "BUCKET_BYTES", 256)  # many task buckets: each a range of task keys
    export.run(fixture_ws, cfg)
    assert tree_bytes(fixture_ws.exports) == whole
    monkeypatch.setattr(export, "UNIT_BYTES", 1)  # a unit per file
    split = load_config(fixture_ws.root, None, {"materialize": {"workers": 2, "parallel_min_bytes": 0}})
    result = export.run(fixture_ws, split)
    assert tree_bytes(fixture_ws.exports) == whole
    assert result.exports["rag"]["by_reason"]["duplicate_answer"] > 0  # the dedup crossed units


def test_dedup_keeps_the_first_of_each_key_in_file_order_across_units(tmp_path, monkeypatch):
    from array import array

    keys = [array("Q", [1, 2, 1]), array("Q", [2, 3]), array("Q", [3, 1, 4])]
    repeated = export._duplicates(keys)
    assert {i: list(lines) for i, lines in repeated.items()} == {0: [2], 1: [0], 2: [0, 1]}
    for i, n in enumerate(len(k) for k in keys):
        export.part_path(tmp_path, "rag", i).write_bytes(b"{}\n" * n)
    near = {1: export.NearRefusals("rag", 0.8, [1], [0xA], [0.85]),  # file → its lines near a kept row
            2: export.NearRefusals("rag", 0.8, [2], [0xB], [0.9])}
    detail = "near-duplicate of rag-{:016x}, kept in the export (estimated Jaccard similarity {}; threshold 0.8)"
    one = export._merge_units("rag", tmp_path, 1, [3, 2, 3], repeated, near)
    assert [len(u.parts) for u in one] == [3] and one[0].duplicates == {2, 3, 5, 6}  # lines across the run
    assert dict(one[0].near) == {4: detail.format(0xA, "0.850"), 7: detail.format(0xB, "0.900")}
    assert 5 not in one[0].near and 4 not in one[0].duplicates
    # the audit finds the kept row's id in each detail by the pattern written beside the writer
    assert [export.NEAR_DETAIL.fullmatch(d)["row"] for d in one[0].near.values()] == [
        "rag-000000000000000a", "rag-000000000000000b"]
    monkeypatch.setattr(export, "UNIT_BYTES", 1)
    each = export._merge_units("rag", tmp_path, 1, [3, 2, 3], repeated, near)
    assert [u.duplicates for u in each] == [{2}, {0}, {0, 1}]
    assert [dict(u.near) for u in each] == [{}, {1: detail.format(0xA, "0.850")}, {2: detail.format(0xB, "0.900")}]
    # a unit travels to a worker compact and answers there as before
    import pickle

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        again = pickle.loads(pickle.dumps(one[0], protocol))
        assert again.duplicates == {2, 3, 5, 6} and dict(again.near) == dict(one[0].near)
        assert pickle.loads(pickle.dumps(export.Lines(), protocol)) == set()  # empty, too


def test_the_shared_quarantine_is_the_same_whichever_exports_a_command_writes(fixture_ws, cfg):
    """With the same settings, the shared file a single export's command leaves is byte for byte
    the one `export-all` writes (its decisions spliced in, the others' kept); with no shared file
    yet, it names only the export written."""
    pipeline(fixture_ws, cfg)
    shared = fixture_ws.quarantine / "export.jsonl"
    every = shared.read_bytes()
    assert b'"exports":["rag","sft","preference"]' in every
    for name in export.EXPORTS:
        export.run(fixture_ws, cfg, exports=(name,))
        assert shared.read_bytes() == every, name
    shared.unlink()  # nothing to keep the others' from: this run's decisions stand for every export
    export.run(fixture_ws, cfg, exports=("sft",))
    assert shared.read_bytes() == every


def test_a_single_export_keeps_the_other_exports_refusals_as_their_run_decided(fixture_ws, cfg):
    """`export-rag` alone rewrites the shared quarantine with RAG's decisions and keeps SFT's
    and preference's as the command that wrote those exports decided them — even when that
    command ran with other settings (SFT with --include-partial here)."""
    pipeline(fixture_ws, cfg)
    export.run(fixture_ws, cfg, include_partial=True)
    shared = fixture_ws.quarantine / "export.jsonl"
    before = shared.read_bytes()
    others = {e: list(export.refusals(fixture_ws, e)) for e in ("sft", "preference")}
    export.run(fixture_ws, cfg, exports=("rag",))  # the config's accepted-only: nothing of SFT's changes
    assert shared.read_bytes() == before
    narrow = load_config(fixture_ws.root, None, {"export": {"rag_categories": ["accepted"]}})
    result = export.run(fixture_ws, narrow, exports=("rag",))
    assert {e: list(export.refusals(fixture_ws, e)) for e in others} == others
    rag = list(export.refusals(fixture_ws, "rag"))
    assert len(rag) == result.exports["rag"]["quarantined"] and Counter(r["reason"] for r in rag) == \
        result.exports["rag"]["by_reason"]
    assert any(r["detail"] == "category partially_accepted is not taken" for r in rag)
    with pytest.raises(ValueError, match="no export named nope"):
        export.run(fixture_ws, cfg, exports=("nope",))


def _refusal(line: int, reason: str, exports: list[str]) -> dict:
    return {"id": f"q-{line}-{reason}", "stage": "export", "exports": exports, "reason": reason,
            "provenance": {"source_file": "data/scored-runs/a.jsonl", "line_offset": line}}


def test_splicing_merges_every_record_of_a_row_by_reason(tmp_path):
    """One row refused for a phone by preference (this run), for a password by RAG and for the
    phone by SFT (earlier commands): one record per reason, first seen first, never two alike."""
    new, old, dest = tmp_path / "new.jsonl", tmp_path / "old.jsonl", tmp_path / "out.jsonl"
    new.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [
        _refusal(4, "category_excluded", ["preference"]), _refusal(4, "pii_detected", ["preference"]),
        _refusal(7, "missing_text", ["rag", "sft", "preference"])]))
    old.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [
        _refusal(4, "secret_detected", ["rag"]), _refusal(4, "pii_detected", ["sft"]),
        _refusal(5, "category_excluded", ["rag", "sft"])]))
    rows, _ = export._splice_shared(new, old, ("preference",), dest)
    got = [(r["provenance"]["line_offset"], r["reason"], r["exports"]) for r in read_jsonl_file(dest)]
    assert got == [(4, "category_excluded", ["preference"]), (4, "pii_detected", ["sft", "preference"]),
                   (4, "secret_detected", ["rag"]), (5, "category_excluded", ["rag", "sft"]),
                   (7, "missing_text", ["preference"])] and rows == 5
    old.write_bytes(orjson.dumps({**_refusal(4, "pii_detected", ["sft"]), "reason": None}) + b"\n")
    with pytest.raises(export.SharedQuarantineDamaged, match="old.jsonl:0 is not an export refusal"):
        export._splice_shared(new, old, ("preference",), dest)


def test_composition_stats_next_to_each_export(fixture_ws, cfg):
    pipeline(fixture_ws, cfg)
    rag = orjson.loads((fixture_ws.exports / "rag" / "playbooks.stats.json").read_bytes())
    assert rag["rows"] == 6 and rag["tool_using"] + rag["direct_answers"] == 6
    assert set(rag["by_source"]) == {"eval", "agent_transcripts"} and rag["mean_answer_chars"] > 0
    pref = orjson.loads((fixture_ws.exports / "preference" / "chosen_rejected.stats.json").read_bytes())
    assert pref["pairs"] == 7 and pref["tasks"] == 3
