"""`refinery train run`: a real, seeded LoRA run on the tiny local model (mlx-lm, CPU)."""

from __future__ import annotations

import csv
import shutil

import orjson
import pytest
from typer.testing import CliRunner

from conftest import REPO
from refinery.cli import app

pytest.importorskip("mlx_lm")
runner = CliRunner()
FAST = {"train_steps": 6, "batch_size": 2, "lr": 1e-3, "eval_steps": 3, "lora_rank": 2, "num_layers": 2,
        "max_seq_length": 256}


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The bundled sample run, a tiny model built, the data collected."""
    ws = tmp_path_factory.mktemp("train")
    shutil.copytree(REPO / "data" / "_kb", ws / "data" / "_kb",
                    ignore=shutil.ignore_patterns("audit_baselines.jsonl"))
    (ws / "distill_config.json").write_text(orjson.dumps(FAST).decode())
    for cmd in (["run-all"], ["train", "tiny-model"], ["train", "collect"]):
        assert runner.invoke(app, [*cmd, "--workspace", str(ws)]).exit_code == 0, cmd
    return ws


@pytest.fixture
def ws(prepared, tmp_path):
    dest = tmp_path / "w"
    shutil.copytree(prepared, dest)
    return dest


def train(ws, **overrides) -> dict:
    (ws / "distill_config.json").write_text(orjson.dumps({**FAST, **overrides}).decode())
    result = invoke("train", "run", "--workspace", str(ws), "--json")
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def test_a_run_writes_the_adapter_folder_and_is_reproducible(ws):
    first = train(ws)
    out = ws / "distill_out" / first["adapter_id"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors", "loss.png",
                                                     "metrics.json", "receipt.json"]
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert metrics["steps"] == 6 and metrics["stopped_by"] == "train_steps"
    assert [s for s, _ in metrics["train_loss"]] == list(range(1, 7))
    assert [s for s, _ in metrics["val_loss"]][0] == 0 and len(metrics["val_loss"]) >= 2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = orjson.loads((out / "adapter_config.json").read_bytes())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"] == {"rank": 2, "scale": 20.0, "dropout": 0.0}
    receipt = orjson.loads((out / "receipt.json").read_bytes())
    assert receipt == first and receipt["seed"] == 0 and receipt["config"]["train_steps"] == 6
    assert [d["path"] for d in receipt["data"]] == [f"distill_out/data/{s}.jsonl" for s in ("train", "valid", "test")]
    from refinery.canonical import file_sha256

    assert receipt["data_receipt_sha256"] == file_sha256(ws / "distill_out" / "data" / "collect.json")

    again = train(ws)  # same data, config, seed and base: the same id and the same weights
    assert again["adapter_id"] == first["adapter_id"] and again["adapter_sha256"] == first["adapter_sha256"]
    other = train(ws, seed=1)
    assert other["adapter_id"] != first["adapter_id"] and other["adapter_sha256"] != first["adapter_sha256"]


def test_the_adapter_loads_into_mlx_lm_and_changes_the_output(ws):
    from mlx_lm import load
    import mlx.core as mx

    r = train(ws, lr=1e-2)
    base = str(ws / "distill_out" / "tiny-base")
    model, tok = load(base)
    tuned, _ = load(base, adapter_path=str(ws / "distill_out" / r["adapter_id"]))
    ids = mx.array([tok.encode("How many orders in August?")])
    assert not mx.allclose(model(ids), tuned(ids)).item()


def test_training_stops_at_the_time_cap(ws):
    r = train(ws, train_steps=500, time_cap_s=0.5)
    assert r["stopped_by"] == "time_cap_s" and 1 <= r["steps"] < 500


def test_qlora_trains_on_a_quantized_copy_of_the_base(ws):
    r = train(ws, adapter_type="qlora")
    qbase = ws / "distill_out" / "tiny-base-q4"
    assert "quantization" in orjson.loads((qbase / "config.json").read_bytes())
    assert r["base_model"]["trained_on"] == "distill_out/tiny-base-q4" and r["steps"] == 6


def test_each_run_is_logged_as_evidence_for_the_next_run(ws):
    a, b = train(ws), train(ws, seed=2)
    with open(ws / "data" / "_kb" / "runs_distill_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["task_name"] for r in rows] == ["distill_train", "distill_train"]
    assert rows[0]["run_id"].startswith(a["adapter_id"]) and rows[1]["run_id"].startswith(b["adapter_id"])
    doc = orjson.loads(invoke("run-all", "--workspace", str(ws), "--json").stdout)
    assert doc["receipts"]["materialize"]["by_source"]["runs_distill_train"]["evidence"] == 2


def test_training_without_data_or_base_model_says_what_to_run(ws):
    shutil.rmtree(ws / "distill_out" / "tiny-base")
    result = invoke("train", "run", "--workspace", str(ws))
    assert result.exit_code == 2 and "refinery train tiny-model" in result.output
    shutil.rmtree(ws / "distill_out" / "data")
    result = invoke("train", "run", "--workspace", str(ws))
    assert result.exit_code == 2 and "run `refinery train collect` first" in result.output
