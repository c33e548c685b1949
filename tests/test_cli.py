from __future__ import annotations

import re
import subprocess
import sys

import orjson
import pytest
from typer.testing import CliRunner

from conftest import REPO, copy_sample, passing_audit_baseline, write_kb, write_transform
from refinery import export
from refinery.cli import app

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 200


GROUPS = {g.name: g.typer_instance for g in app.registered_groups}
TRAIN_COMMANDS = sorted(c.name for c in GROUPS["train"].registered_commands)
REVIEW_COMMANDS = sorted(c.name for c in GROUPS["review"].registered_commands)


@pytest.mark.parametrize("group,command", [("train", c) for c in TRAIN_COMMANDS] +
                         [("review", c) for c in REVIEW_COMMANDS])
def test_every_group_command_has_help(group, command):
    result = invoke(group, command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 200


def _help_commands() -> dict[str, object]:
    import typer.main

    root = typer.main.get_command(app)
    found = {"": root}
    for name, cmd in root.commands.items():
        found[name] = cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            found[f"{name} {sub}"] = subcmd
    return found


HELP_COMMANDS = _help_commands()


@pytest.mark.parametrize("command", sorted(HELP_COMMANDS))
def test_help_text_is_shown_as_written(command):
    """Help is plain text wrapped to the terminal: no paragraph broken where the docstring's
    lines happen to end, and nothing in square brackets swallowed as markup."""
    import inspect

    cmd = HELP_COMMANDS[command]
    result = runner.invoke(app, [*command.split(), "--help"], terminal_width=10_000, max_content_width=10_000)
    assert result.exit_code == 0
    lines = {line.strip() for line in result.output.splitlines()}
    for paragraph in inspect.cleandoc(cmd.help or "").split("\n\n"):
        assert " ".join(paragraph.split()) in lines, paragraph
    for param in cmd.params:
        if getattr(param, "help", None):
            assert " ".join(param.help.split()) in result.output, param.help


def test_brackets_in_help_and_include_partial_only_where_it_acts():
    assert "[replay.escalation] of refinery.toml" in invoke("replay", "--help").output
    for command in ("export-rag", "export-preference"):
        assert "--include-partial" not in invoke(command, "--help").output, command
    for command in ("export-sft", "export-all", "run-all"):
        assert "The SFT export also takes partially_accepted rows" in " ".join(
            invoke(command, "--help").output.split()), command


def test_every_command_has_a_make_target():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    assert set(COMMANDS) <= targets, f"commands without a Make target: {set(COMMANDS) - targets}"


def test_make_clean_leaves_the_sample_folder_as_committed(tmp_path):
    """`make clean` removes every generated path .gitignore lists — the outputs, and what using the
    sample writes into data/_kb/ (replay log, training log, audit ledger) — and nothing else: after
    it, `git status --ignored` shows only the tooling."""
    import shutil

    from refinery.audit import LEDGER
    from refinery.replay.session import REPLAY_LOG
    from refinery.training.registry import ROUTER
    from refinery.training.train import RUNS_LOG

    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("Makefile", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / "data" / "_kb").mkdir(parents=True)
    (root / "data" / "_kb" / "runs.csv").write_text("run_id\nr1\n")  # the committed sample
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "sample"], check=True)
    ignore = (REPO / ".gitignore").read_text().split("\n# generated outputs", 1)[1].split("\n", 1)[1]  # not tooling
    patterns = [p for p in ignore.splitlines() if p and not p.startswith("#")]
    for name in (LEDGER, REPLAY_LOG, RUNS_LOG):
        assert f"/data/_kb/{name}" in patterns, name
    assert f"/{ROUTER}" in patterns
    for p in patterns:  # one generated file or folder for each pattern
        target = root / p.strip("/").replace("*", "-x")
        if p.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            (target / "f").write_text("x")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")
    (root / ".venv").mkdir()
    (root / ".venv" / "keep").write_text("x")
    proc = subprocess.run(["make", "-s", "clean"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status = subprocess.run([*git, "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    assert status.splitlines() == ["!! .venv/"]


def test_python_dash_m_and_help_stay_light():
    code = ("import sys, runpy; sys.argv=['refinery','--help']\n"
            "try:\n    runpy.run_module('refinery', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('mlx', 'mlx_lm', 'transformers', 'torch', 'polars', 'bm25s') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "materialize" in proc.stdout


def test_python_dash_m_without_the_dependencies_says_how_to_get_them():
    """`python3 -m refinery` from a fresh clone (a Python without typer, pydantic, ...): a short
    message naming `make install` and .venv/bin/refinery, exit 2 — not a traceback."""
    proc = subprocess.run([sys.executable, "-S", "-m", "refinery", "run-all"], capture_output=True, text=True,
                          cwd=REPO)  # -S: no site-packages, as with a bare system Python
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "typer is not installed" in proc.stderr
    assert "make install" in proc.stderr and ".venv/bin/refinery" in proc.stderr


def test_workspace_before_the_command_and_version(ws, tmp_path):
    import tomllib

    import refinery

    other = tmp_path / "other"
    (other / "data" / "_kb").mkdir(parents=True)
    (other / "data" / "_kb" / "gateway_receipts.jsonl").write_text(
        '{"ts": 1762000000, "prompt": "a", "completion": "b"}\n')
    result = invoke("--workspace", str(other), "run-all")  # REFINERY_WORKSPACE names ws: the flag wins
    assert result.exit_code == 0, result.output
    assert (other / "reports" / "distillation").is_dir() and not (ws.root / "reports").exists()
    listed = orjson.loads(invoke("-w", str(other), "sources", "-w", str(ws.root), "--json").stdout)
    assert listed["sources"] == []  # the flag after the command wins over the one before it
    assert invoke("-w", str(other), "train", "list").exit_code == 0  # through a command group too
    result = invoke("-w", str(other), "acceptance")
    assert result.exit_code == 2 and "`refinery acceptance` works without a" in result.output
    result = invoke("--version")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert result.exit_code == 0 and result.stdout == f"refinery {refinery.__version__}\n"
    assert refinery.__version__ == pyproject["project"]["version"]


@pytest.mark.slow
def test_no_escape_codes_when_output_is_not_a_terminal(ws):
    """Tables, warnings and errors into a pipe are text (rich and click detect it); the training
    progress, which mlx-lm colours by force, is checked in test_training_run."""
    import os

    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "a", "completion": "b"}\n',
                  "mystery.jsonl": '{"a": 1}\n'})  # a warning on stderr too
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")} | {
        "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    for args in (["run-all"], ["receipts"], ["run-all", "--workers", "-1"], ["--help"]):
        proc = subprocess.run([sys.executable, "-m", "refinery", *args], capture_output=True, env=env, cwd=ws.root)
        assert b"\x1b" not in proc.stdout + proc.stderr, args


def test_materialize_json_and_exit_code_ok(ws):
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "a", "completion": "b"}\nnot json\n'})
    result = invoke("materialize", "--json")
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert (out["rows_in"], out["evidence"], out["quarantined"]) == (2, 1, 1)
    assert out["by_reason"] == {"invalid_json": 1}


def test_run_all_prints_a_summary_table(ws):
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "a", "completion": "b"}\n'})
    result = invoke("run-all")
    assert result.exit_code == 0
    for stage in ("materialize", "score", "export-rag", "export-sft", "export-preference"):
        assert stage in result.stdout
    assert "needs_human_review" in result.stdout or "review" in result.stdout
    assert "quarantine, by reason" in result.stdout


