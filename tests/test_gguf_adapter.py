"""An mlx-lm LoRA adapter written as a llama.cpp LoRA GGUF (and an Ollama Modelfile): read back
with llama.cpp's own reader and checked against the mlx weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refinery.training.from_gguf import permute
from refinery.training.gguf_adapter import export_gguf, gguf_tensor_name, write_modelfile

mx = pytest.importorskip("mlx.core")
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
HIDDEN, HEADS, KV, RANK, SCALE = 64, 4, 2, 4, 20.0


@pytest.fixture
def adapter(tmp_path):
    rng = np.random.default_rng(0)
    outs = {"self_attn.q_proj": HIDDEN, "self_attn.k_proj": HIDDEN // HEADS * KV,
            "self_attn.v_proj": HIDDEN // HEADS * KV, "mlp.down_proj": HIDDEN}
    ins = {"mlp.down_proj": 2 * HIDDEN}
    weights = {}
    for layer in (0, 1):
        for m in MODULES:
            weights[f"model.layers.{layer}.{m}.lora_a"] = mx.array(rng.normal(size=(ins.get(m, HIDDEN), RANK)),
                                                                  dtype=mx.float32)
            weights[f"model.layers.{layer}.{m}.lora_b"] = mx.array(rng.normal(size=(RANK, outs[m])), dtype=mx.float32)
    d = tmp_path / "ad-x"
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), weights)
    (d / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0}}))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": HEADS,
                                                   "num_key_value_heads": KV}))
    return d, base, {k: np.array(v) for k, v in weights.items()}


def test_the_gguf_adapter_holds_each_delta_as_llama_cpp_applies_it(adapter, tmp_path):
    from gguf import GGUFReader

    d, base, weights = adapter
    info = export_gguf(d, tmp_path / "out" / "adapter.gguf", base)
    assert info == {"tensors": 16, "rank": RANK, "alpha": SCALE * RANK}
    r = GGUFReader(tmp_path / "out" / "adapter.gguf")
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(SCALE * RANK) and meta["general.architecture"] == "llama"
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    assert len(tensors) == 16
    for layer in (0, 1):
        for m in MODULES:
            name = gguf_tensor_name(f"model.layers.{layer}.{m}")
            a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            # llama.cpp adds alpha / r · B·A to the weight it holds (rows permuted for q and k)
            got = meta["adapter.lora.alpha"] / RANK * (b @ a)
            mlx_delta = SCALE * (weights[f"model.layers.{layer}.{m}.lora_a"]
                                 @ weights[f"model.layers.{layer}.{m}.lora_b"]).T  # (out, in), as W
            heads = {"self_attn.q_proj": HEADS, "self_attn.k_proj": KV}.get(m)
            want = permute(mlx_delta, heads) if heads else mlx_delta
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-4), name
    assert not (tmp_path / "out" / "adapter.gguf.part").exists()


def test_names_follow_the_base_gguf():
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.mlp.gate_proj") == "blk.0.ffn_gate.weight"
    with pytest.raises(ValueError, match="no llama.cpp tensor"):
        gguf_tensor_name("model.embed_tokens")


def test_a_modelfile_names_the_base_and_the_adapter(tmp_path):
    write_modelfile(tmp_path / "Modelfile", tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    assert (tmp_path / "Modelfile").read_text() == \
        f"FROM {(tmp_path / 'base.gguf').resolve()}\nADAPTER {(tmp_path / 'adapter.gguf').resolve()}\n"
