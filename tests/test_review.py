"""`refinery review export`: the human review queue, every needs_human_review scored run once,
in a file for tools (JSONL) and one for people (CSV), redacted, each row traceable; and
`refinery review import`: a person's decisions on it, back as a source stream that the next
run applies — every line of a decision file taken or refused with its reason."""

from __future__ import annotations

import csv
import io

import orjson
import pytest
from typer.testing import CliRunner

from refinery import decisions, review, sensitive
from refinery.cli import app
from refinery.config import load_config
from refinery.runs import load_run, resolve_run, run_all


def test_the_queue_holds_every_scored_run_left_to_a_person_once(sample_run, ws):
    result = CliRunner().invoke(app, ["review", "export", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in (ws.root / review.QUEUE_DIR / "queue.jsonl").read_bytes().splitlines()]
    _, receipts, _ = load_run(ws, resolve_run(ws, None))
    assert len(rows) == receipts["score"]["by_category"]["needs_human_review"] > 0
    assert len({r["review_id"] for r in rows}) == len(rows)
    assert f"{len(rows):,} scored runs to review" in result.output
    assert any(r["redacted"] for r in rows)  # the sample plants secrets in some of them
    for r in rows:  # its provenance is its scored-run line, which is that row and left to a person
        p = r["provenance"]
        line = (ws.root / p["source_file"]).read_bytes().splitlines()[p["line_offset"]]
        sr = orjson.loads(line)
        assert (sr["id"], sr["category"]) == (r["review_id"], "needs_human_review")
        assert [f["rule"] for f in r["rules_fired"]] == sr["rules_fired"]
        assert all(f["why"] for f in r["rules_fired"])
        # what a person reads holds no secret or personal data
        assert sensitive.first_finding([(k, r[k]) for k in ("prompt", "response", "tool_calls") if r[k]]) is None
    table = list(csv.reader(io.StringIO((ws.root / review.QUEUE_DIR / "queue.csv").read_text())))
    assert tuple(table[0]) == review.CSV_COLUMNS
    assert [row[0] for row in table[1:]] == [r["review_id"] for r in rows]
    assert all(row[-len(review.DECISION_COLUMNS):] == [""] * len(review.DECISION_COLUMNS) for row in table[1:])
    from refinery import report  # the run's page shows the queue: its size, by source, its first rows

    page = report.build(ws).read_text()
    assert f">{len(rows):,}</a> scored runs for a person</h2>" in page and rows[0]["review_id"] in page
    before = {p.name: p.read_bytes() for p in (ws.root / review.QUEUE_DIR).iterdir()}
    review.export_queue(ws, load_config(ws.root))
    assert {p.name: p.read_bytes() for p in (ws.root / review.QUEUE_DIR).iterdir()} == before  # same run, same bytes


def test_a_cell_a_spreadsheet_would_read_as_a_formula_is_kept_text():
    assert [review._cell(t) for t in ("=SUM(A1)", "+1", "-x", "@cmd", "plain", "")] == \
        ["'=SUM(A1)", "'+1", "'-x", "'@cmd", "plain", ""]


def test_no_scored_runs_is_a_clear_error(ws):
    result = CliRunner().invoke(app, ["review", "export", "--workspace", str(ws.root)])
    assert result.exit_code == 2 and "run `refinery score` first" in result.output


# --- review import: a person's decisions, back as evidence ---------------------------------

DECIDED_AT = "2026-11-28T09:30:00Z"
STORED_AT = "2026-11-28T09:30:00.000000Z"  # as the stream stores a time


def _queue(ws) -> list[dict]:
    review.export_queue(ws, load_config(ws.root))
    return [orjson.loads(line) for line in (ws.root / review.QUEUE_DIR / "queue.jsonl").read_bytes().splitlines()]


def _plain(rows: list[dict]) -> list[dict]:
    """Queue rows a test can follow into every export: a prompt, a text answer, nothing redacted."""
    return [r for r in rows if r["prompt"] and r["response"] and not r["redacted"] and not r["tool_calls"]]


def _write_csv(path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(review.CSV_COLUMNS), *rows])


