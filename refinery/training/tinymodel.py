"""A tiny llama-shaped model that the project builds itself: random weights and a byte-level BPE
tokenizer trained on the spot on the SFT texts. Nothing is downloaded. It learns fast enough
for the tests and `make train` to show a real LoRA run; it is not meant to be good.

    <out>/config.json  model.safetensors  tokenizer.json  tokenizer_config.json (with a chat template)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
#: Renders system/user/assistant/tool turns; an assistant's tool calls follow its text as JSON.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(out: Path, texts: Iterable[str], *, seed: int = 0, vocab_size: int = 512, hidden: int = 64,
                     layers: int = 2, heads: int = 4) -> dict[str, Any]:
    """Write a tiny model to `out` (replacing what is there); return its config. Same texts and
    seed → the same files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        # a turn ends with <|end|> (see CHAT_TEMPLATE): as the end-of-sequence token, generation stops there
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|end|>",
        "unk_token": "<unk>", "pad_token": "</s>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }, indent=2) + "\n")
    # architectures: what transformers, TRL and llama.cpp's convert_lora_to_gguf.py read the model class from
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers,
              "intermediate_size": 2 * hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
              "rms_norm_eps": 1e-5, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 4096,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": SPECIAL_TOKENS.index("<|end|>")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return config


def sft_texts(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    """The texts a tokenizer should know: prompts, answers and tool calls of the SFT rows."""
    for row in rows:
        yield row["instruction"]
        yield row["response"] or ""
        for c in row["tool_calls"]:
            yield json.dumps({"name": c["name"], "arguments": c["arguments"]})
