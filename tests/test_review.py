"""`refinery review export`: the human review queue, every needs_human_review scored run once,
in a file for tools (JSONL) and one for people (CSV), redacted, each row traceable."""

from __future__ import annotations

import csv
import io

import orjson
from typer.testing import CliRunner

from refinery import review, sensitive
from refinery.cli import app
from refinery.runs import load_run, resolve_run


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
    review.export_queue(ws)
    assert {p.name: p.read_bytes() for p in (ws.root / review.QUEUE_DIR).iterdir()} == before  # same run, same bytes


def test_a_cell_a_spreadsheet_would_read_as_a_formula_is_kept_text():
    assert [review._cell(t) for t in ("=SUM(A1)", "+1", "-x", "@cmd", "plain", "")] == \
        ["'=SUM(A1)", "'+1", "'-x", "'@cmd", "plain", ""]


def test_no_scored_runs_is_a_clear_error(ws):
    result = CliRunner().invoke(app, ["review", "export", "--workspace", str(ws.root)])
    assert result.exit_code == 2 and "run `refinery score` first" in result.output
