"""Quarantine records keep a refused row's place, length, hash and a redacted preview — never
the row's raw bytes, which may hold the very secret the operator must not see copied."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import quarantine_rows, write_kb
from refinery import materialize, score
from refinery.config import ConfigError, load_config
from refinery.models import QuarantineRecord
from refinery.quarantine import ELLIPSIS, REDACT_MARGIN, quarantine_record, redacted_preview
from refinery.reasons import Reason

KEY = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
EMAIL = "ops.lead@example.com"
SECRETS = (KEY.encode(), EMAIL.encode(), b"sk-live")

GOOD = (b'{"trace_id":"t1","task_id":"travel-001","started_at":"2026-11-01T07:00:00Z","messages":'
        b'[{"role":"user","content":"Cheapest flight?"},{"role":"assistant","content":"TP1234."}],'
        b'"status":"completed","stop_reason":"end_turn"}')
#: (a) does not parse; holds a key and an email
UNPARSEABLE = f'{{"trace_id":"t2","note":"use {KEY} or write to {EMAIL}", "started_at":'.encode()
#: (b) a key, then a byte that is not UTF-8
BAD_UTF8 = f'{{"trace_id":"t3","note":"key {KEY}","x":"'.encode() + b'\xff"}'
#: (b) over the 512-byte limit: a key near the start, and one cut by the 256 bytes the reader keeps
TOO_LONG = (f'{{"trace_id":"t4","note":"{KEY} '.encode() + b"a" * 178 + f' {KEY}'.encode()
            + b'","pad":"' + b"p" * 600 + b'"}')
#: (c) parses, refused for a missing user message; the system message holds a key and an email
MISSING = (f'{{"trace_id":"t5","task_id":"travel-001","started_at":"2026-11-01T07:50:00Z","messages":'
           f'[{{"role":"system","content":"Use {KEY}; escalate to {EMAIL}"}}]}}').encode()
LINES = [GOOD, UNPARSEABLE, BAD_UTF8, TOO_LONG, MISSING]


def refuse_all(ws, preview_chars: int | None = None):
    toml = "[materialize]\nmax_line_bytes = 512\n"
    if preview_chars is not None:
        toml += f"quarantine_preview_chars = {preview_chars}\n"
    (ws.root / "refinery.toml").write_text(toml)
    write_kb(ws, {"agent_transcripts.jsonl": b"\n".join(LINES) + b"\n"})
    result = materialize.run(ws, load_config(ws.root), validate=True)
    assert (result.rows_in, result.evidence) == (5, 1)
    return {r["provenance"]["line_offset"]: r for r in quarantine_rows(ws)}


def test_materialize_quarantine_holds_no_secret(ws):
    q = refuse_all(ws)
    assert {o: r["reason"] for o, r in q.items()} == {1: "invalid_json", 2: "invalid_utf8", 3: "line_too_long",
                                                      4: "missing_field"}
    data = (ws.quarantine / "materialize.jsonl").read_bytes()
    for secret in SECRETS:
        assert secret not in data
    for r in q.values():
        QuarantineRecord.model_validate(r)
        assert "[REDACTED:api_key]" in r["preview"]
        assert len(r["preview"]) <= 241
    assert "[REDACTED:email]" in q[1]["preview"] and "[REDACTED:email]" in q[4]["preview"]
    assert q[2]["preview"].endswith('"x":"\\xff"}')  # the bad byte, escaped as before


def test_length_and_hash_are_of_the_line_bytes(ws):
    q = refuse_all(ws)
    kept = {1: UNPARSEABLE, 2: BAD_UTF8, 3: TOO_LONG[:256], 4: MISSING}  # a too-long line: its first bytes
    for offset, raw in kept.items():
        assert q[offset]["raw_length"] == len(raw)
        assert q[offset]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    # a line that does not parse is pinned by the hash of its bytes: the same hash, twice
    for offset in (1, 2, 3):
        assert q[offset]["raw_sha256"] == q[offset]["provenance"]["sig_hash"]
    # a parsed row is pinned by its canonical JSON; raw_sha256 is still the line's own bytes
    assert q[4]["provenance"]["sig_hash"] != q[4]["raw_sha256"]


def test_a_line_cut_by_the_reader_loses_the_token_the_cut_runs_through(ws):
    # the preview could hold all 256 bytes the reader kept, but they end inside a key too short
    # to be recognised there: it is dropped, not kept in part
    q = refuse_all(ws, preview_chars=1000)
    assert q[3]["preview"].endswith("a " + ELLIPSIS)
    assert b"sk-live" not in (ws.quarantine / "materialize.jsonl").read_bytes()


def test_the_preview_is_cut_to_the_configured_length(ws):
    q = refuse_all(ws, preview_chars=40)
    for r in q.values():
        assert len(r["preview"]) <= 41
    assert q[4]["preview"] == '{"trace_id":"t5","task_id":"travel-001",' + ELLIPSIS


def test_no_preview_when_none_is_wanted(ws):
    q = refuse_all(ws, preview_chars=0)
    assert all(r["preview"] is None and r["raw_length"] is not None for r in q.values())


def test_the_old_setting_is_refused_by_name(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nquarantine_raw_max = 100\n")
    with pytest.raises(ConfigError, match="quarantine_raw_max"):
        load_config(ws.root)


def test_score_quarantine_holds_no_secret(ws, cfg):
    part = ws.evidence / "2026" / "11" / "01" / "x.jsonl"
    part.parent.mkdir(parents=True)
    part.write_bytes(UNPARSEABLE + b"\n")
    score.run(ws, cfg)
    [r] = quarantine_rows(ws, "score")
    assert r["reason"] == "invalid_evidence" and "[REDACTED:api_key]" in r["preview"]
    assert r["raw_sha256"] == hashlib.sha256(UNPARSEABLE).hexdigest() == r["provenance"]["sig_hash"]
    data = (ws.quarantine / "score.jsonl").read_bytes()
    assert KEY.encode() not in data and EMAIL.encode() not in data


def test_a_cut_never_leaves_part_of_a_token():
    token = "Q7xv" * 20  # a long token nothing recognises as a secret
    assert redacted_preview(f"{'w' * 230} {token} tail".encode(), 240) == "w" * 230 + " " + ELLIPSIS
    # a cut at a token's end keeps it whole
    assert redacted_preview(f"{'w' * 230} {token[:9]} tail".encode(), 240) == f"{'w' * 230} {token[:9]}{ELLIPSIS}"
    # compact JSON has no spaces: its delimiters end tokens too, so its start is kept
    row = b'{"id":"r1","note":"' + token.encode() + b'"}'
    assert redacted_preview(row, 30) == '{"id":"r1","note":"' + ELLIPSIS
    # a redaction marker cut by the end goes whole, not as "[REDACT"
    assert redacted_preview(f"key {KEY} and more".encode(), 10) == "key " + ELLIPSIS


def test_the_redaction_reads_a_bounded_window(monkeypatch):
    from refinery import sensitive

    seen = []
    real = sensitive.redact
    monkeypatch.setattr(sensitive, "redact", lambda text: seen.append(len(text)) or real(text))
    row = f"{KEY} ".encode() + b"x" * (1 << 20)
    assert redacted_preview(row, 240) == "[REDACTED:api_key] " + ELLIPSIS
    assert seen == [240 + REDACT_MARGIN]
    # what the redaction replaced can leave the text shorter than the preview: still marked cut
    assert redacted_preview(b"-----BEGIN PRIVATE KEY-----" + b"A" * 9000, 240) == "[REDACTED:private_key]" + ELLIPSIS


def test_a_short_row_is_kept_whole_and_redacted():
    assert redacted_preview(f"mail {EMAIL}".encode(), 240) == "mail [REDACTED:email]"


def test_a_record_without_row_text_keeps_none():
    r = quarantine_record("export-sft", "s", "data/scored-runs/x.jsonl", 3, Reason.SECRET_DETECTED,
                          "api_key in response", "0" * 64)
    assert (r["raw_length"], r["raw_sha256"], r["preview"]) == (None, None, None)
    QuarantineRecord.model_validate(r)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode)), st.integers(1, 300))
def test_the_preview_never_exceeds_its_length(raw, n):
    from refinery import sensitive

    p = redacted_preview(raw, n)
    assert len(p) <= n + 1
    full, _ = sensitive.redact(raw.decode("utf-8", "backslashreplace"))
    if p != full:  # cut: what is left is a start of the redacted text, and says it was cut
        assert p.endswith(ELLIPSIS) and full.startswith(p[:-1])


def test_a_detail_that_quotes_a_value_is_redacted(ws):
    # a transform's message may quote the field it refused ("got 'up, my card …'")
    card, mail = "4111 1111 1111 1111", "alice.smith@example.com"
    write_kb(ws, {"human_feedback.jsonl": (
        f'{{"feedback_id":"f1","trace_id":"t1","reviewer":"li","rated_at":"2026-11-01T07:00:00Z",'
        f'"thumbs":"up, my card {card} and mail {mail}"}}\n').encode()})
    materialize.run(ws, load_config(ws.root), validate=True)
    data = (ws.quarantine / "materialize.jsonl").read_text()
    assert card not in data and mail not in data
    (q,) = quarantine_rows(ws)
    assert "[REDACTED:credit_card]" in q["detail"] and "[REDACTED:email]" in q["detail"]


def test_a_preview_with_anything_left_after_redaction_is_dropped(monkeypatch):
    from refinery import sensitive

    # a redaction that found something but left it in place
    monkeypatch.setattr(sensitive, "redact", lambda value, allow=(): (value, ["api_key"]))
    assert redacted_preview(f'{{"note":"{KEY}"}}'.encode(), 240) is None
    assert redacted_preview(b'{"note":"nothing here"}', 240) == '{"note":"nothing here"}'
