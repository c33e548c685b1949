"""Every training format, read by the consumers themselves: `transformers`' apply_chat_template
with the Qwen2.5, Llama-3.1 and Mistral chat templates (tests/fixtures/chat_templates/, origins in
ORIGIN.md), and `datasets.load_dataset("json")`. Run on the bundled sample's exports, every row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import built_once, read_jsonl_file, sample_workspace

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
CHAT = ("mlx-chat", "mlx-tools", "openai", "collect")  # {"messages": [...], "tools"?: [...]}
FLAT = {"mlx-completions": ("prompt", "completion"), "alpaca": ("instruction", "output")}
PAIRS = ("trl", "trl-chat", "openai-dpo")
#: formats whose calls carry arguments as objects, the way chat templates take them (OpenAI's
#: shapes hold JSON text, which every template would encode a second time)
OBJECT_ARGS = ("mlx-tools", "collect", "trl-chat")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from refinery.formats import FORMATS, convert, default_input

    def build(root: Path) -> None:
        sample_workspace(root, "run-all", "train collect")
        for fmt in FORMATS:
            convert(root / default_input(fmt), root / "formats" / f"{fmt}.jsonl", fmt)

    root = built_once(tmp_path_factory, "consumers", build)
    out = {fmt: root / "formats" / f"{fmt}.jsonl" for fmt in (*CHAT[:3], *FLAT, *PAIRS)}
    out["collect"] = root / "distill_out" / "data" / "train.jsonl"
    return out


@pytest.fixture(scope="module", params=sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
def tokenizer(request):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (TEMPLATES / f"{request.param}.jinja").read_text()
    tok.name = request.param
    return tok


def conversations(fmt: str, row: dict) -> list[tuple[list[dict], list[dict] | None]]:
    """What a trainer hands the chat template for one row: (messages, tools), once per side of a pair."""
    if fmt in CHAT:
        return [(row["messages"], row.get("tools"))]  # mlx-chat: flattened, no tools
    if fmt in FLAT:
        q, a = FLAT[fmt]
        return [([{"role": "user", "content": row[q]}, {"role": "assistant", "content": row[a]}], None)]
    if fmt == "trl":
        return [([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}], None)
                for side in ("chosen", "rejected")]
    if fmt == "trl-chat":
        return [(row["prompt"] + row[side], row["tools"]) for side in ("chosen", "rejected")]
    return [(row["input"]["messages"] + row[side], None) for side in ("preferred_output", "non_preferred_output")]


def test_the_fixtures_are_the_published_templates():
    import hashlib

    origin = (TEMPLATES / "ORIGIN.md").read_text()
    for p in TEMPLATES.glob("*.jinja"):  # each file is the one ORIGIN.md describes, byte for byte
        assert hashlib.sha256(p.read_bytes()).hexdigest() in origin, p.name


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [*CHAT, *FLAT, *PAIRS])
def test_every_row_renders_through_every_chat_template(files, tokenizer, fmt):
    rows = read_jsonl_file(files[fmt])
    assert rows
    calls = 0
    for row in rows:
        for messages, tools in conversations(fmt, row):
            # Mistral's template raises on an id that is not 9 letters or digits, and on roles
            # that do not alternate; Llama-3.1's on two calls in one message
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            user = next(m["content"] for m in messages if m["role"] == "user")
            assert user.strip() in text, (tokenizer.name, fmt)
            last = messages[-1]
            if last["role"] == "assistant" and last["content"] and not last.get("tool_calls"):
                assert last["content"].strip() in text, (tokenizer.name, fmt)
            for m in messages:
                for c in m.get("tool_calls") or []:
                    calls += 1
                    assert c["function"]["name"] in text
                    if fmt in OBJECT_ARGS:  # the arguments as one JSON object, not as a JSON string
                        assert json.dumps(c["function"]["arguments"], ensure_ascii=False) in text
    if fmt not in (*FLAT, "mlx-chat", "trl", "openai-dpo"):
        assert calls > 0, fmt  # the sample's tool rows were rendered, not only direct answers


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mlx-chat", "mlx-completions", "alpaca", "trl", "openai-dpo"])
def test_flattened_answers_write_the_tool_call_before_the_text(files, fmt):
    def answer(r):
        return {"mlx-chat": lambda: r["messages"][-1]["content"], "mlx-completions": lambda: r["completion"],
                "alpaca": lambda: r["output"], "trl": lambda: r["chosen"],
                "openai-dpo": lambda: r["preferred_output"][0]["content"]}[fmt]()

    answers = [answer(r) for r in read_jsonl_file(files[fmt])]
    with_calls = [a for a in answers if a.startswith('{"name":')]
    assert with_calls  # the sample has tool-using answers
    for a in with_calls:
        first, _, rest = a.partition("\n")
        assert set(json.loads(first)) == {"name", "arguments"}
    assert not any('\n{"name":' in a and not a.startswith('{"name":') for a in answers)


def round_trip(paths: list[Path], tmp_path: Path, monkeypatch) -> list[str]:
    """Load each file with `datasets.load_dataset("json")` (offline) and check it comes back as
    written; the stems of the files checked (an empty file is skipped: datasets refuses it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    checked = []
    for path in paths:
        want = read_jsonl_file(path)
        if not want:
            continue
        got = datasets.load_dataset("json", data_files=str(path), split="train",
                                    cache_dir=str(tmp_path / "cache")).to_list()
        assert got == want, path.name
        checked.append(path.stem)
    return checked


@pytest.mark.slow
def test_every_export_round_trips_through_datasets_unchanged(files, tmp_path, monkeypatch):
    root = files["collect"].parents[2]
    round_trip([*files.values(), *sorted((root / "exports").glob("*/*.jsonl"))], tmp_path, monkeypatch)


@pytest.mark.slow
def test_tools_is_on_every_message_row(files):
    for fmt in ("openai", "mlx-tools", "collect", "trl-chat"):
        rows = read_jsonl_file(files[fmt])
        assert all(isinstance(r["tools"], list) for r in rows), fmt
        assert any(r["tools"] for r in rows) and any(not r["tools"] for r in rows), fmt
    openai = read_jsonl_file(files["openai"])
    assert not any("name" in m for r in openai for m in r["messages"] if m["role"] == "tool")


@pytest.mark.slow
def test_real_fixtures_exports_round_trip_through_datasets_unchanged(tmp_path, monkeypatch):
    """Public projects' files, unchanged, in an empty workspace: OpenAI's fine-tuning format with
    tool calls, LLaMA-Factory's glaive tool-call sample and its DPO demo (origins in the
    ORIGIN.md next to them). Unlike the bundled sample, every row here is dated the same way, so
    pyarrow reads each file natively instead of falling back to datasets' Json feature: a
    whole-second timestamp (`…T00:00:00Z`) came back as a datetime."""
    import shutil

    from typer.testing import CliRunner

    from refinery.cli import app
    from refinery.formats import FORMATS, convert, default_input

    ws = tmp_path / "operator"
    (ws / "data" / "_kb").mkdir(parents=True)
    real = Path(__file__).parent / "fixtures" / "real"
    toml = ""
    for rel in ("openai_finetune/foundry_stock_toolcall_validation.jsonl", "hf_datasets/glaive_func_call.json",
                "hf_datasets/v1_dpo_demo.jsonl"):
        shutil.copy(real / rel, ws / "data" / "_kb")
        toml += f'[sources.{Path(rel).stem}]\ntrust = "curated"\n'
    (ws / "refinery.toml").write_text(toml)
    assert CliRunner().invoke(app, ["run-all", "--workspace", str(ws)]).exit_code == 0
    exports = sorted((ws / "exports").glob("*/*.jsonl"))
    for fmt in FORMATS:
        convert(ws / default_input(fmt), ws / f"{fmt}.jsonl", fmt)
    checked = round_trip([*exports, *(ws / f"{fmt}.jsonl" for fmt in FORMATS)], tmp_path, monkeypatch)
    assert {"instruction_response", "playbooks", "chosen_rejected", *FORMATS} <= set(checked)