def _decided(row: dict, decision: str, answer: str = "", reviewer: str = "dana", note: str = "") -> list[str]:
    """A queue.csv line as a reviewer leaves it (the row's own cells, then the decision's)."""
    return [row["review_id"], row["source"], row["task_name"] or "", row["prompt"], row["response"], "", "", "",
            "", decision, answer, reviewer, note]


def _import(ws, path, *extra):
    return CliRunner().invoke(app, ["review", "import", str(path), "--workspace", str(ws.root),
                                    "--decided-at", DECIDED_AT, *extra])


def _trees(ws) -> dict[str, bytes]:
    return {p.relative_to(ws.root).as_posix(): p.read_bytes() for tree in ("data/evidence", "data/scored-runs",
                                                                           "exports")
            for p in sorted((ws.root / tree).rglob("*")) if p.is_file()}


def _scored(ws) -> dict[str, dict]:
    return {sr["id"]: sr for p in ws.scored_runs.rglob("*.jsonl")
            for sr in map(orjson.loads, p.read_bytes().splitlines())}


def test_decisions_move_their_rows_and_a_correction_becomes_a_preference_pair(sample_run, ws, tmp_path):
    queue = _queue(ws)
    plain = _plain(queue)
    # one row per decision, each from its own task (a decision row shares its task with the original)
    picked = list({r["task_key"]: r for r in plain}.values())[:3]
    accept, reject, correct = picked
    fixed = "Corrected by a reviewer: refund the second charge and confirm it in writing."
    decisions_csv = tmp_path / "decisions.csv"
    _write_csv(decisions_csv, [_decided(accept, "accept"), _decided(reject, "Rejected", note="wrong total"),
                               _decided(correct, "correct", fixed, reviewer="lee"),
                               _decided(queue[-1], "")])  # left for later
    result = _import(ws, decisions_csv)
    assert result.exit_code == 0, result.output
    assert "3 decisions imported (accept 1, reject 1, correct 1)" in result.output
    assert "1 row undecided" in result.output
    stream = ws.kb / "human_reviews.jsonl"
    lines = [orjson.loads(x) for x in stream.read_bytes().splitlines()]
    assert [(x["review_id"], x["decision"], x["reviewer"], x["decided_at"]) for x in lines] == [
        (accept["review_id"], "accept", "dana", STORED_AT), (reject["review_id"], "reject", "dana", STORED_AT),
        (correct["review_id"], "correct", "lee", STORED_AT)]
    assert lines[1]["note"] == "wrong total" and lines[2]["corrected_answer"] == fixed
    before = _scored(ws)
    for x in lines:  # each decision names the evidence line it was made on, and holds what was read
        ev_line = (ws.root / x["reviewed"]["source_file"]).read_bytes().splitlines()[x["reviewed"]["line_offset"]]
        ev = orjson.loads(ev_line)
        assert ev["id"] == x["review_id"] and x["answer_sha256"] == decisions.answer_sha256(ev)
        assert x["reviewed"] == before[x["review_id"]]["provenance"]
    log = [orjson.loads(x) for x in (ws.root / review.IMPORT_LOG).read_bytes().splitlines()]
    assert [e["outcome"] for e in log] == ["imported"] * 3 + ["undecided"]
    assert [e["line"] for e in log] == [2, 3, 4, 5]
    # the queue leaves out what is decided and waits for the next run
    assert len(_queue(ws)) == len(queue) - 3

    outcome = run_all(ws, load_config(ws.root))
    assert outcome.exit_code == 0
    # the single pass applies the decisions as the stages one by one do
    single = _trees(ws)
    staged = run_all(ws, load_config(ws.root), force=True, single_pass=False)
    assert _trees(ws) == single and {s: r["receipt_hash"] for s, r in staged.receipts.items()} == \
        {s: r["receipt_hash"] for s, r in outcome.receipts.items()}
    assert "data/_kb/human_reviews.jsonl" in {i["path"] for i in outcome.receipts["score"]["inputs"]}
    after = _scored(ws)
    assert (after[accept["review_id"]]["category"], after[accept["review_id"]]["score"]) == ("accepted", 1.0)
    assert "human_review_accept" in after[accept["review_id"]]["rules_fired"]
    assert after[reject["review_id"]]["category"] == "rejected"
    assert "human_review_reject" in after[reject["review_id"]]["rules_fired"]
    assert after[correct["review_id"]]["category"] == "rejected"
    assert "human_review_corrected" in after[correct["review_id"]]["rules_fired"]
    # every other row is scored as before
    moved = {accept["review_id"], reject["review_id"], correct["review_id"]}
    assert {k: v["category"] for k, v in after.items() if k in before and k not in moved} == \
        {k: v["category"] for k, v in before.items() if k not in moved}
    # each decision is evidence of its own, traceable to its line in the stream
    mine = [sr for sr in after.values() if sr["source"] == "human_reviews"]
    assert sorted(sr["category"] for sr in mine) == ["accepted", "accepted", "rejected"]
    evidence = {ev["id"]: ev for p in ws.evidence.rglob("human_reviews.jsonl")
                for ev in map(orjson.loads, p.read_bytes().splitlines())}
    assert {ev["provenance"]["source_file"] for ev in evidence.values()} == {"data/_kb/human_reviews.jsonl"}
    new = next(ev for ev in evidence.values() if ev["response"] == fixed)
    assert new["prompt"] == correct["prompt"] and new["signals"]["approver"] == "lee"
    assert after[new["id"]]["task_key"] == after[correct["review_id"]]["task_key"]
    # the corrected answer reaches SFT, and is paired over the original
    sft = [orjson.loads(x) for x in (ws.root / "exports/sft/instruction_response.jsonl").read_bytes().splitlines()]
    assert any(r["response"] == fixed for r in sft)
    pairs = [orjson.loads(x) for x in (ws.root / "exports/preference/chosen_rejected.jsonl").read_bytes().splitlines()]
    assert any((p["chosen_id"], p["rejected_id"], p["chosen"]) == (new["id"], correct["review_id"], fixed)
               for p in pairs)
    # `refinery trace` walks the corrected answer's SFT row back to the decision, and on to the row decided on
    from refinery.trace import trace

    t = trace(ws, next(r["id"] for r in sft if r["response"] == fixed))
    assert t.ok and [c.label for c in t.chains] == ["row", "decided on"]
    assert t.chains[1].hops[-2].id == correct["review_id"] and t.chains[1].ok
    # the queue has shrunk by the three; importing the same file again takes nothing twice
    assert len(_queue(ws)) == len(queue) - 3
    again = _import(ws, decisions_csv)
    assert again.exit_code == 0 and "0 decisions imported" in again.output and "3 already imported" in again.output
    assert [orjson.loads(x) for x in stream.read_bytes().splitlines()] == lines


