"""The unrolled layer layout (`transformer.unstack_layers`) against the scanned stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdar_jax.config import get_preset
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_unrolled_forward_equals_scanned(preset):
    config = get_preset(preset)
    params = transformer.init_params(config, jax.random.key(0))
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
    for kwargs in ({}, {"cache": cache}):
        want = transformer.apply(config, params, tokens, positions, mask=mask, **kwargs)
        got = transformer.apply(config, unrolled, tokens, positions, mask=mask, **kwargs)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
        if kwargs:
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
