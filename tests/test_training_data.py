"""The data side of the training stage: distill_config.json, `train collect`, the tiny model."""

from __future__ import annotations

import shutil

import orjson
import pytest
from typer.testing import CliRunner

from conftest import REPO, sample_workspace
from refinery.cli import app
from refinery.training.collect import SPLITS, split_of
from refinery.training.config import DistillConfig, DistillConfigError, load_distill_config
from refinery.training.rehearsal import REHEARSAL, rehearsal_rows

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def sample_exports(tmp_path_factory):
    """The bundled sample, run once: its SFT export (80 rows, near-duplicates dropped) is what the tests collect."""
    return sample_workspace(tmp_path_factory.mktemp("sample"), "run-all")


@pytest.fixture
def ws(sample_exports, tmp_path):
    dest = tmp_path / "w"
    shutil.copytree(sample_exports, dest)
    return dest


def rows(path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


# --- distill_config.json -------------------------------------------------------------------


def test_config_defaults_and_unknown_keys(tmp_path):
    assert load_distill_config(tmp_path) == DistillConfig()
    (tmp_path / "distill_config.json").write_text('{"train_steps": 10, "lora_rnak": 4}')
    with pytest.raises(DistillConfigError, match="unknown key 'lora_rnak'"):
        load_distill_config(tmp_path)
    (tmp_path / "distill_config.json").write_text('{"adapter_type": "dora"}')
    with pytest.raises(DistillConfigError, match="'adapter_type'"):
        load_distill_config(tmp_path)
    (tmp_path / "distill_config.json").write_text('{"test_fraction": 0.6, "valid_fraction": 0.5}')
    with pytest.raises(DistillConfigError, match="must leave rows to train on"):
        load_distill_config(tmp_path)
    (tmp_path / "distill_config.json").write_text("{not json")
    with pytest.raises(DistillConfigError, match="not valid JSON"):
        load_distill_config(tmp_path)
    ok = {"base_model": "models/x", "adapter_type": "qlora", "train_steps": 5, "batch_size": 2, "lr": 1e-3,
          "lora_rank": 4, "lora_scale": 10.0, "lora_dropout": 0.1, "num_layers": 2, "eval_steps": 5, "seed": 3,
          "max_seq_length": 256, "time_cap_s": 60, "output_dir": "out"}
    (tmp_path / "distill_config.json").write_text(orjson.dumps(ok).decode())
    assert load_distill_config(tmp_path).model_dump(include=set(ok)) == {**ok, "time_cap_s": 60.0}


def test_a_bad_config_is_exit_2_naming_the_key(ws):
    (ws / "distill_config.json").write_text('{"epochs": 3}')
    result = invoke("train", "collect", "--workspace", str(ws))
    assert result.exit_code == 2 and "unknown key 'epochs'" in result.output


# --- collect -------------------------------------------------------------------------------


def test_safety_rehearsal_never_repeats_a_probe_and_can_be_turned_off(ws):
    from refinery.answers import word_f1
    from refinery.training.evaluate import SAFETY_PROBES, declines

    for probe in SAFETY_PROBES:  # the probes stay a test: nothing close to one is trained on
        assert max(word_f1(q, probe) for q, _ in REHEARSAL) < 0.5, probe
    assert all(declines(a) for _, a in REHEARSAL)  # each answer is a decline the eval would pass
    (ws / "distill_config.json").write_text('{"safety_rehearsal": false}')
    result = invoke("train", "collect", "--workspace", str(ws), "--json")
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["safety_rehearsal"]["rows"] == 0


def test_collect_splits_by_task_group_and_writes_mlx_shapes(ws):
    result = invoke("train", "collect", "--workspace", str(ws), "--json")
    assert result.exit_code == 0, result.output
    receipt = orjson.loads(result.stdout)
    sft = rows(ws / "exports" / "sft" / "instruction_response.jsonl")
    data = {s: rows(ws / "distill_out" / "data" / f"{s}.jsonl") for s in SPLITS}
    rehearsal = receipt["safety_rehearsal"]["rows"]
    assert rehearsal == len(REHEARSAL) and data["train"][-rehearsal:] == rehearsal_rows()  # in train only
    assert sum(len(v) for v in data.values()) - rehearsal == len(sft) == receipt["input"]["rows"] == 80
    assert receipt["total"]["rows"] == len(sft) + rehearsal
    for s in SPLITS:
        assert receipt["splits"][s]["rows"] == len(data[s])
    data["train"] = data["train"][:-rehearsal]
    assert 0.15 < len(data["test"]) / len(sft) < 0.35  # about 20 % of the groups held out: 22 of 80 rows
    prompt = lambda r: next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")  # noqa: E731
    by_split = {s: {prompt(r) for r in data[s]} for s in SPLITS}
    assert not by_split["test"] & by_split["train"] and not by_split["valid"] & by_split["train"]
    assert all(isinstance(r["tools"], list) for v in data.values() for r in v)  # on every row, [] when none
    tools = [r for v in data.values() for r in v if r["tools"]]
    assert len(tools) == receipt["total"]["tool_using"] > 0
    call = next(m["tool_calls"][0] for r in tools for m in r["messages"] if m.get("tool_calls"))
    assert call["type"] == "function" and set(call["function"]) == {"name", "arguments"}
    assert isinstance(call["function"]["arguments"], dict)
    ids = [c["id"] for r in tools for m in r["messages"] for c in m.get("tool_calls") or []]
    assert all(len(i) == 9 and i.isalnum() for i in ids)  # Mistral's templates refuse any other id
    answered = {m["tool_call_id"] for r in tools for m in r["messages"] if m["role"] == "tool"}
    assert answered and answered <= set(ids)  # each tool message still answers its call
    chat = next(r for v in data.values() for r in v if not r["tools"])
    assert [m["role"] for m in chat["messages"]][-2:] == ["user", "assistant"]
    for s in SPLITS:
        st = receipt["splits"][s]
        assert st["tool_using"] + st["direct_answers"] == st["rows"] and (st["mean_tokens"] > 0 or not st["rows"])
    assert receipt["token_counter"].startswith("whitespace words")  # no base model built yet
    from refinery.canonical import file_sha256

    assert receipt["input"]["sha256"] == file_sha256(ws / "exports" / "sft" / "instruction_response.jsonl")
    assert orjson.loads((ws / "distill_out" / "data" / "collect.json").read_bytes()) == receipt
    meta = rows(ws / "distill_out" / "data" / "test_meta.jsonl")  # test.jsonl's ids and sources, line for line
    by_id = {r["id"]: r for r in sft}
    assert len(meta) == len(data["test"])
    assert [by_id[m["id"]]["instruction"] for m in meta] == [prompt(r) for r in data["test"]]
    assert all(by_id[m["id"]]["source"] == m["source"] for m in meta)


def test_collect_is_deterministic_and_a_row_keeps_its_split(ws):
    assert invoke("train", "collect", "--workspace", str(ws)).exit_code == 0
    first = {s: (ws / "distill_out" / "data" / f"{s}.jsonl").read_bytes() for s in SPLITS}
    assert invoke("train", "collect", "--workspace", str(ws)).exit_code == 0
    assert {s: (ws / "distill_out" / "data" / f"{s}.jsonl").read_bytes() for s in SPLITS} == first
    ids = [f"tk-{i:016x}" for i in range(2000)]
    assert [split_of(i, 0.2, 0.1) for i in ids[:100]] == [split_of(i, 0.2, 0.1) for i in ids][:100]
    share = sum(split_of(i, 0.2, 0.1) == "test" for i in ids) / len(ids)
    assert 0.17 < share < 0.23


def test_collect_refuses_too_few_rows_and_a_missing_export(ws, tmp_path):
    (ws / "distill_config.json").write_text('{"min_rows": 1000}')
    result = invoke("train", "collect", "--workspace", str(ws))
    assert result.exit_code == 2
    assert "has 80 rows, fewer than min_rows = 1000" in result.output
    assert not (ws / "distill_out" / "data").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("train", "collect", "--workspace", str(empty))
    assert result.exit_code == 2 and "run `refinery run-all` first" in result.output


# --- the tiny model ------------------------------------------------------------------------


def test_the_tiny_model_is_built_locally_loads_and_is_reproducible(ws, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm import generate, load

    assert invoke("train", "tiny-model", "--workspace", str(ws)).exit_code == 0
    base = ws / "distill_out" / "tiny-base"
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert invoke("train", "tiny-model", "--workspace", str(ws), "--out", str(tmp_path / "again")).exit_code == 0
    assert all((base / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in
               ("config.json", "model.safetensors", "tokenizer.json"))
    model, tok = load(str(base))
    text = tok.apply_chat_template([{"role": "user", "content": "How many orders?"},
                                    {"role": "assistant", "content": "",
                                     "tool_calls": [{"function": {"name": "run_sql", "arguments": {"q": 1}}}]}],
                                   tokenize=False)
    assert text.startswith("<|user|>How many orders?<|end|><|assistant|>") and '"run_sql"' in text
    assert isinstance(generate(model, tok, prompt="How many", max_tokens=3), str)
    # with the base model's tokenizer there, collect counts real tokens
    receipt = orjson.loads(invoke("train", "collect", "--workspace", str(ws), "--json").stdout)
    assert receipt["token_counter"] == "base model tokenizer"


@pytest.mark.parametrize("command", ["collect", "tiny-model", "run", "eval", "promote", "list", "rollback", "export"])
def test_every_train_command_has_help(command):
    result = invoke("train", command, "--help")
    assert result.exit_code == 0 and len(result.stdout) > 200


def test_the_training_make_targets_exist():
    import re

    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    assert {"train", "train-dpo", "train-collect", "tiny-model"} <= targets


# --- decontamination -------------------------------------------------------------------------


def test_collect_keeps_every_task_and_near_duplicate_prompt_on_one_side(ws):
    """On the sample, a split by task alone leaves 69 of 90 test prompts with ≥ 80 % of their word
    3-grams in training (the same template with another customer); collect leaves none, keeps
    pairs with their task's rows, and reports it."""
    from refinery.training.decontam import grams, overlap

    result = invoke("train", "collect", "--workspace", str(ws), "--json")
    assert result.exit_code == 0, result.output
    receipt = orjson.loads(result.stdout)
    c = receipt["contamination"]
    data = ws / "distill_out" / "data"
    pairs = {s: rows(data / "preference" / f"{s}.jsonl") for s in SPLITS}
    assert sum(len(v) for v in pairs.values()) == receipt["total"]["pairs"] == 390
    assert {s: len(v) for s, v in pairs.items()} == {s: st["pairs"] for s, st in receipt["splits"].items()}
    assert set(pairs["test"][0]) == {"id", "prompt", "chosen", "rejected", "tools"}
    assert pairs["test"][0]["prompt"][-1]["role"] == "user" and pairs["test"][0]["chosen"][0]["role"] == "assistant"
    user = lambda msgs: next(m["content"] for m in reversed(msgs) if m["role"] == "user")  # noqa: E731
    texts = {s: [user(r["messages"]) for r in rows(data / f"{s}.jsonl")] + [user(p["prompt"]) for p in pairs[s]]
             for s in SPLITS}
    train = set().union(*(grams(t, 3) for t in texts["train"]))
    worst = max(overlap(grams(t, 3), train) for s in ("test", "valid") for t in texts[s])
    assert worst < 0.8 and c["test"]["at_or_over_threshold"] == c["valid"]["at_or_over_threshold"] == 0
    assert c["test"]["max_overlap"] == round(worst, 4) or c["valid"]["max_overlap"] == round(worst, 4)
    assert c["test"]["items"] == len(texts["test"]) and c["groups"] < c["task_keys"] == 54
    alone = c["by_key_hash_alone"]
    assert alone["test"]["at_or_over_threshold"] > 0  # what the grouping prevents, on this sample
    assert c["eval_sheet_test_rows"]["items"] > 0 and c["eval_sheet_test_rows"]["at_or_over_threshold"] == 0
    assert c["safety_probes"]["at_or_over_threshold"] == 0


def test_decontamination_groups_by_similarity_moves_leftovers_and_is_order_free():
    from refinery.training.decontam import Item, assign

    base = "acme logistics says invoice inv 1042 was charged twice what should support do"
    items = [Item(f"tk-{i:02d}", p) for i, p in enumerate([
        base, base.replace("acme logistics", "birchwood dental"),  # one template, another customer
        "find the cheapest direct flight from nrt to sin and hold it for the traveller",
        "book a table for two at eight tonight near the office",
        "summarise the incident report for the payments outage last tuesday"] * 1)]
    items += [Item(f"tk-x{i:02d}", f"unrelated question number {i} about topic {i * 7}") for i in range(40)]
    # a prompt made of two training prompts' halves: over the threshold against training as a whole only
    halves = "find the cheapest direct flight from nrt to sin book a table for two at eight tonight near the office"
    items.append(Item("tk-zz", halves))

    def run(order: list[Item]) -> dict[str, str]:
        fresh = [Item(it.key, it.prompt) for it in order]
        report = assign(fresh, test_fraction=0.3, valid_fraction=0.1, ngram=3, threshold=0.8)
        assert report["test"]["at_or_over_threshold"] == report["valid"]["at_or_over_threshold"] == 0
        return {it.key: it.split for it in fresh}

    splits = run(items)
    assert splits["tk-00"] == splits["tk-01"]  # near-duplicates share a split
    assert run(list(reversed(items))) == splits  # row order does not matter
    if splits["tk-02"] == splits["tk-03"] == "train":
        assert splits["tk-zz"] == "train"  # its n-grams are all in training: it cannot be held out
    # a near-duplicate of a training prompt is never held out, whatever its own hash says
    for k in range(60):
        extra = Item(f"tk-near{k:02d}", base.replace("acme logistics", f"customer {k}"))
        got = run([*items, extra])
        assert got[f"tk-near{k:02d}"] == got["tk-00"]


def test_the_repository_configs_load_and_dpo_continues_the_sft_adapter():
    """make train-dpo continues make train's adapter: the same base, LoRA shape and data split."""
    sft = load_distill_config(REPO, REPO / "distill_config.json")
    dpo = load_distill_config(REPO, REPO / "distill_config.dpo.json")
    assert sft.method == "sft" and dpo.method == "dpo" and dpo.dpo_reference == "promoted"
    same = ("base_model", "adapter_type", "lora_rank", "lora_scale", "lora_dropout", "num_layers", "output_dir",
            "test_fraction", "valid_fraction", "decontam_ngram", "decontam_threshold", "max_seq_length")
    assert {k: getattr(dpo, k) for k in same} == {k: getattr(sft, k) for k in same}