def test_a_bad_decision_file_is_refused_line_by_line_and_the_good_lines_are_taken(sample_run, ws, tmp_path):
    queue = _queue(ws)
    rows = _plain(queue)
    accepted = next(sr for sr in _scored(ws).values() if sr["category"] == "accepted")
    not_in_review = dict(rows[0], review_id=accepted["id"])
    unknown = dict(rows[0], review_id="ev-0000000000000000")
    lines = [
        _decided(rows[0], "accept"),                      # 2 taken
        _decided(rows[0], "accept"),                      # 3 duplicate
        _decided(rows[1], "accept"), _decided(rows[1], "reject"),   # 4, 5 conflicting
        _decided(unknown, "accept"),                      # 6 unknown_id
        _decided(not_in_review, "reject"),                # 7 not_in_review
        _decided(rows[2], "maybe"),                       # 8 bad_decision
        _decided(rows[3], "accept", reviewer=""),         # 9 missing_reviewer
        _decided(rows[4], "correct"),                     # 10 missing_answer
        _decided(rows[5], "reject", answer="something"),  # 11 answer_not_allowed
        ["", "x", "", "", "", "", "", "", "", "accept", "", "dana", ""],  # 12 missing_id
        ["only", "three", "cells"],                       # 13 bad_line
    ]
    path = tmp_path / "decisions.csv"
    _write_csv(path, lines)
    result = _import(ws, path)
    assert result.exit_code == 2
    assert "1 decision imported (accept 1)" in result.output
    expected = {3: "duplicate", 4: "conflicting", 5: "conflicting", 6: "unknown_id", 7: "not_in_review",
                8: "bad_decision", 9: "missing_reviewer", 10: "missing_answer", 11: "answer_not_allowed",
                12: "missing_id", 13: "bad_line"}
    for line, problem in expected.items():
        assert f"{path}:{line}: " in result.output and f": {problem}: " in result.output
    log = {e["line"]: e for e in map(orjson.loads, (ws.root / review.IMPORT_LOG).read_bytes().splitlines())}
    assert {n: e["outcome"] for n, e in log.items()} == {2: "imported", **expected}
    assert all(e["fix"] == review.PROBLEMS[e["outcome"]] for n, e in log.items() if n != 2)
    stream = [orjson.loads(x) for x in (ws.kb / "human_reviews.jsonl").read_bytes().splitlines()]
    assert [(x["review_id"], x["decision"]) for x in stream] == [(rows[0]["review_id"], "accept")]
    # deciding the same row otherwise later is refused too; the stream keeps the first decision
    later = tmp_path / "later.jsonl"
    later.write_bytes(orjson.dumps({"review_id": rows[0]["review_id"], "decision": "reject", "reviewer": "sam"}))
    result = _import(ws, later)
    assert result.exit_code == 2 and "conflicts_earlier" in result.output and "already decided accept by dana" \
        in result.output
    assert len((ws.kb / "human_reviews.jsonl").read_bytes().splitlines()) == 1


