"""The decoding layouts (per-layer buffers, out-major kernels) against the stored params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdar_jax.checkpoint.sharded_restore import InferenceModel
from sdar_jax.config import get_preset
from sdar_jax.decode.cli import few_rows_layout
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.model import transformer
from sdar_jax.model.layers import OUT_MAJOR_KERNEL
from sdar_jax.ops.masks import MaskSpec

# Jitted: run eagerly, the unrolled layers were dispatched op by op (4 forwards of the
# out-major test: 8.7 s -> 2.4 s). Both sides of every comparison go through the same jit.
_apply = jax.jit(transformer.apply, static_argnums=0, static_argnames="mask")
_init_params = jax.jit(transformer.init_params, static_argnums=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_unrolled_forward_equals_scanned(preset):
    config = get_preset(preset)
    params = _init_params(config, jax.random.key(0))
    unrolled = transformer.unstack_layers(params)
    assert sorted(k for k in unrolled if k.startswith("layers")) == [
        f"layers_{i}" for i in range(config.num_layers)]
    for stacked, layer in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(unrolled["layers_1"])):
        np.testing.assert_array_equal(layer, stacked[1])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    mask = MaskSpec("block_causal", 4)
    cache = transformer.init_cache(config, 2, 16)
    want = _apply(config, params, tokens, positions, mask=mask, cache=cache)
    got = _apply(config, unrolled, tokens, positions, mask=mask, cache=cache)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.cache.k, want.cache.k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.cache.v, want.cache.v, rtol=1e-5, atol=1e-6)


def test_unstack_keeps_the_other_axes_sharding_and_frees_the_stack():
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("fsdp",))
    stacked = jax.device_put(jnp.arange(3 * 8 * 2, dtype=jnp.float32).reshape(3, 8, 2),
                             NamedSharding(mesh, P(None, "fsdp")))
    params = {"layers": {"w": stacked}, "norm": {"scale": jnp.ones(2)}}
    out = transformer.unstack_layers(params, free_stacked=True)
    assert stacked.is_deleted()
    for i in range(3):
        layer = out[f"layers_{i}"]["w"]
        assert layer.sharding.spec == P("fsdp")
        np.testing.assert_array_equal(layer, np.arange(i * 16, (i + 1) * 16).reshape(8, 2))
    assert out["norm"] is params["norm"]


def test_unstack_needs_a_stack():
    with pytest.raises(ValueError, match="no stacked 'layers'"):
        transformer.unstack_layers({"layers_0": {}, "norm": {}})


@pytest.mark.parametrize("preset, unstack", [("tiny", True), ("tiny-moe", False)])
def test_out_major_kernels_forward_equals_stored(preset, unstack):
    """Few rows (weight-first product) and many rows (row-first) alike, with a cache."""
    config = get_preset(preset)
    params = _init_params(config, jax.random.key(1))
    stored = transformer.unstack_layers(params) if unstack else params
    converted = transformer.out_major_kernels(stored, config, min_size=0)
    layer = converted["layers_0"] if unstack else converted["layers"]
    q = layer["self_attn"]["q_proj"][OUT_MAJOR_KERNEL]
    assert q.shape[-3:] == (config.num_heads, config.head_dim, config.hidden_size)
    assert OUT_MAJOR_KERNEL in layer["self_attn"]["o_proj"]
    assert ("kernel" in layer["mlp"]["gate_proj"]) == config.is_moe  # MoE experts stay
    assert OUT_MAJOR_KERNEL in converted["lm_head"]
    mask = MaskSpec("block_causal", 4)
    for rows in (4, 24):
        tokens = jnp.asarray(np.arange(rows)[None] * 7 % config.vocab_size, jnp.int32)
        positions = jnp.arange(rows, dtype=jnp.int32)[None]
        cache = transformer.init_cache(config, 1, 32)
        want = _apply(config, params, tokens, positions, mask=mask, cache=cache)
        got = _apply(config, converted, tokens, positions, mask=mask, cache=cache)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.cache.k, want.cache.k, rtol=1e-5, atol=1e-5)


def test_out_major_kernels_skip_small_weights_and_free_the_stored_ones():
    config = get_preset("tiny")
    params = transformer.unstack_layers(transformer.init_params(config, jax.random.key(0)))
    q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    head = params["lm_head"]["kernel"]
    out = transformer.out_major_kernels(params, config, min_size=head.size, free_stored=True)
    assert out["layers_0"]["self_attn"]["q_proj"]["kernel"] is q and not q.is_deleted()
    assert head.is_deleted()
    assert out["lm_head"][OUT_MAJOR_KERNEL].shape == head.shape[::-1]


@pytest.mark.parametrize("slots, block, mode, converts", [
    (1, 4, "diffusion", True), (4, 4, "diffusion", True), (5, 4, "diffusion", False),
    (16, 4, "ar", True), (17, 4, "ar", False)])
def test_few_rows_layout_only_for_few_rows_per_forward(slots, block, mode, converts):
    config = get_preset("tiny", hidden_size=512, num_heads=8, head_dim=64)
    params = _init_params(config, jax.random.key(0))  # one compile shared by the five cases
    model = InferenceModel(config, params, None)
    dc = DecodeConfig(mode=mode, block_length=block, steps=block)
    out = few_rows_layout(model, dc, slots, stored_layout=False)
    assert (OUT_MAJOR_KERNEL in out.params["lm_head"]) == converts
    assert few_rows_layout(model, dc, 1, stored_layout=True) is model