def test_run_all_end_to_end_on_the_bundled_sample(ws):
    """The whole pipeline on the sample the README points at: every stage accounts for every row."""
    copy_sample(ws.kb)
    result = invoke("run-all", "--json")
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert doc["status"] == "complete" and doc["exit_code"] == 0
    r = doc["receipts"]
    m, s = r["materialize"]["counts"], r["score"]["counts"]
    # `make sample` writes 1,500 rows: 1,869 records (a Langfuse or OpenTelemetry row is several)
    assert m["rows_in"] == 1869 == m["rows_out"] - m["split"] + m["joined"] + m["quarantined"]
    assert s["rows_in"] == m["rows_out"] == s["rows_out"] + s["quarantined"]
    assert all(v > 0 for v in r["score"]["by_category"].values())
    for name in ("export-rag", "export-sft", "export-preference"):
        x = r[name]["counts"]
        assert x["rows_in"] == s["rows_out"] == x["rows_out"] + x["quarantined"], name
        assert x["written"] > 0
        refused = {o["path"]: o["rows"] for o in r[name]["outputs"] if o["path"].startswith("exports/quarantine/")}
        assert refused.keys() == {f"exports/quarantine/{name}.jsonl", "exports/quarantine/export.jsonl"}
        assert all(len((ws.root / p).read_bytes().splitlines()) == n for p, n in refused.items())
        assert sum(1 for _ in export.refusals(ws, name.removeprefix("export-"))) == x["quarantined"]
    assert r["export-sft"]["counts"]["written"] >= 50  # enough for the training stage's default minimum
    assert {"secret_detected", "pii_detected"} <= set(r["export-sft"]["by_reason"])


