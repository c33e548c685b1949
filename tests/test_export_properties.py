"""Properties of the exports for any generated evidence: no self-pair, no identical texts, no
forbidden category in SFT, every row accounted for."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refinery import export, materialize, score
from refinery.config import load_config
from refinery.normalize import normalize_text
from refinery.workspace import Workspace

PROMPTS = ["How many orders in August?", "how many  ORDERS in august?", "Diagnose the crash loop.", "Hold a flight."]
ANSWERS = ["1,312 rows.", "1,312 ROWS. ", "About 900.", "", "Roll back the deploy.", "Raise the limit to 512Mi.",
           "Ünïcödé ✓ " * 50, "x" * 3000]

eval_rows = st.lists(st.tuples(
    st.sampled_from(PROMPTS), st.sampled_from(ANSWERS),
    st.one_of(st.none(), st.floats(0, 1).map(lambda f: round(f, 2))),
    st.sampled_from(["", "maria.k"]),
), min_size=0, max_size=25)


def _eval_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["eval_id", "prompt", "output", "score", "approver", "evaluated_at"])
    for i, (prompt, answer, sc, approver) in enumerate(rows):
        ts = f"2026-11-0{1 + i % 3}T00:00:{i:02d}Z"
        w.writerow([f"e{i}", prompt, answer, "" if sc is None else sc, approver, ts])
    return buf.getvalue()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=eval_rows, include_partial=st.booleans(), max_pairs=st.integers(1, 4))
def test_exports_hold_their_invariants_for_any_evidence(rows, include_partial, max_pairs):
    with tempfile.TemporaryDirectory() as d:
        ws = Workspace.at(d)
        ws.kb.mkdir(parents=True)
        (ws.kb / "eval.csv").write_text(_eval_csv(rows))
        cfg = load_config(ws.root, None, {"export": {"max_pairs_per_task": max_pairs}})
        materialize.run(ws, cfg)
        s = score.run(ws, cfg)
        e = export.run(ws, cfg, include_partial=include_partial)

        categories = {}
        for p in ws.scored_runs.rglob("*.jsonl"):
            for line in p.read_bytes().splitlines():
                r = orjson.loads(line)
                categories[r["id"]] = r["category"]
        allowed = {"accepted", "partially_accepted"} if include_partial else {"accepted"}
        for line in (ws.exports / export.PATHS["sft"]).read_bytes().splitlines():
            r = orjson.loads(line)
            assert r["quality_score"] in allowed
            assert categories["ev-" + r["id"][4:]] in allowed

        per_task: dict[str, int] = {}
        for line in (ws.exports / export.PATHS["preference"]).read_bytes().splitlines():
            p = orjson.loads(line)
            assert p["chosen_id"] != p["rejected_id"]
            assert normalize_text(p["chosen"]) != normalize_text(p["rejected"])
            assert p["chosen_score"] > p["rejected_score"]
            assert categories[p["rejected_id"]] == "rejected"
            per_task[p["task_key"]] = per_task.get(p["task_key"], 0) + 1
        assert all(n <= max_pairs for n in per_task.values())

        for name, x in e.exports.items():
            assert x["rows_in"] == s.scored == x["rows_out"] + x["quarantined"], name


ids = st.text("abcdef", min_size=1, max_size=3)
candidates = st.lists(st.fixed_dictionaries({
    "id": ids, "category": st.sampled_from(["accepted", "partially_accepted", "rejected"]),
    "score": st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]), "text": st.sampled_from(["A", "a ", "B", "C", "d"]),
}), max_size=20, unique_by=lambda r: r["id"])


@given(rows=candidates, max_pairs=st.integers(1, 10))
def test_pair_group_properties(rows, max_pairs):
    for r in rows:
        r["text_key"] = normalize_text(r["text"])
        r["reply"] = [{"role": "assistant", "content": r["text"], "tool_calls": None}]
    picked, left = export.pair_group(rows, max_pairs)
    assert len(picked) <= max_pairs
    assert len({(c["id"], r["id"]) for c, r in picked}) == len(picked)
    for c, r in picked:
        assert c["id"] != r["id"]
        assert c["text_key"] != r["text_key"]
        assert c["score"] > r["score"]
        assert c["category"] in export.PREFERENCE_CHOSEN and r["category"] in export.PREFERENCE_REJECTED
    used = {x["id"] for pair in picked for x in pair}
    assert used.isdisjoint(left)
    assert used | set(left) == {r["id"] for r in rows}


def test_generated_csv_is_well_formed(tmp_path: Path):
    (tmp_path / "x.csv").write_text(_eval_csv([(PROMPTS[0], ANSWERS[0], 0.9, "maria.k")]))
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 2
