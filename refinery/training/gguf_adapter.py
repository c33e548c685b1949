"""`refinery train export <id> --format gguf | ollama`: an mlx-lm LoRA adapter for llama.cpp and Ollama.

llama.cpp reads a LoRA adapter as a GGUF file of its own (`general.type = "adapter"`,
`adapter.type = "lora"`, `adapter.lora.alpha`), one `<base tensor>.lora_a` / `.lora_b` pair per
adapted weight, named as in the base GGUF (`blk.N.attn_q.weight.lora_a`), A shaped (r, in) and
B (out, r), scaled by alpha / r. mlx-lm stores A (in, r) and B (r, out) with `scale`, so both
are transposed and alpha = scale × r. llama.cpp keeps the query and key rows permuted for its
rotary embedding (see from_gguf): B's rows of those two are permuted the same way, so that
B·A adds to the weight llama.cpp holds.

Ollama takes the pair as a Modelfile: `FROM <base .gguf>` and `ADAPTER <adapter .gguf>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from refinery.training.from_gguf import BLOCK_TENSORS, permute

#: mlx-lm / Hugging Face module path → the base GGUF's tensor name in a block.
_TO_GGUF = {hf: gguf for gguf, hf in BLOCK_TENSORS.items()}


def gguf_tensor_name(prefix: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`."""
    parts = prefix.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in _TO_GGUF:
        raise ValueError(f"{prefix}: no llama.cpp tensor for this module")
    return f"blk.{int(parts[2])}.{_TO_GGUF['.'.join(parts[3:])]}.weight"


def export_gguf(adapter_dir: Path, out: Path, base_dir: Path) -> dict[str, Any]:
    """Write the adapter as a llama.cpp LoRA GGUF at `out`; return what was written. `base_dir`
    is the mlx-lm folder the adapter was trained on (its config gives the head counts)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFWriter

    cfg = orjson.loads((adapter_dir / "adapter_config.json").read_bytes())
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{adapter_dir}: only LoRA adapters convert to GGUF (this is {cfg['fine_tune_type']})")
    base = orjson.loads((base_dir / "config.json").read_bytes())
    if base.get("model_type") != "llama":
        raise ValueError(f"{base_dir}: a {base.get('model_type')!r} base; GGUF adapters are written for llama bases")
    n_head = base["num_attention_heads"]
    n_kv = base.get("num_key_value_heads", n_head)
    lora = cfg["lora_parameters"]
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}
    prefixes = sorted({k.rsplit(".", 1)[0] for k in weights})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    w = GGUFWriter(str(tmp), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(lora["scale"] * lora["rank"]))
    for prefix in prefixes:
        a, b = weights[f"{prefix}.lora_a"].T, weights[f"{prefix}.lora_b"].T  # (r, in), (out, r)
        if prefix.endswith("self_attn.q_proj"):
            b = permute(b, n_head)
        elif prefix.endswith("self_attn.k_proj"):
            b = permute(b, n_kv)
        name = gguf_tensor_name(prefix)
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return {"tensors": 2 * len(prefixes), "rank": lora["rank"], "alpha": lora["scale"] * lora["rank"]}


def write_modelfile(out: Path, base_gguf: Path, adapter_gguf: Path) -> None:
    """An Ollama Modelfile: the base GGUF and the adapter GGUF (absolute paths)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"FROM {base_gguf.resolve()}\nADAPTER {adapter_gguf.resolve()}\n")