def test_a_file_that_is_no_decision_file_is_a_clear_error(sample_run, ws, tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("a,b\n1,2\n")
    result = _import(ws, path)
    assert result.exit_code == 2 and "no review_id and decision columns" in result.output


def test_a_decision_holds_only_while_its_row_reads_as_it_was_reviewed():
    from refinery.config import ScoreConfig
    from refinery.policy import score_record

    ev = {"id": "ev-1", "kind": "run", "prompt": "p", "messages": None, "response": "an answer", "tool_calls": [],
          "signals": {"error": None, "exit_status": None, "tool_call_count": None, "stop_reason": "stop",
                      "safety_flags": [], "eval_score": None, "human_rating": None, "approved": None,
                      "verdict": None, "preference": None, "trust": None}}
    cfg = ScoreConfig()
    assert score_record(ev, cfg)[0] == "needs_human_review"

    def said(*decided: tuple[str, str]) -> decisions.Reviews:
        return decisions.Reviews({"ev-1": tuple(decisions.Decision("ev-1", d, digest, "dana", None, None, DECIDED_AT)
                                               for d, digest in decided)})

    digest = decisions.answer_sha256(ev)
    assert score_record(ev, cfg, said(("accept", digest)))[:2] == ("accepted", 1.0)
    assert score_record(ev, cfg, said(("reject", digest)))[:2] == ("rejected", 0.0)
    category, _, fired = score_record(ev, cfg, said(("accept", "0" * 64)))
    assert (category, fired[-1]) == ("needs_human_review", "human_review_stale")
    assert score_record(ev, cfg, said(("accept", digest), ("reject", digest)))[2][-1] == "human_review_conflict"
    # a decision on an older reading does not get in the way of one on this reading
    assert score_record(ev, cfg, said(("reject", "0" * 64), ("accept", digest)))[0] == "accepted"
    # a hard failure still rejects, whatever a person said
    broken = dict(ev, signals=dict(ev["signals"], error="timeout"))
    assert score_record(broken, cfg, said(("accept", decisions.answer_sha256(broken))))[0] == "rejected"


def test_a_correction_is_paired_over_the_answer_it_replaced_first():
    from refinery.exporters.preference import pair_group

    def row(rid, category, score, text, **flags):
        return {"id": rid, "category": category, "score": score, "text_key": text, "source": "s", "reply": [],
                "text": text, "task_key": "tk-1", "correction": False, "replaced": False, **flags}

    others = [row(f"ev-{i:02d}", "rejected", 0.0, f"bad {i}") for i in range(10)]
    rows = [row("ev-fix", "accepted", 1.0, "fixed", correction=True), row("ev-zz", "accepted", 1.0, "good"),
            *others, row("ev-orig", "rejected", 0.0, "original", replaced=True)]
    picked, _ = pair_group(rows, 1)
    assert [(c["id"], r["id"]) for c, r in picked] == [("ev-fix", "ev-orig")]
    # without the review's flags the same rows pair by score and id, as before
    plain = [dict(r, correction=False, replaced=False) for r in rows]
    assert [(c["id"], r["id"]) for c, r in pair_group(plain, 1)[0]] == [("ev-fix", "ev-00")]


def test_exporting_again_never_writes_over_decisions_not_imported_yet(sample_run, ws):
    queue = _queue(ws)
    path = ws.root / review.QUEUE_DIR / "queue.csv"
    table = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    table[1][table[0].index("decision")], table[1][table[0].index("reviewer")] = "accept", "bob"
    _write_csv(path, table[1:])
    before = path.read_bytes()
    result = CliRunner().invoke(app, ["review", "export", "--workspace", str(ws.root)])
    assert result.exit_code == 2 and "1 decision not imported yet (line 2)" in result.output
    assert path.read_bytes() == before
    assert _import(ws, path).exit_code == 0  # taken in: the queue can be written again, less that row
    assert len(_queue(ws)) == len(queue) - 1


@pytest.mark.parametrize("stored", ["gzip", "named-in-refinery.toml", "byte-order-mark"])
def test_score_moves_a_row_exactly_when_materialize_takes_its_decision(sample_run, ws, tmp_path, stored):
    """score reads the stream as materialize does, whatever way it is stored: a row moves iff its
    decision became evidence."""
    import gzip

    row = _plain(_queue(ws))[0]
    path = tmp_path / "d.csv"
    _write_csv(path, [_decided(row, "reject")])
    assert _import(ws, path).exit_code == 0
    stream = ws.kb / "human_reviews.jsonl"
    data = stream.read_bytes()
    if stored == "gzip":
        (ws.kb / "human_reviews.jsonl.gz").write_bytes(gzip.compress(data))
        stream.unlink()
    elif stored == "named-in-refinery.toml":
        (ws.kb / "decisions").mkdir()
        (ws.kb / "decisions" / "week48.jsonl").write_bytes(data)
        stream.unlink()
        (ws.root / "refinery.toml").write_text('[sources.week48]\nmatch = "decisions/*.jsonl"\n'
                                                'importer = "human_reviews"\n')
    else:
        stream.write_bytes(b"\xef\xbb\xbf" + data)
    assert run_all(ws, load_config(ws.root)).exit_code == 0
    decided = [ev for p in ws.evidence.rglob("*.jsonl") for ev in map(orjson.loads, p.read_bytes().splitlines())
               if ev["kind"] == "human_review"]
    assert len(decided) == 1 and decided[0]["signals"]["approved"] is False
    assert _scored(ws)[row["review_id"]]["category"] == "rejected"


def test_a_stream_line_materialize_refuses_moves_no_row(sample_run, ws, tmp_path):
    row = _plain(_queue(ws))[0]
    path = tmp_path / "d.csv"
    _write_csv(path, [_decided(row, "correct", "A long corrected answer. " * 2000)])
    assert _import(ws, path).exit_code == 0
    longest = max(len(line) for p in ws.kb.rglob("*") if p.is_file() and p.name != "human_reviews.jsonl"
                  for line in p.read_bytes().splitlines())
    assert len((ws.kb / "human_reviews.jsonl").read_bytes()) > longest + 1
    # a smaller limit set after the import: every source line still fits, the decision's does not
    (ws.root / "refinery.toml").write_text(f"[materialize]\nmax_line_bytes = {longest + 1}\n")
    assert run_all(ws, load_config(ws.root)).exit_code == 0
    assert _scored(ws)[row["review_id"]]["category"] == "needs_human_review"
    refused = [q for q in map(orjson.loads, (ws.root / "exports/quarantine/materialize.jsonl").read_bytes()
                              .splitlines()) if q["source"] == "human_reviews"]
    assert [q["reason"] for q in refused] == ["line_too_long"]
    # and import says so itself when a decision would not fit
    other = _plain(_queue(ws))[1]
    _write_csv(path, [_decided(other, "correct", "Another long corrected answer. " * 2000)])
    result = _import(ws, path)
    assert result.exit_code == 2 and ": too_long: " in result.output


def test_a_quote_left_open_refuses_the_file_instead_of_swallowing_rows(sample_run, ws, tmp_path):
    rows = _plain(_queue(ws))[:3]
    path = tmp_path / "d.csv"
    _write_csv(path, [_decided(r, "accept") for r in rows])
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text[1] = text[1].rstrip("\r\n") + ',"he said ""ok""\r\n'  # an extra cell whose quote never closes
    path.write_text("".join(text), encoding="utf-8")
    result = _import(ws, path)
    assert result.exit_code == 2 and "quotes do not match" in result.output
    assert not (ws.kb / "human_reviews.jsonl").exists()


def test_the_api_refuses_a_time_it_cannot_read(sample_run, ws, tmp_path):
    from refinery import api
    from refinery.errors import RefineryError

    path = tmp_path / "d.jsonl"
    path.write_bytes(orjson.dumps({"review_id": _plain(_queue(ws))[0]["review_id"], "decision": "accept",
                                   "reviewer": "dana"}))
    with pytest.raises(RefineryError, match="ISO 8601"):
        api.review_import(ws.root, path, decided_at="last tuesday")
    assert not (ws.kb / "human_reviews.jsonl").exists()
    done = api.review_import(ws.root, path, decided_at="2026-11-28T09:30:00+01:00")
    assert done.count("imported") == 1 and done.file == str(path)
    assert orjson.loads((ws.kb / "human_reviews.jsonl").read_bytes())["decided_at"] == "2026-11-28T08:30:00.000000Z"


def test_a_correction_of_a_conversation_without_a_user_turn_keeps_none_of_the_old_answer():
    from refinery.discovery import BUILTIN_DIR, discover_modules
    from refinery.transform import Member

    t = next(m for m in discover_modules([BUILTIN_DIR]) if m.spec.name == "human_reviews")
    messages = [{"role": "system", "content": "Write a haiku.", "name": None, "tool_calls": None,
                 "tool_call_id": None},
                {"role": "assistant", "content": "Paper trails of debt", "name": None, "tool_calls": None,
                 "tool_call_id": None}]
    row = {"review_id": "ev-1", "decision": "correct", "corrected_answer": "A better haiku.", "reviewer": "dana",
           "decided_at": DECIDED_AT, "prompt": None, "messages": messages, "response": "Paper trails of debt",
           "tool_calls": []}
    row["answer_sha256"] = decisions.answer_sha256(row)
    [emit] = t.assemble([Member("decision", row, None, 0, 0, None, "x")], None)
    assert emit.evidence["messages"] == messages[:1] and emit.evidence["response"] == "A better haiku."


def test_trace_never_reads_a_file_outside_the_workspace(sample_run, ws):
    from refinery import trace

    sources = trace._sources(ws)
    for rel in ("../../../../../../etc/passwd", "data/evidence/../../../../../../etc/passwd",
                "data/_kb/../../../../../../etc/passwd", "/etc/passwd"):
        assert trace._read_line(ws, sources, rel, 0) is None
