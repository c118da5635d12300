"""Decode attention against a KV cache (both lowerings, interpret mode) equals the XLA reference."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import masks, pallas_decode, pallas_tpu
from sdar_jax.ops.xla_attention import xla_attention
from tests.ops import pallas_cases as cases


def _cache_case(seed, *, batch, block_size, max_len, heads, kv_heads, head_dim=32, dtype=jnp.float32):
    """Rows at ragged block starts: each row decodes block `start // B` of its own sequence."""
    mask = cases.decode_inputs(seed, batch=batch, block_size=block_size, max_len=max_len)
    q, k, v, _ = cases.qkv(seed, batch, block_size, max_len, heads, kv_heads, head_dim, dtype)
    return q, k, v, mask


KERNELS = {"gpu": pallas_decode.decode_attention, "tpu": pallas_tpu.cache_attention}


@pytest.mark.parametrize("backend,block_size,heads,kv_heads,splits", [
    ("gpu", 4, 4, 4, 3),
    ("gpu", 16, 8, 4, None),
    ("gpu", 1, 8, 2, 2),
    ("tpu", 4, 8, 2, None),
    ("tpu", 8, 4, 1, None),
])
def test_decode_matches_reference_with_ragged_cache_lengths(backend, block_size, heads, kv_heads, splits):
    q, k, v, mask = _cache_case(block_size + heads, batch=4, block_size=block_size, max_len=96,
                                heads=heads, kv_heads=kv_heads)
    extra = {"splits": splits} if backend == "gpu" else {}
    got = KERNELS[backend](q, k, v, mask, block_k=16, interpret=True, **extra)
    want = xla_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_decode_ignores_garbage_beyond_the_visible_prefix():
    """Cache slots past a row's block hold junk (NaN here): skipped tiles are never read."""
    q, k, v, mask = _cache_case(0, batch=2, block_size=4, max_len=64, heads=4, kv_heads=2)
    q_pos = jnp.asarray(np.array([[8, 9, 10, 11], [20, 21, 22, 23]], np.int32))
    mask = dataclasses.replace(mask, q_positions=q_pos)
    junk = (jnp.arange(64) >= 32)[None, :, None, None]
    got = pallas_decode.decode_attention(q, jnp.where(junk, jnp.nan, k), jnp.where(junk, jnp.nan, v),
                                         mask, block_k=16, splits=2, interpret=True)
    want = xla_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_decode_bfloat16():
    q, k, v, mask = _cache_case(5, batch=3, block_size=4, max_len=64, heads=4, kv_heads=2, dtype=jnp.bfloat16)
    got = pallas_decode.decode_attention(q, k, v, mask, block_k=16, interpret=True)
    want = xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_decode_rejects_the_training_mask(backend):
    q, k, v, mask = _cache_case(0, batch=1, block_size=4, max_len=16, heads=2, kv_heads=2)
    with pytest.raises(ValueError, match="block_diffusion"):
        KERNELS[backend](q, k, v, dataclasses.replace(mask, spec=masks.block_diffusion(4)), interpret=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_unused_decode_kernel_is_dead_code(backend):
    """A bare pallas_call survives dead-code elimination, which newer flax's nn.scan reads as the
    layer body's data dependency (the model then fails to trace); the wrapped kernel does not."""
    import jax
    from jax._src.interpreters import partial_eval as pe

    q, k, v, mask = _cache_case(0, batch=2, block_size=4, max_len=64, heads=4, kv_heads=2)

    def discards_attention(q, k, v):
        KERNELS[backend](q, k, v, mask, interpret=True)
        return q

    closed = jax.make_jaxpr(discards_attention)(q, k, v)
    _, used_inputs = pe.dce_jaxpr(closed.jaxpr, [True])
    assert used_inputs == [True, False, False]


def test_decode_kernel_refuses_gradients():
    import jax

    q, k, v, mask = _cache_case(0, batch=1, block_size=4, max_len=32, heads=4, kv_heads=2)
    with pytest.raises(TypeError, match="forward-only"):
        jax.grad(lambda q: pallas_decode.decode_attention(q, k, v, mask, interpret=True).sum())(q)
