"""Llama-family parity: tiny random LlamaForCausalLM (no q/k norm, its own
RoPE theta, tied or untied head) converted with the CLI gives transformers'
logits under causal, block-causal and block-diffusion masks, and exports back."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import hf_models
from tests.helpers.parity import (
    convert_with_cli, export_with_cli, packed_layout, reference_mask, sdar_logits,
)

ATOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    hf_dir, model = hf_models.make_checkpoint(
        tmp / "hf", "llama", tie_word_embeddings=request.param, seed=5, rope_theta=1e5,
        rms_norm_eps=1e-5,
    )
    config, params = convert_with_cli(hf_dir, tmp / "ckpt")
    assert config.model_type == "llama" and not config.qk_norm
    assert (config.rope_theta, config.rms_norm_eps) == (1e5, 1e-5)
    assert "q_norm" not in params["layers"]["self_attn"]
    assert ("lm_head" in params) != request.param
    return model, config, params, tmp / "ckpt"


def test_causal_logits_match(converted):
    model, config, params, _ = converted
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 24))
    positions = np.broadcast_to(np.arange(24), tokens.shape)
    ref = hf_models.hf_logits(model, tokens)
    np.testing.assert_allclose(sdar_logits(config, params, tokens, positions, "causal"), ref,
                               atol=ATOL, rtol=0)


def test_block_masks_match(converted):
    model, config, params, _ = converted
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=(1, 16))
    positions = np.arange(16)[None]
    allowed = reference_mask("block_causal", positions, np.ones_like(positions), BLOCK)
    np.testing.assert_allclose(
        sdar_logits(config, params, tokens, positions, "block_causal", BLOCK),
        hf_models.hf_logits(model, tokens, positions, allowed), atol=ATOL, rtol=0,
    )
    clean, pos, seg = packed_layout([8, 4], rng, config.vocab_size)
    noisy = np.where(rng.random(clean.shape) < 0.5, 0, clean)
    row, pos, seg = np.concatenate([noisy, clean])[None], np.tile(pos, 2)[None], np.tile(seg, 2)[None]
    allowed = reference_mask("block_diffusion", pos, seg, BLOCK)
    np.testing.assert_allclose(
        sdar_logits(config, params, row, pos, "block_diffusion", BLOCK, seg),
        hf_models.hf_logits(model, row, pos, allowed), atol=ATOL, rtol=0,
    )


def test_export_back_reproduces_transformers(converted, tmp_path):
    model, config, _, ckpt = converted
    export_with_cli(ckpt, tmp_path / "exported")
    reloaded = hf_models.load_model(tmp_path / "exported")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(1, 10))
    np.testing.assert_allclose(
        hf_models.hf_logits(reloaded, tokens), hf_models.hf_logits(model, tokens), atol=1e-6, rtol=0
    )
