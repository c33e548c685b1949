"""`refinery train export <id> --format peft`: an mlx-lm LoRA adapter as a HuggingFace PEFT adapter.

mlx-lm stores `model.layers.N.<module>.lora_a` (in, r) and `lora_b` (r, out) and computes
y = W x + scale · (x A) B. PEFT stores `base_model.model.model.layers.N.<module>.lora_A.weight`
(r, in) and `lora_B.weight` (out, r) and scales by lora_alpha / r — so A and B are transposed and
lora_alpha = scale × r. The result loads in PEFT, vLLM (r, lora_alpha, target_modules; no DoRA)
and llama.cpp's convert_lora_to_gguf.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from refinery.receipts import write_json


def export_peft(adapter_dir: Path, out: Path, base_model: str) -> dict[str, Any]:
    """Write adapter_model.safetensors and adapter_config.json into `out`; return the config."""
    import mlx.core as mx

    cfg = orjson.loads((adapter_dir / "adapter_config.json").read_bytes())
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{adapter_dir}: only LoRA adapters convert to PEFT (this is {cfg['fine_tune_type']})")
    lora = cfg["lora_parameters"]
    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    tensors, modules, layers = {}, set(), set()
    for key, value in sorted(weights.items()):
        prefix, kind = key.rsplit(".", 1)
        if kind not in ("lora_a", "lora_b"):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key} in a LoRA adapter")
        tensors[f"base_model.model.{prefix}.lora_{'A' if kind == 'lora_a' else 'B'}.weight"] = \
            mx.array(value.T.astype(mx.float32))
        parts = prefix.split(".")
        modules.add(parts[-1])
        if "layers" in parts:
            layers.add(int(parts[parts.index("layers") + 1]))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["rank"], "lora_alpha": lora["scale"] * lora["rank"], "lora_dropout": lora["dropout"],
        "target_modules": sorted(modules), "layers_to_transform": sorted(layers), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
    }
    write_json(out / "adapter_config.json", config)
    return config