def test_stage_commands_in_order_and_out_of_order(ws):
    write_kb(ws, {"eval.csv": "prompt,output,score,approver,evaluated_at\nq,a,0.9,li,2026-11-01T00:00:00Z\n"})
    assert invoke("score").exit_code == 2  # nothing materialized yet: says what to run
    assert invoke("export-sft").exit_code == 2
    assert invoke("materialize").exit_code == 0
    assert invoke("score").exit_code == 0
    for cmd in ("export-rag", "export-sft", "export-preference", "export-all"):
        assert invoke(cmd).exit_code == 0, cmd
    result = invoke("export-sft", "--json")
    assert orjson.loads(result.stdout)["exports"]["sft"]["rows"] == 1
    assert invoke("policy").exit_code == 0


def test_run_drift_and_audit_drift_say_their_different_thresholds(ws):
    """run-all's drift (against the previous run, 10 % / 25 %) and the audit's (against the last
    passing audit, 20 %) differ on purpose; each output says which it is."""
    write_kb(ws, {"gateway_receipts.jsonl": '{"ts": 1762000000, "prompt": "a", "completion": "b"}\n'})
    assert invoke("run-all").exit_code == 0
    passing_audit_baseline(ws)  # the first baseline row
    result = invoke("run-all", "--force")
    flat = " ".join(result.stdout.split())
    assert "a change of 10 % is a warning, 25 % an alert: drift.warn_pct / drift.alert_pct" in flat
    run_id = orjson.loads(invoke("runs", "--json").stdout)[-1]["run_id"]
    drift = orjson.loads((ws.reports / run_id / "drift.json").read_bytes())
    assert (drift["warn_pct"], drift["alert_pct"]) == (10.0, 25.0)
    assert "a change of 10 % is a warning" in " ".join(invoke("receipts").stdout.split())
    result = invoke("audit-full", "--no-rerun")  # the drift is measured the same without the re-run
    assert result.exit_code == 0
    assert ("drift against baseline row 0: 0 of 15 metrics moved more than 20 % since the last passing audit"
            in result.stdout)
    assert ("note: audit-full compares with the last passing audit and flags a move over 20 %; run-all's drift "
            "compares each run with the previous one, warning at 10 % and alerting at 25 %") in result.stdout


def test_policy_prints_readable_values_not_python_reprs(ws):
    import tomllib

    result = invoke("policy")
    assert result.exit_code == 0
    for repr_only in ("True", "False", "['", "{'"):
        assert repr_only not in result.stdout, repr_only
    assert "score.require_approval = true" in result.stdout
    assert 'score.stop_required_kinds = ["run", "transcript", "gateway_call", "chat_completion"]' in result.stdout
    assert "score.caps.rejected = 0.3" in result.stdout
    settings = [line.strip() for line in result.stdout.splitlines() if line.startswith("  score.")]
    doc = orjson.loads(invoke("policy", "--json").stdout)
    assert tomllib.loads("\n".join(settings))["score"] == doc["thresholds"]  # the lines are refinery.toml syntax
    assert set(doc["effects"]) == {r["effect"] for r in doc["rules"]}  # every effect is explained


def test_bad_config_exits_2_naming_the_key(ws):
    (ws.root / "refinery.toml").write_text("[materialize]\nbogus = 1\n")
    result = invoke("materialize")
    assert result.exit_code == 2
    assert "unknown key 'materialize.bogus'" in result.stderr
    assert "Traceback" not in result.output


def test_a_bad_flag_value_is_blamed_on_the_flag_not_on_a_refinery_toml(ws):
    result = invoke("run-all", "--workers", "-3")  # there is no refinery.toml at all
    assert result.exit_code == 2
    assert "error: --workers: Input should be greater than or equal to 0 (got -3)" in result.stderr
    assert "refinery.toml" not in result.stderr
    result = invoke("materialize", "--max-line-bytes", "0")
    assert result.exit_code == 2 and "--max-line-bytes:" in result.stderr and "refinery.toml" not in result.stderr
    (ws.root / "refinery.toml").write_text("[materialize]\nworkers = -1\n")
    result = invoke("materialize")  # the value came from the file: the file is named
    assert result.exit_code == 2 and "refinery.toml: 'materialize.workers'" in result.stderr
    assert invoke("materialize", "--workers", "1").exit_code == 0  # the flag wins over the file


