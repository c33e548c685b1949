"""`refinery report`: one self-contained page of a run, every number linked to the command that
proves it — checked by running those commands, and by rendering the page in headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import orjson
import pytest
from typer.testing import CliRunner

from refinery import report
from refinery.cli import app
from refinery.runs import load_run, resolve_run

NUMBER = re.compile(r'<a class="n" href="#p(\d+)" title="([^"]*)">([^<]*)</a>')


def _numbers(page: str) -> list[tuple[str, str, str]]:
    """(proof anchor, command, number shown) of every linked number."""
    return [(m.group(1), html.unescape(m.group(2)), html.unescape(m.group(3))) for m in NUMBER.finditer(page)]


def test_the_report_is_one_page_of_the_run_with_its_charts(sample_run, ws):
    result = CliRunner().invoke(app, ["report", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    rid = resolve_run(ws, None)
    path = ws.reports / rid / report.REPORT
    assert result.output.strip() == str(path)
    page = path.read_text()
    # self-contained: nothing to fetch, no script
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page and "<link" not in page
    assert page.count("<svg") >= 4  # flow, categories, rules, trend or composition
    assert path.stat().st_size < 1 << 20
    # every number links to a command listed at the end, and the stage counts are the receipts'
    numbers = _numbers(page)
    anchors = set(re.findall(r'<li id="p(\d+)">', page))
    assert numbers and {a for a, _, _ in numbers} <= anchors
    _, receipts, _ = load_run(ws, rid)
    for stage, r in receipts.items():
        for key in ("rows_in", "rows_out", "quarantined"):
            cmd = report._jq(f".counts.{key}", f"{ws.rel(ws.reports)}/{rid}/receipts/{stage}.json")
            assert (f"{r['counts'][key]:,}" in [shown for _, c, shown in numbers if c == cmd]), (stage, key)
    # built again from the same run: the same bytes
    before = path.read_bytes()
    report.build(ws, rid)
    assert path.read_bytes() == before


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (apt-get install jq)")
def test_every_number_is_what_its_command_prints(sample_run, ws):
    """Run each number's command in the workspace, as a reader of the page would (the audit
    ledger's numbers too: two rows of it, as two passing audits append them)."""
    metrics = lambda i: {"source_rows": 100.0 + i, "evidence_rows": 90.0, "category_share_pct.accepted": 22.84 + i}  # noqa: E731
    rows = [{"seq": i, "run_id": f"20200101T00000{i}Z-0000", "metrics": metrics(i)} for i in (1, 2)]
    (ws.kb / "audit_baselines.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    _adapter(ws)
    page = report.build(ws).read_text()
    assert "Audit ledger: 2 passing audits" in page and page.count("<svg") >= 6
    assert "Training: the adapters kept" in page and "ad-0123456789ab" in page and "Replay A/B" in page
    assert _mismatches(page, ws.root) == [] and len(_numbers(page)) > 50


def _adapter(ws) -> None:
    """An adapter folder as `train run` and `train eval` leave it (what the page reads of it)."""
    folder = ws.root / "distill_out" / "ad-0123456789ab"
    (folder / "eval").mkdir(parents=True)
    (folder / "receipt.json").write_bytes(orjson.dumps({"steps": 3, "final_val_loss": 1.25}))
    (folder / "metrics.json").write_bytes(orjson.dumps({"train_loss": [[1, 2.5], [2, 1.75], [3, 1.5]],
                                                        "val_loss": [[0, 2.75], [3, 1.25]]}))
    (folder / "eval" / "comparison.json").write_bytes(orjson.dumps({"average": {"base": 0.5, "adapter": 0.625}}))
    replay = ws.root / "distill_out" / "replay-eval"
    replay.mkdir()
    mode = lambda match: {"rows": 4, "answer_match": match, "grounding": 0.75, "format_valid": 1.0,  # noqa: E731
                          "failed_checks": 0, "latency_ms": {"mean": 812.5}}
    (replay / "report.json").write_bytes(orjson.dumps({"tasks": 4, "model": "base + ad-0123456789ab",
                                                       "modes": {"retrieval": mode(0.5), "no_retrieval": mode(0.25)}}))


def _mismatches(page: str, root) -> list[str]:
    """The commands of the page that print another number than the one they link from."""
    printed: dict[str, str] = {}
    bad = []
    for _, cmd, shown in _numbers(page):
        if cmd not in printed:
            printed[cmd] = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True,
                                          timeout=60).stdout.strip()
        if printed[cmd] != shown.replace(",", ""):
            bad.append(f"{cmd}: {printed[cmd]!r}, not {shown}")
    return bad


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (apt-get install jq)")
def test_a_page_whose_outputs_were_replaced_proves_its_numbers_from_its_receipts(sample_run, ws):
    """A stage command run after the run (or a later run) replaces the files the run wrote:
    the page says so, and each number's command reads the run's receipts, not today's files."""
    rid = resolve_run(ws, None)
    runs = next(ws.kb.glob("runs*.csv"))
    runs.write_bytes(b"".join(runs.read_bytes().splitlines(keepends=True)[:40]))
    for cmd in ("materialize", "score", "export-all"):
        assert CliRunner().invoke(app, [cmd, "--workspace", str(ws.root)]).exit_code == 0
    page = report.build(ws, rid).read_text()
    assert "its outputs are not on disk as it wrote them" in page
    assert _mismatches(page, ws.root) == []


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (`make browser` installs it)")
def test_the_page_renders_in_a_browser_with_its_charts_and_no_console_message(sample_run, ws, tmp_path):
    """Headless Chromium opens the page from disk: no console message or failed load, the DOM it
    built holds the charts' drawn shapes, and its screenshot is not blank."""
    path = report.build(ws)
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--window-size=1100,2000"]
    dom = subprocess.run([*args, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Failed to load" in line]
    svgs = re.findall(r"<svg\b.*?</svg>", dom.stdout, flags=re.S)
    assert len(svgs) >= 4 and all(s.count("<path") + s.count("<rect") > 10 for s in svgs)
    shot = tmp_path / "page.png"
    done = subprocess.run([*args, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert (pixels[:, :, :3].sum(axis=2) < 2.5).mean() > 0.05  # a twentieth of the page is not white


def test_a_run_without_its_outputs_on_disk_is_reported_from_its_receipts(sample_run, ws):
    """An older run's outputs were replaced by the newer run's: its page says so and takes its
    counts from its receipts only (no rules, no export composition)."""
    first = resolve_run(ws, None)
    CliRunner().invoke(app, ["run-all", "--force", "--workspace", str(ws.root)])
    page = report.build(ws, first).read_text()
    assert "its outputs are not on disk as it wrote them" in page
    assert "Rules that fired most" not in page and "What the exports are made of" not in page
    newest = report.build(ws).read_text()
    assert "Trend over the last complete runs" in newest and "Rules that fired most" in newest


def test_no_run_is_a_clear_error(ws):
    result = CliRunner().invoke(app, ["report", "--workspace", str(ws.root)])
    assert result.exit_code == 2 and "run `refinery run-all` first" in result.output


def test_the_proofs_are_plain_commands():
    p = report._Proofs()
    link = p.n(1234, "jq '.counts.rows_in' x.json")
    assert link == '<a class="n" href="#p1" title="jq &#x27;.counts.rows_in&#x27; x.json">1,234</a>'
    assert p.n(5, "jq '.counts.rows_in' x.json").startswith('<a class="n" href="#p1"')  # one entry per command
    assert orjson.dumps(p.commands) == b'{"jq \'.counts.rows_in\' x.json":1}'


def test_names_are_drawn_as_text_and_a_page_that_fails_never_fails_the_run(ws, monkeypatch):
    """A source named like maths ("v$1_a_b$") or starting with "_" is drawn as it is written; and
    should the page fail all the same, run-all says so and ends as the run did."""
    svg = report._hbars([("v$1_a_b$", {"_x": 1, "cost$5$": 2})], ["_x", "cost$5$"], "t")
    assert "v$1_a_b$" in svg and "cost$5$" in svg and "_x" in svg
    from conftest import copy_sample

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(report, "build", broken)
    monkeypatch.setenv("REFINERY_REPORT", "1")
    copy_sample(ws.kb)
    done = CliRunner().invoke(app, ["run-all", "--workspace", str(ws.root)])
    assert done.exit_code == 0 and "warning: no report page: ValueError: cannot draw" in done.output


def test_a_chart_of_many_sources_folds_the_smallest_into_others():
    """Hundreds of sources (a file each) would be hundreds of bars and a legend as long: a chart
    keeps the largest and sums the rest; the tables still list every one."""
    rows = [(f"s{i}", {f"k{j}": i + j for j in range(20)}) for i in range(100)]
    folded, keys = report._fold(rows, [f"k{j}" for j in range(20)])
    assert len(folded) == report.MAX_BARS and folded[-1][0] == "76 others"
    assert len(keys) == report.MAX_SEGMENTS and keys[-1] == "others"
    total = lambda rs, ks: sum(c.get(k, 0) for _, c in rs for k in ks)  # noqa: E731
    assert total(folded, keys) == total(rows, [f"k{j}" for j in range(20)])  # nothing lost


def test_run_all_and_audit_full_write_the_page(ws, monkeypatch):
    """At the end of run-all (unless every stage was reused) and of audit-full (with the ledger
    it appended to), the run's page is written and its path said; --no-report leaves it out."""
    from conftest import copy_sample

    monkeypatch.setenv("REFINERY_REPORT", "1")
    copy_sample(ws.kb)
    runner = CliRunner()
    first = runner.invoke(app, ["run-all", "--workspace", str(ws.root)])
    assert first.exit_code == 0, first.output
    rid = resolve_run(ws, None)
    page = ws.reports / rid / report.REPORT
    assert f"report page: {page}" in first.output and page.is_file()
    again = runner.invoke(app, ["run-all", "--workspace", str(ws.root)])
    assert "nothing was recomputed: `refinery report` writes this run's page" in again.output
    assert not (ws.reports / resolve_run(ws, None) / report.REPORT).exists()
    audited = runner.invoke(app, ["audit-full", "--no-rerun", "--workspace", str(ws.root)])
    assert "report page: " in audited.output
    forced = runner.invoke(app, ["run-all", "--force", "--no-report", "--workspace", str(ws.root)])
    assert forced.exit_code == 0 and "report page: " not in forced.output


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (apt-get install jq)")
def test_a_command_holds_any_name_as_a_string_never_as_shell(tmp_path):
    """A source or rule is named by its operator's files: quotes, `$(…)` and backslashes in a
    name stay inside the jq string, so the command shown can be pasted as it is."""
    name = "it's \"odd\" $(touch pwned) \\ `x`"
    (tmp_path / "rows.jsonl").write_bytes(b"".join(orjson.dumps({"source": n}) + b"\n" for n in (name, "x")))
    cmd = f"{report._jq(f'select(.source=={report._lit(name)})', 'rows.jsonl')} | wc -l"
    done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "1" and not (tmp_path / "pwned").exists()
