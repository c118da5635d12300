"""sdar_jax logits == transformers logits on converted tiny Qwen3 checkpoints.

The checkpoint goes through the command-line code path (`hf-to-jax`), and
back (`jax-to-hf`). Custom masks are built in numpy from the spec
(tests/helpers/parity.py) and given to transformers as 4-D float additive masks.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdar_jax.convert.safetensors_io import SAFETENSORS_INDEX
from tests.helpers import hf_models
from tests.helpers.parity import (
    convert_with_cli, export_with_cli, packed_layout, reference_mask, sdar_logits,
)

ATOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory):
    """(transformers model, sdar_jax config, params, checkpoint dir) via the CLI."""
    tmp = tmp_path_factory.mktemp("qwen3")
    hf_dir, model = hf_models.make_checkpoint(
        tmp / "hf", "qwen3", tie_word_embeddings=request.param, seed=3, rope_theta=1e6
    )
    config, params = convert_with_cli(hf_dir, tmp / "ckpt")
    assert config.tie_word_embeddings == request.param and config.qk_norm
    assert ("lm_head" in params) != request.param
    return model, config, params, tmp / "ckpt"


def test_causal_logits_match(converted):
    model, config, params, _ = converted
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(2, 16))
    positions = np.broadcast_to(np.arange(16), tokens.shape)
    ref = hf_models.hf_logits(model, tokens)
    got = sdar_logits(config, params, tokens, positions, "causal")
    assert ref.shape == got.shape == (2, 16, config.vocab_size)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_block_causal_logits_match_explicit_mask(converted):
    model, config, params, _ = converted
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=(2, 16))
    positions = np.broadcast_to(np.arange(16), tokens.shape)
    allowed = reference_mask("block_causal", positions, np.ones_like(positions), BLOCK)
    ref = hf_models.hf_logits(model, tokens, positions, allowed)
    got = sdar_logits(config, params, tokens, positions, "block_causal", BLOCK)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # The mask matters: the plain causal result differs inside blocks.
    causal = hf_models.hf_logits(model, tokens)
    assert np.abs(causal - ref).max() > 1e-2


def test_block_diffusion_logits_match(converted):
    """A training row [xt ; x0] with duplicated positions, two packed examples."""
    model, config, params, _ = converted
    rng = np.random.default_rng(2)
    clean, positions, segments = packed_layout([8, 4], rng, config.vocab_size)
    noisy = np.where(rng.random(clean.shape) < 0.5, config.vocab_size - 1, clean)
    tokens = np.concatenate([noisy, clean])[None]
    positions = np.concatenate([positions, positions])[None]
    segments = np.concatenate([segments, segments])[None]
    allowed = reference_mask("block_diffusion", positions, segments, BLOCK)
    ref = hf_models.hf_logits(model, tokens, positions, allowed)
    got = sdar_logits(config, params, tokens, positions, "block_diffusion", BLOCK, segments)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_packed_causal_segments_match(converted):
    """Three packed examples and row padding (segment 0) in one row."""
    model, config, params, _ = converted
    rng = np.random.default_rng(3)
    tokens, positions, segments = packed_layout([5, 7, 2], rng, config.vocab_size)
    segments[-2:] = 0  # the last "example" is row padding
    tokens, positions, segments = tokens[None], positions[None], segments[None]
    allowed = reference_mask("causal", positions, segments, BLOCK)
    ref = hf_models.hf_logits(model, tokens, positions, allowed)
    got = sdar_logits(config, params, tokens, positions, "causal", segments=segments)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # Each example alone gives the same logits as inside the pack.
    alone = hf_models.hf_logits(model, tokens[:, 5:12])
    np.testing.assert_allclose(got[:, 5:12], alone, atol=ATOL, rtol=0)


def test_export_back_reproduces_transformers(converted, tmp_path):
    model, config, _, ckpt = converted
    out = tmp_path / "exported"
    export_with_cli(ckpt, out, "--max-shard-size", "60KB")
    assert (out / SAFETENSORS_INDEX).is_file()  # small shards force an index
    reloaded = hf_models.load_model(out)
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, size=(1, 12))
    np.testing.assert_allclose(
        hf_models.hf_logits(reloaded, tokens), hf_models.hf_logits(model, tokens), atol=1e-6, rtol=0
    )
