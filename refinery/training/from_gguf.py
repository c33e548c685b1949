"""A GGUF base model — what llama.cpp and Ollama users already have on disk — as an mlx-lm folder.

`convert(path, cache_root)` reads the `.gguf` file with llama.cpp's own `gguf` package and
writes, once, a folder mlx-lm loads: `config.json` (with `architectures`), `model.safetensors`
(every tensor dequantised to float32: on CPU, float32 matmuls are the ones that use BLAS),
`tokenizer.json` and `tokenizer_config.json` (the byte-level BPE, its special tokens and the
chat template, all from the GGUF metadata — unless that template drops tool calls, see
CHATML_TOOLS), and `CONVERTED.json` (the source file's sha256, its
architecture and quantisation types, this module's version). The folder is named after the
file's sha256, so a converted model is reused until the file changes.

llama.cpp stores the rows of the query and key projections permuted for its rotary embedding
(`convert_hf_to_gguf.py`, LlamaModel.permute); they are put back here. A model without
`output.weight` ties its output to the token embeddings.

Supported architectures: llama (Llama 1–3, SmolLM/SmolLM2, TinyLlama, Mistral-7B stored as
llama). Others get a GGUFError naming them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from refinery.canonical import file_sha256
from refinery.errors import RefineryError

SUPPORTED = ("llama",)
#: Bumped when what `convert` writes changes, so older cached folders are converted again.
CONVERTER_VERSION = 2

#: ChatML (SmolLM2, Qwen, …) that also renders what an agent does: the tools offered (in a system
#: turn of their own) and each tool call, one JSON object a line after the assistant's text —
#: the shape `refinery.answers.parse_tool_calls` reads back. Used in place of a GGUF's own ChatML
#: template when that one drops tool calls (SmolLM2's does: an adapter trained through it learns
#: to answer a tool prompt with nothing).
CHATML_TOOLS = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools you can call, one JSON object a line: ' }}"
    "{{ tools | tojson }}{{ '<|im_end|>\\n' }}{% endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- elif message['content'] %}{% for part in message['content'] %}{{ part.get('text', '') }}{% endfor %}"
    "{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "{{ '\\n' if (message['content'] or not loop.first) else '' }}"
    "{{ {'name': fn['name'], 'arguments': fn['arguments']} | tojson }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
MARKER = "CONVERTED.json"

#: GGUF tensor name (per block: `blk.N.<name>`) → mlx-lm / Hugging Face llama parameter name.
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(RefineryError):
    """The file is not a GGUF model refinery can convert: the message says why and what to do."""


def convert(path: Path, cache_root: Path) -> Path:
    """The mlx-lm folder converted from the GGUF file at `path`, under `cache_root` (converted
    now unless an earlier conversion of the same bytes is there)."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    digest = file_sha256(path)
    out = cache_root / f"gguf-{digest[:16]}"
    marker = out / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("sha256") == digest and done.get("converter_version") == CONVERTER_VERSION:
            return out
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=cache_root))
    try:
        record = _convert_into(path, tmp)
        # the file's name, not its path: the folder (and adapters trained on it) must not depend on
        # where the workspace lies
        record.update({"source": path.name, "sha256": digest, "converter_version": CONVERTER_VERSION})
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field of a GGUFReader as plain Python values (strings decoded)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's row permutation of a query or key projection (rows are output features)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: Any, n_head: int) -> Any:
    """llama.cpp's row permutation (convert_hf_to_gguf.py): for writing what llama.cpp reads
    (adapters, test models)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_into(path: Path, out: Path) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on a file that is not GGUF
        raise GGUFError(f"{path}: not a GGUF file refinery can read ({e})") from e
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)}); "
                        "use a llama-architecture GGUF, or convert the model to an mlx-lm folder with mlx_lm.convert")
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    tokens = meta["tokenizer.ggml.tokens"]

    weights: dict[str, Any] = {}
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no place in a llama model; is this a llama GGUF?")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        weights[name] = mx.array(w)
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
    tied = "lm_head.weight" not in weights
    mx.save_safetensors(str(out / "model.safetensors"), dict(sorted(weights.items())))

    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(meta[f"{arch}.embedding_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        # stored as float32 in GGUF: 1e-5 reads back as 9.999999747378752e-06
        "rms_norm_eps": float(f"{float(meta.get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": len(tokens), "tie_word_embeddings": tied,
        **({"bos_token_id": int(bos)} if bos is not None else {}),
        **({"eos_token_id": int(eos)} if eos is not None else {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    template_source = _write_tokenizer(meta, out, path)
    return {"architecture": arch, "tensors": len(weights), "quantisation": dict(sorted(qtypes.items())),
            "tied_embeddings": tied, "chat_template": template_source,
            "tokenizer_pre": meta.get("tokenizer.ggml.pre")}


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{BLOCK_TENSORS[parts[2]]}.{kind}"
    return None


#: llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → how the text is split before BPE.
#: "smollm" splits digits one by one; the others here split as GPT-2's byte-level BPE does.
_DIGIT_SPLIT = ("smollm",)


def _write_tokenizer(meta: dict[str, Any], out: Path, path: Path) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer {kind!r} is not supported (supported: gpt2, the byte-level BPE of "
                        "llama-3, SmolLM and GPT-2 style models)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) and user-defined ones (type 4) are never split: <|im_start|>, <|end|>
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty in (3, 4)])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
    for field, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                       ("unk_token", "tokenizer.ggml.unknown_token_id"),
                       ("pad_token", "tokenizer.ggml.padding_token_id")):
        if (t := token(key)) is not None:
            cfg[field] = t
    template, source = chat_template(meta.get("tokenizer.chat_template"))
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return source


def renders_tool_calls(template: str) -> bool:
    """Whether a chat template writes an assistant's tool calls into the prompt at all."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    probe = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "probe_tool_7q", "arguments": {"a": 1}}}]}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    try:
        text = env.from_string(template).render(messages=probe, tools=None, add_generation_prompt=False,
                                                bos_token="", eos_token="")
    except Exception:  # a template that cannot take tool calls at all
        return False
    return "probe_tool_7q" in text


def chat_template(gguf_template: str | None) -> tuple[str | None, str]:
    """The template the converted model is trained and evaluated with, and where it comes from:
    the GGUF's own when it renders tool calls, else CHATML_TOOLS for a ChatML model."""
    if not gguf_template:
        return None, "none"
    if renders_tool_calls(gguf_template):
        return gguf_template, "gguf"
    if "<|im_start|>" in gguf_template:
        return CHATML_TOOLS, "refinery:chatml-tools (the GGUF's template drops tool calls)"
    return gguf_template, "gguf (drops tool calls: tool use cannot be learnt through it)"
