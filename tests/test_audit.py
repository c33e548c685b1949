"""audit-full: the checks on a real workspace, the determinism re-run, the report, and the
append-only baseline ledger with drift against its last row."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from conftest import passing_audit_baseline
from refinery import audit
from refinery.cli import app
from refinery.invariants import INVARIANTS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def ran(ws, sample_run):
    """The workspace after `generate(400, 7)` and one `run-all` (conftest.py's sample_run: that
    run, built once per test process and copied in)."""
    return ws


def ledger(ws) -> list[dict]:
    return [orjson.loads(x) for x in (ws.kb / audit.LEDGER).read_bytes().splitlines()]


def audit_json(*args: str) -> tuple[int, dict]:
    result = invoke("audit-full", "--json", *args)
    return result.exit_code, orjson.loads(result.stdout)


@pytest.mark.slow
def test_an_audit_of_a_clean_workspace_passes_reports_and_appends(ran):
    code, doc = audit_json()
    assert code == 0 and doc["ok"]
    keys = [c["key"] for c in doc["checks"]]
    assert len(keys) >= 16 and keys[-1] == "determinism_rerun" and all(c["ok"] for c in doc["checks"])
    assert len(doc["metrics"]) >= 10
    assert {"source_rows", "evidence_rows", "category_share_pct.accepted", "export_rows.sft", "export_bytes.rag",
            "quarantined_total"} <= set(doc["metrics"])
    report = (ran.reports / audit.REPORT).read_text()
    assert "**PASS**" in report and "## Checks" in report and "## Drift against the last baseline" in report
    assert "| 26 | `determinism_rerun`" in report
    (row0,) = ledger(ran)
    assert row0["seq"] == 0 and row0["prev_hash"] is None and row0["metrics"] == doc["metrics"]
    assert doc["appended"]["row_hash"] == row0["row_hash"]

    code, doc = audit_json()  # nothing changed: no drift, a second row chained to the first
    assert code == 0 and doc["baseline_seq"] == 0
    assert {d["flag"] for d in doc["drift"]} == {"ok"}
    row0, row1 = ledger(ran)
    assert row1["seq"] == 1 and row1["prev_hash"] == row0["row_hash"]


@pytest.mark.slow
def test_the_table_output_names_checks_and_drift(ran):
    passing_audit_baseline(ran)
    result = invoke("audit-full")
    assert result.exit_code == 0
    assert "  1 PASS  latest_run_complete" in result.stdout
    assert "drift against baseline row 0: 0 of" in result.stdout
    assert "audit-full: PASS — 26 of 26 checks hold; report: reports/distillation/audit-full-report.md" in result.stdout


@pytest.mark.slow
def test_a_tampered_workspace_fails_names_the_file_and_keeps_the_baseline(ran):
    passing_audit_baseline(ran)
    evidence = sorted(ran.evidence.rglob("*.jsonl"))[0]
    evidence.write_bytes(evidence.read_bytes().replace(b'","', b'", "', 1))  # one byte, same parsed row
    result = invoke("audit-full")
    assert result.exit_code == 1
    assert f"{ran.rel(evidence)} changed since materialize wrote it" in result.stdout
    assert " FAIL  receipts_match_files" in result.stdout
    assert "baseline not updated: a required check failed" in result.stdout
    assert len(ledger(ran)) == 1
    assert "**FAIL**" in (ran.reports / audit.REPORT).read_text()


@pytest.mark.slow
def test_determinism_rerun_fails_alone_when_the_outputs_no_longer_follow_from_the_inputs(ran):
    # the config changed since the run: the outputs on disk are sound, but a re-run gives others
    (ran.root / "refinery.toml").write_text("[score]\naccept_min_score = 0.95\n")
    code, doc = audit_json()
    assert code == 1
    assert [c["key"] for c in doc["checks"] if not c["ok"]] == ["determinism_rerun"]
    problems = next(c["problems"] for c in doc["checks"] if c["key"] == "determinism_rerun")
    assert problems[0].startswith("score: the re-run gives receipt_hash")


@pytest.mark.slow
def test_no_rerun_skips_and_does_not_move_the_baseline(ran):
    code, doc = audit_json("--no-rerun")
    assert code == 0
    rerun = doc["checks"][-1]
    assert rerun["key"] == "determinism_rerun" and rerun["problems"] == ["skipped (--no-rerun)"]
    assert not rerun["required"] and doc["appended"] is None
    assert "the determinism re-run was skipped" in doc["notes"][0]
    assert " SKIP  determinism_rerun" in invoke("audit-full", "--no-rerun").stdout


def test_an_audit_before_any_run_fails_cleanly(ws):
    code, doc = audit_json("--no-rerun")
    assert code == 1
    assert next(c for c in doc["checks"] if c["key"] == "latest_run_complete")["problems"] == [
        "no run recorded: run `refinery run-all` first"]


# --- the ledger is append-only ---------------------------------------------------------------


def three_rows(ws) -> list[bytes]:
    """A ledger of three rows, appended as passing audits append them."""
    for i in range(3):
        rows = audit.read_ledger(ws)
        audit.append_ledger(ws, rows, f"run-{i}", {"source_rows": 100.0 + i})
    return (ws.kb / audit.LEDGER).read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize(("tamper", "line", "what"), [
    (lambda rows: [rows[0].replace(b'"source_rows":100.0', b'"source_rows":101.0'), *rows[1:]], 1, "row_hash"),
    (lambda rows: rows[1:], 1, "seq 1, expected 0"),
    (lambda rows: [rows[1], rows[0], rows[2]], 1, "seq 1, expected 0"),
    (lambda rows: [rows[0], b"{not json\n", rows[2]], 2, "not a baseline row"),
])
def test_a_changed_ledger_is_refused(ran, tamper, line, what):
    rows = three_rows(ran)
    (ran.kb / audit.LEDGER).write_bytes(b"".join(tamper(rows)))
    before = (ran.kb / audit.LEDGER).read_bytes()
    result = invoke("audit-full", "--no-rerun")
    assert result.exit_code == 1
    assert f"AUDIT REFUSED: data/_kb/audit_baselines.jsonl:{line}: " in result.output and what in result.output
    assert (ran.kb / audit.LEDGER).read_bytes() == before  # nothing appended to a broken ledger


def test_a_forger_who_rehashes_an_edited_row_breaks_the_next_link(ran):
    rows = [orjson.loads(x) for x in three_rows(ran)]
    rows[0]["metrics"]["source_rows"] = 999.0
    rows[0]["row_hash"] = audit.row_hash(rows[0])
    (ran.kb / audit.LEDGER).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with pytest.raises(audit.LedgerTampered, match=r"audit_baselines.jsonl:2: prev_hash does not match"):
        audit.read_ledger(ran)


def test_appending_keeps_every_existing_byte(ran):
    rows = three_rows(ran)
    audit.append_ledger(ran, audit.read_ledger(ran), "run-x", {"source_rows": 1.0})
    now = (ran.kb / audit.LEDGER).read_bytes().splitlines(keepends=True)
    assert now[:3] == rows and len(now) == 4


# --- drift against the baseline ------------------------------------------------------------


@pytest.mark.parametrize(("before", "now", "flag"), [
    (100, 120, "ok"), (100, 120.01, "warn"), (100, 120.001, "warn"), (100, 80, "ok"), (100, 79.99, "warn"),
    (100, 100, "ok"), (0, 0, "ok"), (0, 1, "warn"),
])
def test_drift_flags_moves_of_more_than_20_percent(before, now, flag):
    (row,) = audit.drift_rows({"m": now}, {"seq": 0, "metrics": {"m": before}})
    assert row["flag"] == flag and row["baseline"] == before and row["value"] == now


def test_drift_without_a_baseline_or_for_a_new_metric():
    assert audit.drift_rows({"m": 1}, None)[0]["flag"] == "first"
    rows = {r["name"]: r for r in audit.drift_rows({"m": 1, "new": 2}, {"seq": 0, "metrics": {"m": 1, "gone": 3}})}
    assert rows["new"]["flag"] == "new" and rows["gone"]["value"] == 0 and rows["gone"]["flag"] == "warn"


@pytest.mark.slow
def test_a_real_move_is_flagged_in_the_report(ran):
    passing_audit_baseline(ran)
    with open(ran.kb / "eval.csv", "ab") as f:  # many more eval rows: the mix and sizes move
        for i in range(200):
            f.write(b"ev-y%d,t-y,extra,How many orders are open (%d)?,12,12,0.9,li.chen,2026-11-02T10:00:00Z\n"
                    % (i, i))
    assert invoke("run-all").exit_code == 0
    result = invoke("audit-full", "--no-rerun")  # the drift is measured the same without the re-run
    assert result.exit_code == 0  # drift is reported, it does not fail the audit
    assert "  warn  source_rows: 497 → 697 (+40.2 %)" in result.stdout
    assert "| source_rows | 497 | 697 | +40.2 | warn |" in (ran.reports / audit.REPORT).read_text()


def test_every_shared_invariant_is_an_audit_check(ran):
    _, doc = audit_json("--no-rerun")
    assert [c["key"] for c in doc["checks"]][:len(INVARIANTS)] == [k for k, _, _ in INVARIANTS]


@pytest.mark.slow
def test_the_rerun_works_where_the_workspace_is_the_repository(tmp_path):
    """In the repo, the workspace's transforms/ is the built-in folder: the re-run must not load
    it twice."""

    from conftest import REPO, copy_sample
    from refinery.config import load_config
    from refinery.invariants import Context
    from refinery.runs import run_all
    from refinery.workspace import Workspace

    repo_like = tmp_path / "repo"
    copy_sample(repo_like / "data" / "_kb")
    (repo_like / "transforms").symlink_to(REPO / "transforms")
    ws = Workspace.at(repo_like)
    run_all(ws, load_config(ws.root))
    assert audit.determinism_rerun(Context(ws, load_config(ws.root))) == []


def test_the_rerun_goes_on_beside_the_other_checks_and_is_stopped_if_they_crash(ran, monkeypatch):
    """The re-run starts before the other checks and is waited for after them; if the audit
    stops in between, its process is stopped and its temporary workspace removed."""
    from refinery import invariants as inv
    from refinery.config import load_config

    made: list[audit.Rerun] = []
    real_init = audit.Rerun.__init__

    def init(self, ctx):
        real_init(self, ctx)
        made.append(self)

    monkeypatch.setattr(audit.Rerun, "__init__", init)
    monkeypatch.setattr(inv, "run_checks", lambda ctx, checks, first_number=1: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        audit.run_audit(ran, load_config(ran.root))
    [rerun] = made
    assert rerun.started.proc.poll() is not None and not rerun.tmp.exists()
    monkeypatch.undo()
    result = audit.run_audit(ran, load_config(ran.root))
    check = next(c for c in result.checks if c.key == "determinism_rerun")
    assert check.ok and check.number == len(result.checks) and check.seconds > 0


# --- the ledger's head, kept outside it ------------------------------------------------------


@pytest.mark.parametrize("cut", ["last_rows", "whole_file", "rehashed_chain"])
def test_cutting_or_rewriting_the_end_of_the_ledger_is_refused(ran, cut):
    three_rows(ran)
    path = ran.kb / audit.LEDGER
    rows = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    if cut == "last_rows":
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows[:1]))
    elif cut == "whole_file":
        path.unlink()
    else:  # edit row 0 and re-hash every row after it: a consistent chain, but not the audited one
        rows[0]["metrics"]["source_rows"] = 1.0
        prev = None
        for r in rows:
            r["prev_hash"] = prev
            r["row_hash"] = prev = audit.row_hash(r)
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    result = invoke("audit-full", "--no-rerun")
    assert result.exit_code == 1 and "rows were removed or rewritten" in result.output
    assert "**REFUSED**" in (ran.reports / audit.REPORT).read_text()  # no older PASS report left standing


@pytest.mark.slow
def test_the_ledger_is_never_a_source_whatever_ignore_says(ran):
    three_rows(ran)
    (ran.root / "refinery.toml").write_text('[materialize]\nignore = ["*.bak"]\n')
    assert invoke("run-all").exit_code == 0
    listed = orjson.loads(invoke("sources", "--json").stdout)
    assert "audit_baselines.jsonl" in listed["ignored"]
    assert all(s["file"] != "data/_kb/audit_baselines.jsonl" for s in listed["sources"])
    code, doc = audit_json()
    assert code == 0, [c for c in doc["checks"] if not c["ok"]]


@pytest.mark.slow
def test_the_rerun_uses_the_config_given_and_the_transform_folders_wherever_they_are(ran, tmp_path):
    import shutil

    shared = tmp_path / "shared_transforms"  # an absolute folder ...
    shared.mkdir()
    (shared / "_helper.py").write_text("X = 1\n")
    sibling = ran.root.parent / "team_transforms"  # ... and one beside the workspace: ../team_transforms
    sibling.mkdir()
    (sibling / "_other.py").write_text("Y = 2\n")
    custom = tmp_path / "custom.toml"
    custom.write_text(f'[materialize]\ntransforms_dirs = ["{shared}", "../team_transforms"]\n'
                      '[score]\naccept_min_score = 0.8\n')
    assert invoke("run-all", "--config", str(custom)).exit_code == 0
    code, doc = audit_json("--config", str(custom))
    assert code == 0, [c for c in doc["checks"] if not c["ok"]]
    import tempfile
    from pathlib import Path

    # the re-run copied ../team_transforms inside its own temporary folder, not beside it
    assert not (Path(tempfile.gettempdir()) / "team_transforms").exists()
    shutil.rmtree(sibling)


def test_rows_longer_than_the_default_line_limit_are_audited_when_the_config_allows_them(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nmax_line_bytes = 4194304\n")
    big = "x" * 1_600_000
    (ws.kb / "gateway_receipts.jsonl").write_text(orjson.dumps(
        {"request_id": "g1", "ts": 1762000000000, "provider": "openai", "model": "m", "prompt": "Summarise.",
         "completion": big, "finish_reason": "stop", "status_code": 200}).decode() + "\n")
    assert invoke("run-all").exit_code == 0
    code, doc = audit_json("--no-rerun")
    assert code == 0, [c for c in doc["checks"] if not c["ok"]]


@pytest.mark.slow
def test_the_second_pass_catches_what_the_engine_misses(ran, monkeypatch):
    """A blind engine (here: one that finds nothing) is not the last word: the independent second
    pass still fails invariant 21, and the report counts the findings per kind and pass."""
    from refinery import sensitive

    assert invoke("convert", "--to", "mlx-chat").exit_code == 0
    with open(ran.exports / "formats" / "mlx-chat.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "deploy"}, {"role": "assistant", "content": '
                '"export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and card '
                '4111 1111 1111 1111"}]}\n')
    monkeypatch.setattr(sensitive, "scan", lambda fields, allow=(): [])
    code, doc = audit_json("--no-rerun")
    failed = {c["key"]: c["problems"] for c in doc["checks"] if not c["ok"]}
    assert code == 1 and set(failed) == {"no_secrets_in_exports"}
    problems = failed["no_secrets_in_exports"]
    assert problems[0] == ("findings by kind: api_key 1 (engine 0, second pass only 1), credit_card 1 (engine 0, "
                           "second pass only 1)")
    assert all("found by the second pass" in p for p in problems[1:]) and len(problems) == 3
    assert "wJalrXUtnFEMI" not in "".join(problems) and "4111" not in "".join(problems)


@pytest.mark.slow
def test_the_secret_check_shared_out_over_processes_reports_what_one_process_does(ran, monkeypatch):
    """Rows are shared out by prompt over worker processes; the findings come back the same, in
    file and line order, whichever process found them."""
    from refinery import invariants
    from refinery.config import load_config

    assert invoke("convert", "--to", "mlx-chat").exit_code == 0
    assert invoke("convert", "--to", "alpaca").exit_code == 0
    chat = ('{"messages": [{"role": "user", "content": "q%d"}, '
            '{"role": "assistant", "content": "use password=hunter2hunter%d"}]}')
    alpaca = '{"instruction": "i%d", "input": "", "output": "mail jane%d@corvid-analytics.com"}'
    for name, row in (("mlx-chat", chat), ("alpaca", alpaca)):
        with open(ran.exports / "formats" / f"{name}.jsonl", "a") as f:
            f.write("".join(row % (i, i) + "\n" for i in range(5)))
    ctx = invariants.Context(ran, load_config(ran.root))
    alone = invariants.no_secrets_in_exports(ctx)
    assert alone[0] == ("findings by kind: email 5 (engine 5, second pass only 0), "
                        "password 5 (engine 5, second pass only 0)")
    monkeypatch.setattr(invariants, "SECRETS_PARALLEL_MIN_BYTES", 0)
    three = ctx.cfg.materialize.model_copy(update={"workers": 3})
    ctx.cfg = ctx.cfg.model_copy(update={"materialize": three})
    assert invariants.no_secrets_in_exports(ctx) == alone


@pytest.mark.slow
def test_a_convert_output_is_scanned_and_planted_files_are_named(ran):
    assert invoke("convert", "--to", "mlx-chat").exit_code == 0
    code, doc = audit_json("--no-rerun")
    assert code == 0  # what convert writes is not a run output, and it is clean
    fmt = ran.exports / "formats" / "mlx-chat.jsonl"
    with open(fmt, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "deploy"}, '
                '{"role": "assistant", "content": "use password=hunter2hunter2"}]}\n')
    (ran.exports / "planted.jsonl").write_text("{}\n")
    code, doc = audit_json("--no-rerun")
    failed = {c["key"]: c["problems"] for c in doc["checks"] if not c["ok"]}
    assert set(failed) == {"no_secrets_in_exports", "no_unrecorded_outputs"}
    assert failed["no_secrets_in_exports"][0] == "findings by kind: password 1 (engine 1, second pass only 0)"
    assert failed["no_secrets_in_exports"][1].startswith("exports/formats/mlx-chat.jsonl:")
    assert "hunter2" not in "".join(failed["no_secrets_in_exports"])
    assert len(failed["no_unrecorded_outputs"]) == 1
    assert failed["no_unrecorded_outputs"][0].startswith("exports/planted.jsonl is not in any receipt of run ")


# --- a missing or damaged head: re-anchoring is a step of its own ---------------------------


def temp_files(ws) -> list[str]:
    return [ws.rel(p) for p in ws.root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_a_missing_head_is_refused_until_the_ledger_is_reanchored(ran):
    three_rows(ran)
    path = ran.kb / audit.LEDGER
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))  # the last row cut off ...
    (ran.reports / audit.HEAD).unlink()  # ... and the head that would tell
    result = invoke("audit-full", "--no-rerun")
    assert result.exit_code == 1
    assert ("AUDIT REFUSED: reports/distillation/audit-ledger-head.json is missing, but "
            "data/_kb/audit_baselines.jsonl holds 2 rows") in result.output
    assert "run `refinery audit-full --reanchor`" in result.output
    assert "**REFUSED**" in (ran.reports / audit.REPORT).read_text()
    assert invoke("audit-full", "--no-rerun", "--reanchor").exit_code == 2  # only a full audit can record it

    code, doc = audit_json("--reanchor")
    assert code == 0 and doc["appended"]["seq"] == 2
    assert doc["appended"]["reanchored"] == ("reports/distillation/audit-ledger-head.json was missing; the ledger "
                                             "was accepted as it stood at row 1")
    assert any(n.startswith("re-anchored: ") for n in doc["notes"])
    assert ledger(ran)[-1] == doc["appended"] and ledger(ran)[-1]["schema_version"] == 2
    assert audit_json("--no-rerun")[0] == 0  # anchored again: the head is back
    result = invoke("audit-full", "--reanchor")
    assert result.exit_code == 2 and "nothing to re-anchor" in result.output


@pytest.mark.parametrize(("head", "detail"), [
    (b"{", "Invalid JSON"),
    (b"[]", "Input should be an object"),
    (b'{"row_hash": "' + b"a" * 64 + b'"}', "seq: Field required"),
    (b'{"seq": "1", "row_hash": 5}', "seq: Input should be a valid integer"),
    (b'{"seq": -1, "row_hash": "' + b"a" * 64 + b'"}', "seq: Input should be greater than or equal to 0"),
])
def test_a_damaged_head_is_named_with_its_fix_exit_2(ran, head, detail):
    three_rows(ran)
    (ran.reports / audit.HEAD).write_bytes(head)
    before = (ran.kb / audit.LEDGER).read_bytes()
    result = invoke("audit-full", "--no-rerun")  # no traceback: invoke does not catch exceptions
    assert result.exit_code == 2
    assert result.output.startswith("error: reports/distillation/audit-ledger-head.json is damaged (")
    assert detail in result.output and "run `refinery audit-full --reanchor`" in result.output
    assert (ran.kb / audit.LEDGER).read_bytes() == before and temp_files(ran) == []
    assert "**REFUSED**" in (ran.reports / audit.REPORT).read_text()


@pytest.mark.slow
def test_reanchoring_replaces_a_damaged_head(ran):
    three_rows(ran)
    (ran.reports / audit.HEAD).write_bytes(b"[]")
    code, doc = audit_json("--reanchor")
    assert code == 0 and doc["appended"]["reanchored"].startswith(
        "reports/distillation/audit-ledger-head.json was damaged; the ledger was accepted as it stood at row 2")
    assert orjson.loads((ran.reports / audit.HEAD).read_bytes()) == {
        "schema_version": 1, "seq": 3, "row_hash": doc["appended"]["row_hash"]}


def test_reanchoring_a_sound_or_new_ledger_is_a_usage_error(ran):
    result = invoke("audit-full", "--reanchor")  # no ledger and no head: the first audit anchors it
    assert result.exit_code == 2 and "nothing to re-anchor: data/_kb/audit_baselines.jsonl has no rows" in result.output
    three_rows(ran)
    (ran.reports / audit.HEAD).write_bytes(b"{}")
    (ran.kb / audit.LEDGER).write_bytes((ran.kb / audit.LEDGER).read_bytes()[:-20])  # and a torn chain
    result = invoke("audit-full", "--reanchor")  # re-anchoring accepts a ledger, never a broken one
    assert result.exit_code == 1
    assert "AUDIT REFUSED: data/_kb/audit_baselines.jsonl:3: not a baseline row" in result.output


def test_rows_written_before_reanchored_existed_still_verify(ran):
    row = {"schema_version": 1, "seq": 0, "recorded_at": "2026-11-01T00:00:00Z", "run_id": "r", "metrics": {"m": 1.0},
           "prev_hash": None}
    row["row_hash"] = audit.row_hash(row)
    (ran.kb / audit.LEDGER).write_bytes(orjson.dumps(row) + b"\n")
    audit.append_ledger(ran, [], "r", {"m": 1.0})  # writes the head of a one-row ledger ...
    (ran.kb / audit.LEDGER).write_bytes(orjson.dumps(row) + b"\n")
    (ran.reports / audit.HEAD).write_bytes(orjson.dumps({"seq": 0, "row_hash": row["row_hash"]}))  # ... as v1 did
    rows = audit.read_ledger(ran)
    assert rows == [row]
    audit.append_ledger(ran, rows, "r2", {"m": 2.0})
    assert [r["seq"] for r in audit.read_ledger(ran)] == [0, 1]


# --- the run audited, its summary and its drift report ---------------------------------------


def newest_dir(ws):
    return sorted(p for p in ws.reports.iterdir() if p.is_dir())[-1]


def edit_json(path, change) -> None:
    doc = orjson.loads(path.read_bytes())
    change(doc)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


@pytest.mark.slow
def test_the_audit_says_which_run_it_audits_and_why(ran):
    run_id = newest_dir(ran).name
    result = invoke("audit-full", "--no-rerun")
    assert result.stdout.splitlines()[0] == (f"auditing run {run_id}: its outputs are the published ones "
                                             "(reports/distillation/published.json names it)")
    assert f"- run audited: `{run_id}` — its outputs are the published ones" in (ran.reports / audit.REPORT).read_text()
    code, doc = audit_json("--no-rerun")
    assert doc["run_id"] == run_id and doc["why"].startswith("its outputs are the published ones")


@pytest.mark.parametrize(("file", "change", "problem"), [
    ("summary.json", lambda d: d.update(status="failed"), "summary.json says run {run} is failed, yet "
                                                         "reports/distillation/published.json names it"),
    ("summary.json", lambda d: d["totals"].update(scored=d["totals"]["scored"] + 1), "summary.json: totals.scored is"),
    ("summary.json", lambda d: d.update(config_hash="0" * 64), "summary.json: summary_hash"),
    ("summary.json", lambda d: d.update(exit_code=3), "summary.json: summary_hash"),
    ("drift.json", lambda d: d.update(severity="alert"), "drift.json: drift_hash"),
    ("drift.json", lambda d: d["metrics"][0].update(value=1.0), "drift.json: drift_hash"),
])
def test_an_edited_summary_or_drift_report_fails_the_audit_naming_it(ran, file, change, problem):
    assert invoke("run-all").exit_code == 0  # a second run (all reused): an older complete run to fall back on
    run = newest_dir(ran).name
    edit_json(newest_dir(ran) / file, change)
    code, doc = audit_json("--no-rerun")
    assert code == 1 and doc["run_id"] == run  # still the published run, not the older one
    failed = [p for c in doc["checks"] if not c["ok"] for p in c["problems"]]
    assert any(f"reports/distillation/{run}/{problem.format(run=run)}" in p for p in failed), failed
    assert "baseline not updated: a required check failed" in doc["notes"]


def test_timings_stay_outside_the_summary_hash(ran):
    edit_json(newest_dir(ran) / "summary.json", lambda d: d.update(started_at="2000-01-01T00:00:00Z",
                                                                   finished_at="2000-01-01T00:00:01Z"))
    assert audit_json("--no-rerun")[0] == 0


def test_a_rehashed_summary_must_still_agree_with_the_receipts_and_be_the_one_published(ran):
    from refinery.runs import summary_hash

    path = newest_dir(ran) / "summary.json"
    edit_json(path, lambda d: (d["totals"].update(scored=1), d.update(summary_hash=summary_hash(d))))
    code, doc = audit_json("--no-rerun")
    failed = {c["key"]: c["problems"] for c in doc["checks"] if not c["ok"]}
    assert code == 1 and set(failed) == {"latest_run_complete", "receipt_hashes"}
    assert "is not the summary that was published" in failed["latest_run_complete"][0]
    assert failed["receipt_hashes"][0].endswith("summary.json: totals.scored is 1, the receipts say "
                                                f"{orjson.loads(path.read_bytes())['totals']['evidence']}")


@pytest.mark.parametrize("also", [None, "published.json"])
def test_deleting_the_published_run_does_not_make_the_audit_judge_an_older_one(ran, also):
    import shutil

    older = newest_dir(ran).name
    assert invoke("run-all").exit_code == 0  # all reused: the older run's receipts match the files too
    newest = newest_dir(ran).name
    shutil.rmtree(ran.reports / newest)
    if also:
        (ran.reports / also).unlink()
    result = invoke("audit-full", "--no-rerun")
    assert result.exit_code == 1
    if also is None:
        assert result.stdout.startswith("auditing no run: reports/distillation/published.json names run "
                                        f"{newest}, whose folder is gone")
        assert (f"reports/distillation/published.json names run {newest} as the one whose outputs are published, "
                f"but reports/distillation/{newest}/ is missing") in result.stdout
        assert " FAIL  determinism_rerun" in result.stdout and "not checked: there is no run to audit" in result.stdout
    else:
        assert result.stdout.startswith(f"auditing run {older}: the newest complete run, for want of "
                                        "reports/distillation/published.json")
        assert "reports/distillation/published.json is missing: nothing says which run's outputs are on disk" \
            in result.stdout
