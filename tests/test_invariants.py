"""Every on-disk invariant (the audit's checks and the gate's) fails on a workspace tampered in
exactly its way — and only that one fails.

The workspaces come from one run of the acceptance gate on its fixture (conftest.py's gate_dir).
A tamper that edits an output "re-seals" the receipts afterwards (new sha256s, receipt hashes,
overall hash), as a careful forger would, so that the semantic check — not the hash check — is
the one that sees it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from refinery import drift, runs
from refinery import invariants as inv
from refinery import receipts as rc
from refinery.canonical import sig_hash
from refinery.config import load_config
from refinery.runs import list_runs
from refinery.workspace import Workspace

KEYS = [k for k, _, _ in inv.INVARIANTS]


@pytest.fixture
def gws(gate_dir, tmp_path) -> Workspace:
    """A private copy of the gate's first workspace."""
    shutil.copytree(gate_dir / "run-a", tmp_path / "a", symlinks=True)
    return Workspace.at(tmp_path / "a")


def failing(ws: Workspace) -> set[str]:
    ctx = inv.Context(ws, load_config(ws.root))
    return {c.key for c in inv.run_checks(ctx, inv.INVARIANTS) if not c.ok}


def problems_of(ws: Workspace, key: str) -> list[str]:
    ctx = inv.Context(ws, load_config(ws.root))
    fn = next(f for k, _, f in inv.INVARIANTS if k == key)
    return fn(ctx)


# --- tampering helpers ---------------------------------------------------------------------


def run_dir(ws: Workspace) -> Path:
    return ws.reports / list_runs(ws)[-1]["run_id"]


def edit_receipt(ws: Workspace, stage: str, change: Callable[[dict], None], rehash: bool = True) -> None:
    p = rc.receipt_path(run_dir(ws), stage)
    r = orjson.loads(p.read_bytes())
    change(r)
    if rehash:
        r["receipt_hash"] = rc.receipt_hash(r)
    p.write_bytes(orjson.dumps(r))
    if rehash:
        reseal_summary(ws)


def reseal_summary(ws: Workspace) -> None:
    """Make the summary, the drift report and published.json agree with the receipts again."""
    d = run_dir(ws)
    s = orjson.loads((d / "summary.json").read_bytes())
    recs = rc.read_receipts(d)
    s["stages"] = [{"stage": k, "receipt_hash": r["receipt_hash"], "reused": False} for k, r in recs.items()]
    s["overall_hash"] = sig_hash([{"stage": k, "receipt_hash": r["receipt_hash"]} for k, r in recs.items()])
    s["totals"] = runs.totals(recs)
    report = orjson.loads((d / "drift.json").read_bytes())
    now = drift.metrics(recs)
    for m in report["metrics"]:
        m["value"] = float(now.get(m["name"], m["value"]))
    report["drift_hash"] = drift.drift_hash(report)
    (d / "drift.json").write_bytes(orjson.dumps(report))
    s["drift_hash"] = report["drift_hash"]
    s["summary_hash"] = runs.summary_hash(s)
    (d / "summary.json").write_bytes(orjson.dumps(s))
    runs.published_path(ws).write_bytes(orjson.dumps({"schema_version": 1, "run_id": s["run_id"],
                                                      "summary_hash": s["summary_hash"]}))


def reseal(ws: Workspace) -> None:
    """Record the files as they are now in every receipt (a forger's cover-up)."""
    d = run_dir(ws)
    digests = rc.Digests()
    for stage, r in rc.read_receipts(d).items():
        r["outputs"] = [digests.of(ws.root / f["path"], f["path"]) for f in r["outputs"]]
        if stage != "materialize":
            r["inputs"] = [digests.of(ws.root / f["path"], f["path"]) for f in r["inputs"]]
        else:  # sources: their rows are the rows materialize read, not lines
            r["inputs"] = [{**f, "sha256": digests.of(ws.root / f["path"], f["path"])["sha256"]} for f in r["inputs"]]
        r["receipt_hash"] = rc.receipt_hash(r)
        rc.receipt_path(d, stage).write_bytes(orjson.dumps(r))
    reseal_summary(ws)


def edit_rows(ws: Workspace, rel: str, change: Callable[[int, dict], dict | None], *, seal: bool = True) -> None:
    """Rewrite the JSONL file `rel` with `change(i, row)` applied (None keeps the row)."""
    p = ws.root / rel
    out = []
    for i, raw in enumerate(p.read_bytes().splitlines()):
        row = orjson.loads(raw)
        new = change(i, row)
        out.append(orjson.dumps(new if new is not None else row))
    p.write_bytes(b"\n".join(out) + b"\n")
    if seal:
        reseal(ws)


