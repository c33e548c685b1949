"""The join engine: groups spilled to hash buckets and assembled by the importer — deterministic
whatever the worker count, every member accounted for once, and an importer that breaks the
contract costs its group (transform_error), never the run."""

from __future__ import annotations

import orjson
import pytest

from conftest import evidence_rows, quarantine_rows, tree_bytes, write_kb
from refinery import materialize
from refinery.config import load_config

#: A workspace importer joining {"q": id, "text"} questions with {"a": id, "text"} answers; how
#: its assemble misbehaves is chosen by the answer's text.
PAIRS = '''
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, Refuse, RowError, TransformSpec, new_evidence

SPEC = TransformSpec(name="qa_pairs", patterns=("qa*.jsonl",), format="json", kind="qa")

def transform(row, ctx):
    raise RowError(Reason.MISSING_FIELD, "not a q or a line")

def join_key(row, ctx):
    if "q" in row:
        return Keyed(f"id:{row['q']}", "question")
    if "a" in row:
        return Keyed(f"id:{row['a']}", "answer")
    return None

def _ev(q, a, **kw):
    return new_evidence("qa", recorded_at="2026-11-05T00:00:00Z", prompt=q.row["text"], response=a.row["text"], **kw)

def assemble(group, ctx):
    qs = [m for m in group if m.role == "question"]
    ans = [m for m in group if m.role == "answer"]
    if not qs or not ans:
        return []
    q, a = qs[0], ans[0]
    how = a.row["text"]
    if how == "refuse twice":
        return [Refuse(q, Reason.WRONG_TYPE, "first"), Refuse(q, Reason.WRONG_TYPE, "again"),
                Refuse(a, Reason.WRONG_TYPE, "no")]
    if how == "emit a stranger":
        return [Emit(_ev(q, a), a._replace(offset=999), (q,))]
    if how == "two without parts":
        return [Emit(_ev(q, a), a, (q,)), Emit(_ev(q, a), a, (q,))]
    if how == "copies":  # the importer's own copies of the members still count as them
        return [Emit(_ev(q, a), a._replace(row=dict(a.row)), (q._replace(row=dict(q.row)),))]
    if how == "crash":
        raise KeyError("boom")
    return [Emit(_ev(q, a), a, (q,)), Refuse(q, Reason.WRONG_TYPE, "joined and refused: joined wins")]
'''


def _ws(ws, answers: list[str]):
    (ws.root / "transforms").mkdir(exist_ok=True)
    (ws.root / "transforms" / "qa_pairs.py").write_text(PAIRS)
    qs = b"".join(orjson.dumps({"q": i, "text": f"question {i}"}) + b"\n" for i in range(len(answers)))
    ans = b"".join(orjson.dumps({"a": i, "text": t}) + b"\n" for i, t in enumerate(answers))
    write_kb(ws, {"qa_questions.jsonl": qs, "qa_answers.jsonl": ans})


def test_a_contract_breach_costs_its_group_only(ws, cfg):
    _ws(ws, ["fine", "refuse twice", "emit a stranger", "two without parts", "copies", "crash", "fine too"])
    result = materialize.run(ws, cfg, validate=True)  # no AccountingError, no traceback
    files = {f.source: f for f in result.files}
    assert {s: (f.rows_in, f.evidence, f.joined, f.quarantined) for s, f in files.items()} == {
        "qa_answers": (7, 3, 0, 4), "qa_questions": (7, 0, 3, 4)}
    reasons = sorted((q["provenance"]["source_file"][9:], q["provenance"]["line_offset"], q["reason"])
                     for q in quarantine_rows(ws))
    assert reasons == [
        ("qa_answers.jsonl", 1, "wrong_type"), ("qa_answers.jsonl", 2, "transform_error"),
        ("qa_answers.jsonl", 3, "transform_error"), ("qa_answers.jsonl", 5, "transform_error"),
        ("qa_questions.jsonl", 1, "wrong_type"), ("qa_questions.jsonl", 2, "transform_error"),
        ("qa_questions.jsonl", 3, "transform_error"), ("qa_questions.jsonl", 5, "transform_error")]
    assert result.exit_code == 1 and "not in its group" in result.files[0].first_transform_error + \
        (result.files[1].first_transform_error or "")


def test_joined_output_is_the_same_whatever_the_worker_count(ws, tmp_path):
    import shutil

    _ws(ws, [f"answer {i}" for i in range(300)])
    outs = []
    for workers in (1, 2):
        (ws.root / "refinery.toml").write_text(f"[materialize]\nworkers = {workers}\nparallel_min_bytes = 0\n")
        materialize.run(ws, load_config(ws.root))
        outs.append((tree_bytes(ws.evidence), (ws.quarantine / "materialize.jsonl").read_bytes()))
        shutil.rmtree(ws.evidence)
    assert outs[0] == outs[1]


