"""Replay with a real model: the project's tiny local model through mlx-lm (CPU), base alone and
base + a promoted adapter, from the command line."""

from __future__ import annotations

import shutil

import orjson
import pytest
from typer.testing import CliRunner

from conftest import built_once, read_jsonl_file, sample_workspace
from refinery.cli import app

pytest.importorskip("mlx_lm")
pytest.importorskip("bm25s")
runner = CliRunner()
TASK = "How many tickets were opened in September 2026?"
#: The adapter only has to exist and be served: validation loss before the first and after the
#: last step, over a 5-row valid split; sequences cut at 128 tokens (one batch shape, one compile:
#: see test_training_run's FAST).
FAST = {"train_steps": 4, "batch_size": 2, "lr": 1e-2, "eval_steps": 4, "lora_rank": 2, "num_layers": 2,
        "max_seq_length": 128, "valid_fraction": 0.02}


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The bundled sample run, a tiny model built, the data collected; short local answers (once per
    session: built_once)."""
    return built_once(tmp_path_factory, "replay-model", lambda d: sample_workspace(
        d, "run-all", "train tiny-model", "train collect",
        files={"distill_config.json": orjson.dumps(FAST).decode(), "refinery.toml": "[replay]\nmax_tokens = 12\n"}))


@pytest.fixture
def ws(prepared, tmp_path):
    dest = tmp_path / "w"
    shutil.copytree(prepared, dest)
    return dest


def test_replay_answers_with_the_tiny_local_model(ws):
    first = invoke("replay", "--task", TASK, "--json", "--workspace", str(ws))
    row = orjson.loads(first.stdout)
    assert first.exit_code == (0 if row["check"] is None else 1)
    assert "built the BM25 index" in first.stderr
    assert row["model"] == "distill_out/tiny-base" and row["adapter_id"] is None and row["local_latency_ms"] > 0
    assert row["answer"] == row["local_answer"] and row["local_finish_reason"] in ("stop", "length")
    assert len(row["retrieved"]) == 3 and row["mode"] == "retrieval"

    again = invoke("replay", "--task", TASK, "--json", "--workspace", str(ws))
    assert orjson.loads(again.stdout)["answer"] == row["answer"]  # greedy: the same answer
    assert "built the BM25 index" not in again.stderr  # the index is reused while the export is unchanged
    human = invoke("replay", "--task", TASK, "--no-retrieval", "--workspace", str(ws))
    assert "playbooks: none (--no-retrieval)" in human.stdout and "logged: data/_kb/replays.jsonl" in human.stdout
    log = read_jsonl_file(ws / "data" / "_kb" / "replays.jsonl")
    assert [r["mode"] for r in log] == ["retrieval", "retrieval", "no_retrieval"]


@pytest.mark.slow
def test_replay_serves_the_promoted_adapter_and_refuses_a_tampered_one(ws):
    trained = orjson.loads(invoke("train", "run", "--workspace", str(ws), "--json").stdout)
    aid = trained["adapter_id"]
    (ws / "router.json").write_text(orjson.dumps({  # what `train promote` writes for a promoted adapter
        "offline_model": {"base_model": "distill_out/tiny-base", "adapter_id": aid,
                          "adapter_path": f"distill_out/{aid}", "since": "2026-11-24T00:00:00Z"},
        "history": []}).decode())
    result = invoke("replay", "--task", TASK, "--json", "--workspace", str(ws))
    row = orjson.loads(result.stdout)
    assert row["adapter_id"] == aid and row["model"] == "distill_out/tiny-base"
    human = invoke("replay", "--task", TASK, "--workspace", str(ws))
    assert f"local model: distill_out/tiny-base + {aid}" in human.stdout

    from mlx.utils import tree_flatten

    from refinery.replay.model import LocalGenerator, offline_model
    from refinery.training.config import load_distill_config
    from refinery.workspace import Workspace

    w = Workspace.at(ws)
    model, _ = LocalGenerator(w, offline_model(w, load_distill_config(ws))).load()
    lora = [k for k, _ in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))]
    assert lora, "the promoted adapter's LoRA layers are not in the served model"

    weights = ws / "distill_out" / aid / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    result = invoke("replay", "--task", TASK, "--workspace", str(ws))
    assert result.exit_code == 2 and "sha256 differs from its receipt" in result.output


def test_a_failed_local_answer_escalates_from_the_command_line(ws, endpoint, monkeypatch):
    (ws / "refinery.toml").write_text('[replay]\nmax_tokens = 1\n'  # cut off (or empty): every local answer fails
                                      f'[replay.escalation]\nbase_url = "{endpoint.url}/ok/v1"\nmodel = "big-model"\n'
                                      'api_key_env = "REFINERY_TEST_KEY"\n')
    monkeypatch.setenv("REFINERY_TEST_KEY", "sk-test-0123456789abcdef")
    result = invoke("replay", "--task", TASK, "--allow-escalation", "--workspace", str(ws))
    assert result.exit_code == 0, result.output
    assert "local model: distill_out/tiny-base" in result.stdout and "check FAILED (" in result.stdout
    assert f"escalated to big-model-2026 at {endpoint.url}/ok/v1" in result.stdout
    assert result.stdout.rstrip().endswith("Refund the second $49.00 charge and send the reference.")
    (ws / "refinery.toml").write_text((ws / "refinery.toml").read_text().replace("/ok/v1", "/fail/v1"))
    result = invoke("replay", "--task", TASK, "--allow-escalation", "--workspace", str(ws))
    assert result.exit_code == 1 and "escalation failed:" in result.stdout and "HTTP 500" in result.stdout
    assert [r["escalated"] for r in read_jsonl_file(ws / "data" / "_kb" / "replays.jsonl")] == [True, False]


def test_replay_eval_runs_with_the_tiny_model(ws):
    result = invoke("replay-eval", "--limit", "2", "--json", "--workspace", str(ws))
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["tasks"] == 2 and report["model"] == "distill_out/tiny-base"
    for mode in ("retrieval", "no_retrieval"):
        m = report["modes"][mode]
        assert m["rows"] == 2 and 0 <= m["answer_match"] <= 1 and 0 <= m["grounding"] <= 1
        assert m["latency_ms"]["p95"] >= m["latency_ms"]["p50"] > 0
    table = invoke("replay-eval", "--limit", "1", "--workspace", str(ws))
    assert "| mode | tasks | answer match | grounding |" in table.stdout