def first_evidence(ws: Workspace) -> str:
    return sorted(ws.rel(p) for p in ws.evidence.rglob("*.jsonl"))[0]


def set_field(i_target: int, **values):
    def change(i, row):
        return {**row, **values} if i == i_target else None
    return change


RAG, SFT, PREF = inv.EXPORT_FILES["export-rag"], inv.EXPORT_FILES["export-sft"], inv.EXPORT_FILES["export-preference"]


# --- one tamper per check ------------------------------------------------------------------


def t_latest_run_complete(ws):
    rc.receipt_path(run_dir(ws), "export-sft").unlink()  # a receipt lost


def t_receipt_hashes(ws):
    edit_receipt(ws, "score", lambda r: r["by_source"].update({"planted": {"accepted": 1}}), rehash=False)


def t_receipt_chain(ws):
    edit_receipt(ws, "score", lambda r: r["inputs"][0].update({"sha256": "0" * 64}))


def t_receipts_match_files(ws):
    # one byte that changes no parsed value: only the file's sha256 can tell
    p = ws.root / SFT
    p.write_bytes(p.read_bytes().replace(b'"input":""', b'"input": ""', 1))


def t_no_unrecorded_outputs(ws):
    (ws.root / "exports" / "rag" / "planted.jsonl").write_text('{"id": "x"}\n')


def t_accounting_materialize(ws):
    edit_receipt(ws, "materialize", lambda r: r["counts"].update(
        rows_in=r["counts"]["rows_in"] + 1, quarantined=r["counts"]["quarantined"] + 1))


def t_accounting_score(ws):
    edit_receipt(ws, "score", lambda r: r["counts"].update(
        rows_in=r["counts"]["rows_in"] + 1, quarantined=r["counts"]["quarantined"] + 1))


def t_accounting_exports(ws):
    edit_receipt(ws, "export-rag", lambda r: r["counts"].update(
        rows_in=r["counts"]["rows_in"] + 1, quarantined=r["counts"]["quarantined"] + 1))


def t_nothing_lost(ws):
    # a quarantine record claims the source line of another one: that line is counted twice,
    # and its own line is lost
    rows = [orjson.loads(x) for x in (ws.quarantine / "materialize.jsonl").read_bytes().splitlines()]
    first, second = next((a, b) for a, b in zip(rows, rows[1:])
                         if a["provenance"]["source_file"] == b["provenance"]["source_file"]
                         and a["provenance"]["line_offset"] is not None)
    edit_rows(ws, "exports/quarantine/materialize.jsonl",
              lambda i, r: {**r, "provenance": first["provenance"]} if r["id"] == second["id"] else None)


def t_sources_match_receipt(ws):
    with open(ws.kb / "eval.csv", "ab") as f:  # a row appended to a source after the run
        f.write(b"x1,t,n,Planted?,,Yes.,0.9,li,2026-11-05T00:00:00Z\n")


def t_evidence_provenance(ws):
    # a source line changed after the run, and the receipt re-sealed to hide that the file changed
    rows = (orjson.loads(line) for f in sorted(ws.evidence.rglob("*.jsonl")) for line in f.read_bytes().splitlines())
    src = next(r["provenance"]["source_file"] for r in rows
               if "record" not in r["provenance"] and r["provenance"]["source_file"].endswith(".jsonl"))
    p = ws.root / src
    lines = p.read_bytes().splitlines(keepends=True)
    for n, line in enumerate(lines):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            lines[n] = orjson.dumps({**obj, "planted": True}) + b"\n"
            break
    p.write_bytes(b"".join(lines))
    reseal(ws)


def t_scored_provenance(ws):
    edit_rows(ws, first_evidence(ws), set_field(0, model="planted-model"))


def t_export_provenance(ws):
    prov = orjson.loads((ws.root / RAG).read_bytes().splitlines()[0])["provenance"]
    edit_rows(ws, prov["source_file"], set_field(prov["line_offset"], task_name="planted"))


