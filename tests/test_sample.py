"""The bundled sample: deterministic, realistic, and carrying every defect operators have."""

from __future__ import annotations

from collections import Counter, defaultdict

import orjson
import pytest

from conftest import copy_sample, evidence_rows, quarantine_rows, tree_bytes
from refinery import materialize
from refinery.sample import generate



def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(400, 3, tmp_path / "a")
    generate(400, 3, tmp_path / "b")
    generate(400, 4, tmp_path / "c")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_the_bundled_sample_is_what_the_generator_writes(tmp_path):
    """data/_kb/ is reproducible: `make sample` (1500 rows, seed 7) writes exactly these bytes."""
    generate(1500, 7, tmp_path / "kb")
    copy_sample(tmp_path / "bundled")
    assert tree_bytes(tmp_path / "bundled") == tree_bytes(tmp_path / "kb")


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    from refinery.config import load_config
    from refinery.workspace import Workspace

    root = tmp_path_factory.mktemp("sample")
    copy_sample(root / "data" / "_kb")
    ws = Workspace.at(root)
    result = materialize.run(ws, load_config(ws.root), validate=True)
    return ws, result, evidence_rows(ws), quarantine_rows(ws)


def test_size_families_and_days(materialized):
    ws, result, ev, _ = materialized
    assert result.rows_in >= 1000
    assert len({r["kind"] for r in ev}) >= 6
    assert {f.transform for f in result.files} >= {"runs", "eval_sheet", "agent_transcripts", "gateway_receipts",
                                                    "auditor_verdicts", "human_feedback"}
    days = {r["recorded_at"][:10] for r in ev}
    assert len(days) >= 5
    assert result.transform_errors == 0


def test_every_line_defect_is_present(materialized):
    _, result, _, _ = materialized
    for reason in ("invalid_json", "invalid_utf8", "missing_field", "wrong_type", "duplicate_row",
                   "csv_malformed", "bad_timestamp"):
        assert result.by_reason.get(reason, 0) > 0, reason


def test_content_defects_are_present(materialized):
    _, _, ev, _ = materialized
    texts = [r["response"] or "" for r in ev]
    joined = "\n".join(texts)
    for marker in ("sk-live-", "Bearer ey", "-----BEGIN RSA PRIVATE KEY-----", "@corvid-analytics.com",
                   "+1 415 555", "password"):
        assert marker in joined, marker
    assert any(c["problem"] == "tool_key_instead_of_name" for r in ev for c in r["tool_calls"])
    assert any(len(r["tool_calls"]) >= 20 or (r["signals"]["tool_call_count"] or 0) >= 20 for r in ev)
    assert any(r["response"] == "" for r in ev)
    assert any(r["signals"]["approved"] and (r["signals"]["eval_score"] or 1) < 0.5 for r in ev)
    assert any(r["signals"]["stop_reason"] in (None, "length") and r["kind"] != "eval" for r in ev)


def test_the_same_prompt_is_answered_several_times_with_different_outcomes(materialized):
    _, _, ev, _ = materialized
    answers = defaultdict(set)
    for r in ev:
        answers[r["prompt"]].add(r["response"])
    repeated = [p for p, a in answers.items() if len(a) >= 3]
    assert len(repeated) >= 20


def test_text_is_realistic_not_lorem(materialized):
    _, _, ev, _ = materialized
    joined = " ".join((r["prompt"] or "") + (r["response"] or "") for r in ev).lower()
    assert "lorem" not in joined
    words = Counter(joined.split())
    assert len(words) > 300


@pytest.mark.slow
def test_generator_streams(tmp_path):
    """Rows are written as they are made: a generator for 10^6 rows never builds a list of them."""
    import tracemalloc

    tracemalloc.start()
    generate(3000, 1, tmp_path / "s")
    _, small = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    generate(12000, 1, tmp_path / "l")
    _, large = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert large < small * 1.5 + 200_000


def test_more_tasks_than_the_built_in_ones_make_traces_that_rarely_repeat(tmp_path):
    """What the benchmark draws from: each variant carries its case reference in its prompt and
    in every answer, so a repeated prompt is a repeated task, not a coincidence."""
    from refinery.cli import app
    from typer.testing import CliRunner

    assert CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "kb"), "--rows", "2000",
                                    "--tasks", "1000"]).exit_code == 0
    def parse(line: bytes) -> dict | None:
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:  # the planted broken lines
            return None

    lines = (tmp_path / "kb" / "gateway_receipts.jsonl").read_bytes().splitlines()
    rows = [r for r in map(parse, lines) if r is not None]
    prompts = Counter(r["prompt"] for r in rows if isinstance(r.get("prompt"), str))
    assert len(prompts) > 0.8 * sum(prompts.values())  # most prompts are distinct
    for r in rows:
        if isinstance(r.get("prompt"), str) and "(case C-" in r["prompt"] and r.get("completion"):
            ref = r["prompt"].rsplit("(", 1)[1].rstrip(")")
            assert ref in r["completion"] or "sk-live" in r["completion"] or "BEGIN RSA" in r["completion"]
    # and two variants of one task are different rows, not near-duplicates an export would refuse
    from refinery.neardup import shingles
    from refinery.sample import TASKS, variant

    for t in TASKS:
        variants = [variant(t, v) for v in range(1, 16)]
        for answer in ("good", "good_alt", "partial", "bad"):
            signed = [set(shingles(x.prompt, getattr(x, answer))) for x in variants]
            most = max(len(a & b) / len(a | b) for i, a in enumerate(signed) for b in signed[i + 1:])
            assert most < 0.75, (t.task, answer, most)  # the export's threshold is 0.8
    generate(2000, 7, tmp_path / "again", tasks=1000)  # deterministic
    assert tree_bytes(tmp_path / "kb") == tree_bytes(tmp_path / "again")
    generate(1500, 7, tmp_path / "built_in", tasks=54)  # up to the built-in count: the bundled sample
    copy_sample(tmp_path / "bundled")
    assert tree_bytes(tmp_path / "bundled") == tree_bytes(tmp_path / "built_in")