def test_buckets_bound_what_one_grouping_holds(ws, monkeypatch):
    """With tiny buckets the same groups come out (in bucket order, deterministically)."""
    _ws(ws, [f"answer {i}" for i in range(50)])
    monkeypatch.setattr(materialize, "BUCKET_BYTES", 256)
    result = materialize.run(ws, load_config(ws.root), validate=True)
    assert (result.evidence, result.joined, result.quarantined) == (50, 50, 0)
    assert sorted(e["prompt"] for e in evidence_rows(ws)) == sorted(f"question {i}" for i in range(50))


@pytest.mark.parametrize("role", [{"a": 1}, ["user"], 3])
def test_a_role_that_is_not_a_string_is_a_wrong_type(ws, cfg, role):
    write_kb(ws, {"ft.jsonl": orjson.dumps({"messages": [{"role": "user", "content": "q"},
                                                         {"role": role, "content": "a"}]}).decode() + "\n"
                  + '{"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}\n'})
    result = materialize.run(ws, cfg)
    assert result.by_reason == {"wrong_type": 1} and result.evidence == 1


def test_digits_that_are_not_ascii_are_not_a_time():
    from refinery.transform import RowError, parse_timestamp

    with pytest.raises(RowError, match="cannot parse"):
        parse_timestamp("²")


def test_a_row_nested_too_deep_to_write_is_refused_not_a_crash(ws, cfg):
    """orjson writes at most 254 levels: such a row is refused by its bytes, the run goes on,
    and the audit's checks still hold."""
    from refinery.invariants import Context, evidence_provenance, nothing_lost
    from refinery.runs import run_all

    deep = b'{"ts": 1762000000, "prompt": "p", "completion": "c", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    row = b'{"ts": 1762000000, "prompt": "q", "completion": "a"}\n'
    write_kb(ws, {"gateway_receipts.jsonl": deep + b"\n" + row,
                  "gateway_receipts_bom.jsonl": b"\xef\xbb\xbf" + row.replace(b'"q"', b'"q2"')})
    outcome = run_all(ws, cfg)
    m = outcome.receipts["materialize"]["counts"]
    assert (m["rows_in"], m["rows_out"], m["quarantined"]) == (3, 2, 1)  # the BOM's first row is kept too
    (q,) = quarantine_rows(ws)
    assert q["reason"] == "invalid_json" and "254 levels" in q["detail"]
    ctx = Context(ws, cfg)
    assert nothing_lost(ctx) == [] and evidence_provenance(ctx) == []


#: Answers that name their question's *topic* by the question's id: the question lists its id as
#: an alias of its topic group, the answer asks to be put wherever that id is.
TOPICS = '''
from refinery.reasons import Reason
from refinery.transform import Emit, Keyed, RowError, TransformSpec, new_evidence

SPEC = TransformSpec(name="topics", patterns=("topic*.jsonl",), format="json", kind="qa")

def transform(row, ctx):
    raise RowError(Reason.MISSING_FIELD, "not a q or an a line")

def join_key(row, ctx):
    if "q" in row:
        return Keyed(f"topic:{row['topic']}", "question", aliases=(f"q:{row['q']}",))
    return Keyed(f"q:{row['a']}", "answer", via=True)

def assemble(group, ctx):
    qs = {m.row["q"]: m for m in group if m.role == "question"}
    out = []
    for a in (m for m in group if m.role == "answer"):
        q = qs.get(a.row["a"])
        if q is not None:
            out.append(Emit(new_evidence("qa", recorded_at="2026-11-05T00:00:00Z", prompt=q.row["text"],
                                         response=a.row["text"]), a, (q,)))
    return out
'''


@pytest.mark.parametrize("buckets", [8 << 20, 64])
def test_a_record_found_through_an_alias_joins_the_group_it_names(ws, monkeypatch, buckets):
    """An answer that names only its question (not the question's group) lands in the group,
    whichever file either is in and however many buckets there are; an alias no record lists
    leaves its record unmatched."""
    monkeypatch.setattr(materialize, "BUCKET_BYTES", buckets)
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "topics.py").write_text(TOPICS)
    qs = b"".join(orjson.dumps({"q": i, "topic": i % 3, "text": f"question {i}"}) + b"\n" for i in range(30))
    ans = b"".join(orjson.dumps({"a": i, "text": f"answer {i}"}) + b"\n" for i in [*range(30), 99])
    write_kb(ws, {"topic_answers.jsonl": ans, "topic_questions.jsonl": qs})
    result = materialize.run(ws, load_config(ws.root), validate=True)
    assert (result.evidence, result.joined, result.by_reason) == (30, 30, {"unmatched_join": 1})
    assert sorted((e["prompt"], e["response"]) for e in evidence_rows(ws)) == sorted(
        (f"question {i}", f"answer {i}") for i in range(30))
    (q,) = quarantine_rows(ws)
    assert q["provenance"]["line_offset"] == 30 and "'q:99'" in q["detail"]
