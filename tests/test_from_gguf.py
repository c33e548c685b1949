"""A GGUF base model converted to an mlx-lm folder: checked numerically against the model it was
written from (the tiny model, stored as llama.cpp stores a llama: permuted Q/K rows, tied
embeddings, the BPE tokenizer and chat template in the metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refinery.training.from_gguf import GGUFError, convert, permute, unpermute
from refinery.training.tinymodel import CHAT_TEMPLATE, build_tiny_model

TEXTS = ["How many rows were created in September 2026? Use a half-open date range.",
         "Refund INV-1042 twice charged, then tell the customer.", '{"name": "run_sql", "arguments": {}}'] * 20
PROMPTS = ["How many rows were created?", "Refund INV-1042.", '{"name": "run_sql"}']


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    _, _, n, *rest = hf.split(".")
    return f"blk.{n}.{block['.'.join(rest[:-1])]}.weight"


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32", arch: str = "llama",
               template: str = CHAT_TEMPLATE) -> Path:
    """`model_dir` (an mlx-lm llama folder) written as llama.cpp writes a llama GGUF."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w = GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_chat_template(template)
    q = GGMLQuantizationType[qtype]
    for name, arr in sorted(mx.load(str(model_dir / "model.safetensors")).items()):
        a = np.array(arr, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            a = permute(a, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = permute(a, cfg["num_key_value_heads"])
        if a.ndim == 2 and q != GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(out, TEXTS, hidden=64, layers=2, heads=4)
    return out


def _logits(model_dir: Path) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(model_dir))
    return np.concatenate([np.array(model(mx.array([tok.encode(p)]))[0], dtype=np.float32) for p in PROMPTS])


def test_a_float32_gguf_converts_back_to_the_same_logits(tiny, tmp_path):
    out = convert(write_gguf(tiny, tmp_path / "tiny.gguf"), tmp_path / "cache")
    assert np.abs(_logits(out) - _logits(tiny)).max() < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    record = json.loads((out / "CONVERTED.json").read_text())
    assert record["quantisation"] == {"F32": record["tensors"]} and record["tied_embeddings"]
    assert record["chat_template"] == "gguf"  # it renders tool calls: kept


def test_a_quantised_gguf_is_dequantised_close_to_the_original(tiny, tmp_path):
    out = convert(write_gguf(tiny, tmp_path / "tiny-q8.gguf", "Q8_0"), tmp_path / "cache")
    ref, got = _logits(tiny), _logits(out)
    assert np.abs(got - ref).max() < 0.05 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert json.loads((out / "CONVERTED.json").read_text())["quantisation"]["Q8_0"] > 0


def test_without_undoing_the_rotary_permutation_the_logits_would_differ(tiny, tmp_path, monkeypatch):
    from refinery.training import from_gguf

    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    assert np.array_equal(unpermute(permute(w, 4), 4), w) and not np.array_equal(permute(w, 4), w)
    monkeypatch.setattr(from_gguf, "unpermute", lambda w, n: w)
    out = convert(write_gguf(tiny, tmp_path / "tiny.gguf"), tmp_path / "cache")
    assert np.abs(_logits(out) - _logits(tiny)).max() > 1e-3


def test_the_tokenizer_and_chat_template_come_from_the_metadata(tiny, tmp_path):
    from mlx_lm import load

    out = convert(write_gguf(tiny, tmp_path / "tiny.gguf"), tmp_path / "cache")
    _, ref = load(str(tiny))
    _, got = load(str(out))
    for text in [*PROMPTS, "<|user|>hi<|end|>", "tabs\tand  spaces, ünïcödé 12345"]:
        assert got.encode(text) == ref.encode(text), text
    msgs = [{"role": "user", "content": "Refund INV-1042."}]
    assert got.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert got.eos_token == "<|end|>"


def test_a_file_is_converted_once_and_again_when_it_changes(tiny, tmp_path):
    gguf = write_gguf(tiny, tmp_path / "tiny.gguf")
    first = convert(gguf, tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert(gguf, tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    write_gguf(tiny, gguf, "Q8_0")
    second = convert(gguf, tmp_path / "cache")
    assert second != first and sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name,
                                                                                                  second.name])


def test_unsupported_files_are_refused_by_name(tiny, tmp_path):
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' is not supported \(supported: llama\)"):
        convert(write_gguf(tiny, tmp_path / "other.gguf", arch="gpt2"), tmp_path / "cache")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert(tmp_path / "junk.gguf", tmp_path / "cache")
    with pytest.raises(GGUFError, match="no such file"):
        convert(tmp_path / "missing.gguf", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # nothing half-written


#: SmolLM2's own template (from its GGUF): ChatML that writes no tool calls.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_chatml_template_that_drops_tool_calls_is_replaced_by_one_that_renders_them(tiny, tmp_path):
    from mlx_lm import load

    from refinery.training.from_gguf import CHATML_TOOLS, renders_tool_calls

    assert not renders_tool_calls(SMOLLM2_TEMPLATE)
    out = convert(write_gguf(tiny, tmp_path / "smol-like.gguf", template=SMOLLM2_TEMPLATE), tmp_path / "cache")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TOOLS
    assert json.loads((out / "CONVERTED.json").read_text())["chat_template"].startswith("refinery:chatml-tools")
    _, tok = load(str(out))
    msgs = [{"role": "user", "content": "How many rows?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "run_sql", "arguments": {"query": "SELECT 1"}}}]},
            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "One row."}]
    text = tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {"name": "run_sql"}}],
                                   tokenize=False)
    assert '<|im_start|>assistant\n{"name": "run_sql", "arguments": {"query": "SELECT 1"}}<|im_end|>' in text
    assert text.startswith("<|im_start|>system\nTools you can call") and text.endswith("One row.<|im_end|>\n")
    from refinery.answers import parse_tool_calls

    body = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse_tool_calls(body) == [{"name": "run_sql", "arguments": {"query": "SELECT 1"}}]