def t_sft_never_rejected_or_review(ws):
    # an SFT row whose provenance (id and sig_hash consistent) leads to a rejected scored run:
    # exactly the leak the invariant exists for
    rel, n, scored = next((rel, n, row) for rel in sorted(ws.rel(p) for p in ws.scored_runs.rglob("*.jsonl"))
                          for n, row in enumerate(map(orjson.loads, (ws.root / rel).read_bytes().splitlines()))
                          if row["category"] == "rejected")
    prov = {"source_file": rel, "line_offset": n, "sig_hash": sig_hash(scored), "recorded_at": scored["recorded_at"]}
    edit_rows(ws, SFT, set_field(0, id="sft-" + scored["id"][3:], provenance=prov))


def t_rag_categories(ws):
    # a rejected row in RAG, and the receipt's category counts made to agree
    was = orjson.loads((ws.root / RAG).read_bytes().splitlines()[0])["category"]
    edit_rows(ws, RAG, set_field(0, category="rejected"), seal=False)
    edit_receipt(ws, "export-rag", lambda r: r["by_category"].update(
        {was: r["by_category"][was] - 1, "rejected": 1}))
    reseal(ws)


def t_preference_no_self_pairs(ws):
    # the pair names one row on both sides (were its provenance also the chosen's, the "rejected"
    # side would be accepted and preference_chosen_outranks would fail with it)
    edit_rows(ws, PREF, lambda i, r: {**r, "rejected_id": r["chosen_id"]} if i == 0 else None)


def t_preference_no_identical_texts(ws):
    edit_rows(ws, PREF, lambda i, r: {**r, "rejected": r["chosen"].upper() + "  "} if i == 0 else None)


def t_preference_chosen_outranks(ws):
    edit_rows(ws, PREF, lambda i, r: {**r, "chosen_score": r["rejected_score"], "rejected_score": r["chosen_score"]}
              if i == 0 else None)


def t_preference_pair_limit(ws):
    (ws.root / "refinery.toml").write_text((ws.root / "refinery.toml").read_text().replace(
        "max_pairs_per_task = 2", "max_pairs_per_task = 1"))


def t_no_duplicate_answers(ws):
    rows = list(map(orjson.loads, (ws.root / RAG).read_bytes().splitlines()))
    edit_rows(ws, RAG, lambda i, r: {**r, "task_key": rows[0]["task_key"], "response": rows[0]["response"],
                                     "tool_calls": rows[0]["tool_calls"]} if i == 1 else None)


def t_near_duplicates_named(ws):
    import re

    named = re.compile(r"sft-[0-9a-f]{16}")
    q = "exports/quarantine/export-sft.jsonl"
    kept = next(named.search(r["detail"])[0] for r in map(orjson.loads, (ws.root / q).read_bytes().splitlines())
                if r["reason"] == "near_duplicate")
    other = next(r["id"] for r in map(orjson.loads, (ws.root / SFT).read_bytes().splitlines()) if r["id"] != kept)
    # the refusal names another row of the export: one it is not near
    edit_rows(ws, q, lambda i, r: {**r, "detail": named.sub(other, r["detail"])}
              if r["reason"] == "near_duplicate" else None)


def t_no_secrets_in_exports(ws):
    edit_rows(ws, RAG, lambda i, r: {**r, "response": r["response"] + " Use sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c."}
              if i == 0 else None)


def t_export_quarantine_holds_no_text(ws):
    edit_rows(ws, "exports/quarantine/export.jsonl", set_field(0, preview="the refused answer, copied"))


def t_unique_ids(ws):
    rows = list(map(orjson.loads, (ws.quarantine / "export.jsonl").read_bytes().splitlines()))
    edit_rows(ws, "exports/quarantine/export.jsonl", set_field(1, id=rows[0]["id"]))


def t_schemas(ws):
    edit_rows(ws, RAG, set_field(0, score="high"))


TAMPERS = {k: globals()[f"t_{k}"] for k in KEYS}


def test_every_invariant_has_a_tamper():
    assert list(TAMPERS) == KEYS


#: Where checks cannot be told apart: without a stage's receipt, the checks that read that
#: receipt fail too.
ALSO = {"latest_run_complete": {"receipt_hashes", "accounting_exports", "no_unrecorded_outputs"}}


@pytest.mark.parametrize("key", KEYS)
def test_each_invariant_fails_alone_on_its_tamper(gws, key):
    assert failing(gws) == set()
    TAMPERS[key](gws)
    assert failing(gws) == {key} | ALSO.get(key, set())
    assert problems_of(gws, key)  # and says what it found


