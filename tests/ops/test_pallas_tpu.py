"""The TPU lowering (splash attention with a mask built from mask_fn) and the "pallas" dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.model import transformer
from sdar_jax.ops import attention, masks, pallas_tpu
from tests.ops import pallas_cases as cases


def _output_and_grads(fn, q, k, v, dout):
    """cases.output_and_grads under one jit: eagerly, the vjp plumbing around the interpreted
    kernels was dispatched op by op."""
    return jax.jit(lambda *a: cases.output_and_grads(fn, *a))(q, k, v, dout)


def _reference(q, k, v, dout, mask):
    """cases.reference (the XLA attention and its vjp) under one jit."""
    return jax.jit(lambda *a: cases.reference(*a, mask))(q, k, v, dout)


BLOCKS = pallas_tpu.SplashBlocks(128, 128, 128, 128)


@pytest.mark.parametrize("mask,length,heads,kv_heads", [
    (masks.block_diffusion(4), 96, 4, 2),  # row 192, padded to 256
    (masks.block_diffusion(16), 64, 4, 1),
    (masks.block_causal(8), 128, 2, 2),
])
def test_splash_matches_reference(mask, length, heads, kv_heads):
    """Packed rows with canonical positions (every example restarts at 0 on a block boundary)."""
    ids = cases.training_inputs(length, mask=mask, batch=2, length=length, n_segments=3, pad_blocks=1)
    row = ids.q_positions.shape[1]
    q, k, v, dout = cases.qkv(row, 2, row, row, heads, kv_heads, 32, jnp.float32)
    got = _output_and_grads(
        lambda q, k, v: pallas_tpu.splash_attention(q, k, v, mask=mask, positions=ids.q_positions,
                                                    segment_ids=ids.q_segment_ids,
                                                    blocks=BLOCKS, interpret=True), q, k, v, dout)
    errors = cases.max_errors(got, _reference(q, k, v, dout, ids))
    assert max(errors) < 1e-5, dict(zip(("out", "dq", "dk", "dv"), errors))


def test_index_mask_is_mask_fn_on_canonical_positions():
    mask, length = masks.block_diffusion(4), 24
    index_mask = pallas_tpu.IndexMask(mask, 2 * length, length)
    pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), 2)[None]
    np.testing.assert_array_equal(index_mask[:, :], np.asarray(masks.dense_mask(mask, pos, pos))[0])
    assert index_mask == pallas_tpu.IndexMask(mask, 2 * length, length)
    assert hash(index_mask) == hash(pallas_tpu.IndexMask(mask, 2 * length, length))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_impl_in_the_model_matches_xla(backend, monkeypatch):
    """The tiny SDAR model's training logits and a cached decode step agree across impls."""
    real = attention.attention
    monkeypatch.setattr(attention, "attention",
                        lambda *a, **kw: real(*a, **kw, backend=backend, interpret=True))
    config = get_preset("tiny", num_layers=1)
    # Init and each forward under jit: eagerly they were dispatched op by op.
    params = jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    length = 32
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 2 * length), 0, config.vocab_size)
    pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), (2, 2))
    seg = jnp.ones_like(pos)

    def logits(impl, **kw):
        cfg = config.replace(attention_impl=impl)
        n = kw.pop("n", 2 * length)
        return jax.jit(lambda p: transformer.apply(cfg, p, tokens[:, :n], **kw).logits)(params)

    train_kw = dict(positions=pos, mask=masks.block_diffusion(4), segment_ids=seg)
    np.testing.assert_allclose(logits("pallas", **train_kw), logits("xla", **train_kw), atol=2e-5)
    cache = transformer.init_cache(config, 2, 32)
    step_kw = dict(n=4, positions=jnp.array([[0, 1, 2, 3], [8, 9, 10, 11]], jnp.int32),
                   mask=masks.block_causal(4), cache=cache)
    np.testing.assert_allclose(logits("pallas", **step_kw), logits("xla", **step_kw), atol=2e-5)


def test_mosaic_lowering_of_splash_and_cache_kernels():
    """Pallas -> Mosaic lowering for a TPU v5e target runs on CPU once the abstract mesh names
    that target; the Mosaic compiler passes themselves need a TPU and are not run here."""
    bf16, i32 = jnp.bfloat16, jnp.int32
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), bf16)
    k = jax.ShapeDtypeStruct((1, 256, 2, 128), bf16)
    pos = jax.ShapeDtypeStruct((1, 256), i32)

    def loss(q, k, v, pos):
        out = attention.attention(q, k, v, masks.AttentionMask.self_attention(masks.block_diffusion(4), pos, pos),
                                  impl="pallas", backend="tpu", interpret=False)
        return out.astype(jnp.float32).sum()

    def decode(q, k, v, q_pos, kv_pos):
        return attention.attention(q, k, v, masks.AttentionMask(masks.block_causal(4), q_pos, kv_pos),
                                   impl="pallas", backend="tpu", interpret=False)

    with cases.lowering_target("TPU v5 lite", "tpu", 1):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, pos).lower(
            lowering_platforms=("tpu",))
        lowered = jax.jit(decode).trace(
            jax.ShapeDtypeStruct((2, 4, 4, 128), bf16), jax.ShapeDtypeStruct((2, 1024, 2, 128), bf16),
            jax.ShapeDtypeStruct((2, 1024, 2, 128), bf16), jax.ShapeDtypeStruct((2, 4), i32),
            jax.ShapeDtypeStruct((2, 1024), i32)).lower(lowering_platforms=("tpu",))
    assert grad.as_text().count("tpu_custom_call") >= 3
    assert "tpu_custom_call" in lowered.as_text()


def test_pallas_impl_names_bad_metadata():
    q, k, v, _ = cases.qkv(0, 2, 8, 8, 2, 2, 16, jnp.float32)
    pos = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"kv_positions .*\(2, 8\)"):
        attention.attention(q, k, v, masks.AttentionMask(masks.causal(), pos, pos[:, :4]), impl="pallas")
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
        attention.attention(q, k, v, masks.AttentionMask(masks.causal(), pos, pos, q_segment_ids=pos),
                            impl="pallas")


def test_pallas_impl_under_a_mesh_runs_per_device_shards():
    """With a mesh set, the kernel runs inside shard_map (batch over data/expert, heads over
    tensor) and still equals the reference, gradients included."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 1, 2, 2), ("data", "fsdp", "tensor", "expert"),
                         axis_types=(AxisType.Auto,) * 4)
    mask = masks.block_diffusion(4)
    ids = cases.training_inputs(11, mask=mask, batch=4, length=32, n_segments=2)
    q, k, v, dout = cases.qkv(11, 4, 64, 64, 4, 2, 16, jnp.float32)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: cases.output_and_grads(
            lambda q, k, v: attention.attention(q, k, v, ids, impl="pallas"), q, k, v, dout))(q, k, v)
        lowered = jax.jit(lambda q, k, v: attention.attention(q, k, v, ids, impl="pallas")).lower(q, k, v)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    errors = cases.max_errors(got, _reference(q, k, v, dout, ids))
    assert max(errors) < 1e-5, errors


def test_head_dim_the_compiled_kernels_cannot_tile_falls_back_to_xla(caplog):
    q, k, v, _ = cases.qkv(2, 1, 16, 16, 4, 2, 16, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 16))
    mask = masks.AttentionMask.self_attention(masks.causal(), pos)
    got = attention.attention(q, k, v, mask, impl="pallas", backend="tpu", interpret=False)
    np.testing.assert_allclose(got, attention.attention(q, k, v, mask, impl="xla"), atol=1e-6)
    assert "head_dim 16" in caplog.text
