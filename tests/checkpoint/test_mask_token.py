"""A mask token added to an AR checkpoint: the new row is the mean of the others (NumPy
reference), a tied head's logits over the old vocabulary are unchanged, and the tokenizer
resolves the token to the new id."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from sdar_jax.checkpoint import mask_token
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.config import get_preset
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR, load_tokenizer
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

CHAR_VOCAB = 103  # the char tokenizer's ids; the next free id is 103


def _params(vocab: int, tied: bool):
    config = get_preset("tiny", vocab_size=vocab, num_layers=1, mask_token_id=None,
                        block_size=None, tie_word_embeddings=tied, model_type="qwen3")
    return config, transformer.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("tied", [True, False])
def test_add_mean_row_appends_the_mean_of_the_other_rows(tied):
    config, params = _params(10, tied)
    out = mask_token.add_mean_row(params, 10)
    table = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    new = out["embed_tokens"]["embedding"]
    assert new.shape == (11, table.shape[1]) and new.dtype == np.float32
    np.testing.assert_array_equal(new[:10], params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(new[10], sum(table[i] for i in range(10)) / 10, rtol=1e-6)
    assert ("lm_head" in out) == (not tied)
    if not tied:
        kernel = np.asarray(params["lm_head"]["kernel"], np.float64)
        head = out["lm_head"]["kernel"]
        np.testing.assert_array_equal(head[:, :10], params["lm_head"]["kernel"])
        np.testing.assert_allclose(head[:, 10], sum(kernel[:, i] for i in range(10)) / 10,
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="embed_tokens/embedding has 10 rows; expected vocab_size 12"):
        mask_token.add_mean_row(params, 12)


def _ar_checkpoint(tmp_path, tied=True):
    config, params = _params(CHAR_VOCAB, tied)
    src = tmp_path / "ar"
    save_params_checkpoint(src, config, params, aux_dir=CHAR_TOKENIZER_DIR)
    return config, params, src


def _logits(config, params, tokens):
    positions = np.arange(tokens.shape[1])[None]
    return np.asarray(transformer.apply(config, params, tokens, positions, mask=MaskSpec("causal"),
                                        segment_ids=np.ones_like(tokens)).logits)


def test_add_mask_token_writes_a_checkpoint_with_the_token(tmp_path):
    config, params, src = _ar_checkpoint(tmp_path)
    out = mask_token.add_mask_token(str(src), str(tmp_path / "base"), "<|mask|>", block_size=4)
    new_config, new_params = load_params_checkpoint(out)
    assert (new_config.vocab_size, new_config.mask_token_id, new_config.block_size) == (104, 103, 4)
    tokenizer = load_tokenizer(out)
    assert tokenizer.mask_token_id == 103 and tokenizer.encode("a<|mask|>") == [tokenizer.encode("a")[0], 103]
    tokens = np.asarray([[7, 20, 31, 9, 44]], np.int32)
    before, after = _logits(config, params, tokens), _logits(new_config, new_params, tokens)
    assert after.shape[-1] == 104
    np.testing.assert_allclose(after[..., :103], before, atol=1e-5)  # tied head: old logits kept
    with pytest.raises(ConversionError, match="already exists"):
        mask_token.add_mask_token(str(src), out, "<|mask|>")


def test_register_token_refuses_a_taken_id_or_token(tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(CHAR_TOKENIZER_DIR, tok_dir)
    with pytest.raises(ConversionError, match="next free id is 103, not 110"):
        mask_token.register_token(str(tok_dir), "<|mask|>", 110)
    with pytest.raises(ConversionError, match="already holds '<MASK>'"):
        mask_token.register_token(str(tok_dir), "<MASK>", 103)
    (tok_dir / "tokenizer_config.json").unlink()
    with pytest.raises(ConversionError, match="tokenizer_config.json: no such file"):
        mask_token.register_token(str(tok_dir), "<|mask|>", 103)
    assert json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"][-1]["id"] == 5