def test_a_near_duplicate_refusal_is_checked_against_the_row_it_names(gws):
    """Each refusal is compared with the kept row it names (each kept row signed once, the
    refusals' signatures read back): one that names a row the export does not hold is named by
    its own line, one that names a row it is not near says how near it is."""
    import re

    q = "exports/quarantine/export-sft.jsonl"
    named = re.compile(r"sft-[0-9a-f]{16}")
    original = (gws.root / q).read_bytes()
    rows = list(map(orjson.loads, original.splitlines()))
    at = next(i for i, r in enumerate(rows) if r["reason"] == "near_duplicate")
    offset = sum(len(line) + 1 for line in original.splitlines()[:at])
    edit_rows(gws, q, lambda i, r: {**r, "detail": named.sub("sft-00000000000000ab", r["detail"])} if i == at else None)
    assert problems_of(gws, "near_duplicates_named") == [
        f"{q}:{offset}: refused as a near-duplicate of sft-00000000000000ab, which is not in {SFT}"]
    (gws.root / q).write_bytes(original)
    other = next(r["id"] for r in map(orjson.loads, (gws.root / SFT).read_bytes().splitlines())
                 if r["id"] != named.search(rows[at]["detail"])[0])
    edit_rows(gws, q, lambda i, r: {**r, "detail": named.sub(other, r["detail"])} if i == at else None)
    (found,) = problems_of(gws, "near_duplicates_named")
    assert re.fullmatch(rf"{q}:{offset}: refused as a near-duplicate of {other} \({SFT}:\d+\), but "
                        r"their estimated similarity is 0\.\d{3}, under 0\.8", found), found


def test_the_row_a_near_duplicate_refusal_names_is_no_card_number(gws):
    """The kept row's id is 16 hex digits of a sha256: now and then all decimal, and then a
    Luhn-valid card number (seen at 10^6 rows) or a phone number to the scans. Refinery made it,
    so the audit's scans do not read it; a card number anywhere else in the detail still fails."""
    q = "exports/quarantine/export-sft.jsonl"
    at = next(i for i, r in enumerate(map(orjson.loads, (gws.root / q).read_bytes().splitlines()))
              if r["reason"] == "near_duplicate")
    card = "4532015112830366"  # a Luhn-valid test Visa number

    def name(detail: str) -> None:
        edit_rows(gws, q, lambda i, r: {**r, "detail": detail} if i == at else None)

    name(f"near-duplicate of sft-{card}, kept in the export (estimated Jaccard similarity 0.812; threshold 0.8)")
    assert problems_of(gws, "no_secrets_in_exports") == []
    name(f"near-duplicate of sft-0000000000000001, kept in the export (card {card}; threshold 0.8)")
    assert any("credit_card in detail" in p for p in problems_of(gws, "no_secrets_in_exports"))


def test_an_edited_byte_is_caught_and_the_file_named(gws):
    for rel in (first_evidence(gws), RAG, "exports/quarantine/score.jsonl", "data/scored-runs/manifest.json"):
        p = gws.root / rel
        data = p.read_bytes()
        p.write_bytes(data[:-1] + (b" " if data[-1:] != b" " else b"\t"))
        found = problems_of(gws, "receipts_match_files")
        assert any(f.startswith(f"{rel} changed since") for f in found), (rel, found)
        p.write_bytes(data)
    assert problems_of(gws, "receipts_match_files") == []


def test_a_crashing_check_fails_without_hiding_the_others(gws, monkeypatch):
    def boom(ctx):
        raise RuntimeError("bug in a check")

    checks = inv.run_checks(inv.Context(gws, load_config(gws.root)), [("a", "a", boom), *inv.INVARIANTS[:2]])
    assert [c.ok for c in checks] == [False, True, True]
    assert checks[0].problems == ["the check itself failed: RuntimeError: bug in a check"]


def test_a_killed_or_failed_run_after_a_complete_one_is_not_a_failure(gws):
    """The outputs on disk are the newest complete run's: a later run that published nothing
    does not make the workspace unsound."""
    d = gws.reports / "29991231T000000000Z-dead"
    d.mkdir()
    summary = orjson.loads((run_dir(gws) / "summary.json").read_bytes())
    (d / "summary.json").write_bytes(orjson.dumps({**summary, "run_id": d.name, "status": "incomplete"}))
    ctx = inv.Context(gws, load_config(gws.root))
    assert ctx.newest["run_id"] == d.name and ctx.summary["run_id"] != d.name
    assert failing(gws) == set()


def test_a_damaged_receipt_is_a_failed_check_not_a_traceback(gws):
    rc.receipt_path(run_dir(gws), "score").write_text("{bad")
    checks = {c.key: c for c in inv.run_checks(inv.Context(gws, load_config(gws.root)), inv.INVARIANTS)}
    assert "not valid JSON" in checks["latest_run_complete"].problems[0]


