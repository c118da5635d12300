"""GGUF -> Hugging Face on a synthetic file: a tiny random Llama written the
way llama.cpp's converter writes it (renamed tensors, q/k rows permuted, one
tensor quantised), read back by sdar_jax.from_gguf."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sdar_jax.convert import from_gguf
from sdar_jax.convert.from_hf import hf_to_params
from sdar_jax.convert.safetensors_io import find_safetensors
from tests.helpers import hf_models

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to write GGUF files")

LAYER_NAMES = {v: k for k, v in from_gguf._LAYER_NAMES.items()}
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): control tokens, 256 bytes, letter pairs."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters][: size - len(CONTROL) - 256]
    tokens = CONTROL + bytes_to_unicode() + [a + b for a, b in pairs]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types, [f"{a} {b}" for a, b in pairs]


def write_gguf(path, model, arch: str = "llama", tokenizer_model: str = "gpt2") -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types, merges = tiny_vocab(cfg.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TEMPLATE)
    inverse = {v: k for k, v in from_gguf._GLOBAL_NAMES.items()}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        value = tensor.numpy()
        if name in inverse:
            gguf_name = inverse[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":  # one quantised tensor, like the real file
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = hf_models.build_model("llama", tie_word_embeddings=True, seed=7, rope_theta=1e5)
    write_gguf(tmp / "tiny.gguf", model)
    return tmp, model


def test_tensors_come_back_in_hf_layout(synthetic, tmp_path):
    tmp, model = synthetic
    config = from_gguf.gguf_to_hf(tmp / "tiny.gguf", tmp_path / "hf", max_shard_bytes=200_000)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 1e5
    files = {n: p for n, p in find_safetensors(tmp_path / "hf").items()}
    assert len(set(files.values())) > 1  # sharded, with an index
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(files) == sorted(state)
    embed = state["model.embed_tokens.weight"].numpy()
    quantised = gguf.quants.dequantize(
        gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    from safetensors import safe_open

    for name, path in files.items():
        with safe_open(path, framework="numpy") as f:
            got = f.get_tensor(name)
        want = quantised if name == "model.embed_tokens.weight" else state[name].numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)
    # The directory is valid converter input.
    cfg, params = hf_to_params(tmp_path / "hf")
    assert cfg.model_type == "llama" and not cfg.qk_norm and "lm_head" not in params


def test_tokenizer_matches_transformers_gguf_tokenizer(synthetic, tmp_path):
    import transformers

    from sdar_jax.data.tokenizer import load_tokenizer

    tmp, _ = synthetic
    from_gguf.gguf_to_hf(tmp / "tiny.gguf", tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file="tiny.gguf")
    for text in ["abcd efgh", "hello world 123", "<|im_start|>user\nzz<|im_end|>", "ça va? ß"]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == text
    tokens, _, _ = tiny_vocab(512)
    assert ours.encode("ab") == [tokens.index("ab")]  # one merged token, not two bytes
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == "<|im_start|>user\nhi<|im_end|>\n"


def test_unsupported_files_are_refused(tmp_path, synthetic):
    _, model = synthetic
    write_gguf(tmp_path / "gpt.gguf", model, arch="gpt2")
    with pytest.raises(from_gguf.GGUFError, match="general.architecture is 'gpt2'"):
        from_gguf.gguf_to_hf(tmp_path / "gpt.gguf", tmp_path / "out")
    write_gguf(tmp_path / "spm.gguf", model, tokenizer_model="llama")
    with pytest.raises(from_gguf.GGUFError, match="tokenizer.ggml.model is 'llama'"):
        from_gguf.gguf_to_hf(tmp_path / "spm.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["gpt.gguf", "spm.gguf"]


def test_cli_errors_exit_2(tmp_path, capsys):
    from launch import gguf_to_hf

    assert gguf_to_hf.main(["--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