def test_broken_transform_module_exits_2_naming_it(ws):
    (ws.root / "transforms").mkdir()
    (ws.root / "transforms" / "bad.py").write_text("raise RuntimeError('boom')\n")
    result = invoke("materialize")
    assert result.exit_code == 2
    assert "bad.py failed to import: RuntimeError: boom" in result.stderr


def test_transform_bug_exits_1(ws):
    write_transform(ws, "buggy", 'def transform(row, ctx):\n    raise KeyError("x")\n')
    write_kb(ws, {"buggy.jsonl": '{"a": 1}\n'})
    result = invoke("materialize")
    assert result.exit_code == 1
    assert "transform bug" in result.stderr and "buggy.jsonl:0" in result.stderr


def test_unknown_source_warns_with_the_fix(ws):
    write_kb(ws, {"mystery.jsonl": '{"a": 1}\n'})
    result = invoke("materialize")
    assert result.exit_code == 0
    assert "data/_kb/mystery.jsonl: no importer claims this file" in result.stderr
    assert "[mappings.<name>]" in result.stderr


def test_an_empty_source_folder_is_said_with_where_to_put_files(ws):
    for command in ("run-all", "materialize", "sources"):
        result = invoke(command)
        assert result.exit_code == 0, command
        assert f"warning: {ws.kb} holds no source files, so there is nothing to read" in result.stderr, command
        assert f"refinery sample --out {ws.kb}" in result.stderr, command


def test_a_csv_without_a_column_its_importer_needs_is_named(ws):
    write_kb(ws, {"runs.csv": "run_id,task_id,started,prompt,output\nr1,t1,2026-11-01T00:00:00Z,Q?,A\n"
                              "r2,t1,2026-11-01T00:00:01Z,Q2?,A2\n"})
    result = invoke("materialize")
    assert result.exit_code == 0
    assert ("warning: data/_kb/runs.csv: the header has no column 'started_at', which the runs importer needs "
            "(rows quarantined for it: 2 as bad_timestamp). Its columns are: run_id, task_id, started, prompt, "
            "output.") in result.stderr


def test_a_mapping_path_that_matches_nothing_is_named(ws):
    (ws.root / "refinery.toml").write_text(
        '[mappings.bot]\nmatch = "bot*.jsonl"\nfilter = {"meta.kind" = "chat"}\n'
        '[mappings.bot.fields]\nrecorded_at = "ts"\nprompt = "input.question"\nresponse = "output.txt"\n'
        'score = "grade"\n')
    rows = [{"ts": f"2026-11-01T00:00:0{i}Z", "input": {"question": f"Q{i}?"}, "output": {"text": "A"},
             "grade": 0.9, "meta": {"kind": "chat"}} for i in range(3)]
    write_kb(ws, {"bot.jsonl": "".join(orjson.dumps(r).decode() + "\n" for r in rows)})
    result = invoke("materialize")
    assert result.exit_code == 0
    assert ("warning: data/_kb/bot.jsonl: [mappings.bot] fields.response = 'output.txt' matches nothing in any of "
            "its 3 records: check the path") in result.stderr
    assert "fields.prompt" not in result.stderr and "fields.score" not in result.stderr  # those paths are found
    (ws.root / "refinery.toml").write_text(
        (ws.root / "refinery.toml").read_text().replace('"meta.kind"', '"meta.kinds"').replace("output.txt",
                                                                                             "output.text"))
    result = invoke("materialize")
    assert ("[mappings.bot] filter path 'meta.kinds' matches nothing in any of its 3 records, so every one was "
            "quarantined as filtered_out") in result.stderr


def test_missing_source_folder_exits_2(ws):
    import shutil

    shutil.rmtree(ws.kb)
    result = invoke("materialize")
    assert result.exit_code == 2 and "no source folder" in result.stderr


def test_sources_lists_claims(ws):
    write_kb(ws, {"runs.csv": "a\n1\n", "mystery.jsonl": "{}\n"})
    out = orjson.loads(invoke("sources", "--json").stdout)
    assert {s["file"]: s["transform"] for s in out["sources"]} == {
        "data/_kb/mystery.jsonl": None, "data/_kb/runs.csv": "runs"}


def test_schemas_check(ws):
    assert invoke("schemas", "--check").exit_code == 0


def test_sample_command_writes_streams(ws, tmp_path):
    out = tmp_path / "kb"
    result = invoke("sample", "--rows", "100", "--seed", "1", "--out", str(out))
    assert result.exit_code == 0
    assert len([p for p in out.rglob("*") if p.is_file()]) == 15