def test_nothing_lost_holds_for_gzip_csv_with_multiline_fields(tmp_path):
    """CSV offsets count the decompressed text's lines, which a .csv.gz's bytes do not tell."""
    import gzip

    from refinery.config import load_config
    from refinery.invariants import Context, nothing_lost
    from refinery.runs import run_all

    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "_kb").mkdir(parents=True)
    prompt = '"line one\nline two\nline three\nline four"'
    rows = "".join(f"e{i},t{i},n,{prompt},x,y,0.9,li,2026-11-0{1 + i % 5}T00:00:00Z\n" for i in range(10))
    head = "eval_id,task_id,task_name,prompt,expected,output,score,approver,evaluated_at\n"
    (tmp_path / "data" / "_kb" / "eval.csv.gz").write_bytes(gzip.compress((head + rows).encode(), mtime=0))
    run_all(ws, load_config(ws.root))
    assert nothing_lost(Context(ws, load_config(ws.root))) == []


def test_unique_ids_in_buckets_on_disk_reports_the_earliest_repeats_in_file_order(gws, monkeypatch):
    """Ids go to hash buckets on disk (memory flat at 10^6 rows); however many buckets, the
    report is the first MAX_PROBLEMS repeats in file order and a count of the rest."""
    rows = list(map(orjson.loads, (gws.quarantine / "export.jsonl").read_bytes().splitlines()))
    assert len(rows) > 30
    # rows 10 to 39 repeat the ids of rows 0 to 9: more repeats than are reported
    edit_rows(gws, "exports/quarantine/export.jsonl",
              lambda i, r: {**r, "id": rows[i % 10]["id"]} if 10 <= i < 40 else None)
    one = problems_of(gws, "unique_ids")
    repeats = 30
    assert len(one) == inv.MAX_PROBLEMS + 1 and one[-1] == f"... and {repeats - inv.MAX_PROBLEMS} more"
    assert one[0] == (f"quarantine: id {rows[0]['id']} at exports/quarantine/export.jsonl:10 is also at "
                      "exports/quarantine/export.jsonl:0")
    monkeypatch.setattr(inv, "UNIQUE_ID_BUCKET_BYTES", 1024)  # dozens of buckets
    assert problems_of(gws, "unique_ids") == one


def test_a_pair_without_a_recorded_sig_is_one_problem_not_a_shift_of_every_later_one(gws):
    """The pairs' scored runs are resolved into flat arrays; a missing or short sig_hash on one
    pair must flag that pair alone."""
    pairs = (gws.root / PREF).read_bytes().splitlines()
    assert len(pairs) >= 3
    last = len(pairs) - 2

    def drop_sig(i, row):
        if i != last:
            return None
        prov = {k: v for k, v in row["rejected_provenance"].items() if k != "sig_hash"}
        return {**row, "rejected_provenance": prov}

    edit_rows(gws, PREF, drop_sig)
    found = problems_of(gws, "export_provenance")
    assert len(found) == 1 and found[0].startswith(f"{PREF}:{last} (rejected)") and "sig_hash differs" in found[0]


def test_chosen_outranks_compares_task_keys_as_written(gws):
    """1 and "1" are different task keys; a score that is not a number is named, not a crash."""
    pair = orjson.loads((gws.root / PREF).read_bytes().splitlines()[0])
    sides = [pair["provenance"], pair["rejected_provenance"]]

    def retype(field, value, offset):
        def change(i, row):
            return {**row, field: value} if i == offset else None
        return change

    originals = {p["source_file"]: (gws.root / p["source_file"]).read_bytes() for p in sides}
    edit_rows(gws, sides[0]["source_file"], retype("score", "high", sides[0]["line_offset"]), seal=False)
    found = problems_of(gws, "preference_chosen_outranks")
    assert len(found) == 1 and "score is not a number ('high'" in found[0]
    for rel, data in originals.items():
        (gws.root / rel).write_bytes(data)
    for p in sides:  # both scored runs say task 1, the pair says task "1"
        edit_rows(gws, p["source_file"], retype("task_key", 1, p["line_offset"]), seal=False)
    edit_rows(gws, PREF, retype("task_key", "1", 0), seal=False)
    found = problems_of(gws, "preference_chosen_outranks")  # (other pairs share one of the two runs)
    assert found[0] == f"pair {pair['id']} (line 0): chosen and rejected answer different tasks"
