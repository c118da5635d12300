"""The Triton-style flash kernels (interpret mode) equal the XLA reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import attention, masks, pallas_gpu
from tests.ops import pallas_cases as cases

def _output_and_grads(fn, q, k, v, dout):
    """cases.output_and_grads under one jit: eagerly, the vjp plumbing around the interpreted
    kernels was dispatched op by op."""
    return jax.jit(lambda *a: cases.output_and_grads(fn, *a))(q, k, v, dout)


def _reference(q, k, v, dout, mask):
    """cases.reference (the XLA attention and its vjp) under one jit."""
    return jax.jit(lambda *a: cases.reference(*a, mask))(q, k, v, dout)


SMALL = pallas_gpu.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
MIXED = pallas_gpu.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)

# (mask, length L, heads, kv_heads, n_segments, pad_blocks, block sizes); block_diffusion rows are 2L.
CASES = [
    (masks.block_diffusion(1), 40, 2, 2, 3, 0, SMALL),
    (masks.block_diffusion(4), 48, 4, 2, 3, 2, SMALL),
    (masks.block_diffusion(8), 64, 8, 2, 2, 1, MIXED),
    (masks.block_diffusion(16), 96, 4, 1, 2, 0, MIXED),
    (masks.causal(), 80, 4, 2, 3, 0, SMALL),
    (masks.block_causal(4), 52, 4, 4, 2, 1, MIXED),
]


@pytest.mark.parametrize("mask,length,heads,kv_heads,n_segments,pad_blocks,blocks", CASES)
def test_flash_matches_reference_float32(mask, length, heads, kv_heads, n_segments, pad_blocks, blocks):
    kw = cases.training_inputs(length, mask=mask, batch=2, length=length, n_segments=n_segments,
                               pad_blocks=pad_blocks)
    row = kw.q_positions.shape[1]
    q, k, v, dout = cases.qkv(row, 2, row, row, heads, kv_heads, 16, jnp.float32)
    got = _output_and_grads(
        lambda q, k, v: pallas_gpu.flash_attention(q, k, v, kw, block_sizes=blocks, interpret=True),
        q, k, v, dout)
    want = _reference(q, k, v, dout, kw)
    errors = cases.max_errors(got, want)
    assert max(errors) < 1e-5, dict(zip(("out", "dq", "dk", "dv"), errors))


def test_flash_arbitrary_positions_and_cross_lengths():
    """Positions need not restart at 0 (left-padded rows); q_len != kv_len works too."""
    mask = masks.block_causal(4)
    q_pos = jnp.asarray(np.array([np.arange(20, 44), np.arange(40, 64)], np.int32))
    kv_pos = jnp.asarray(np.broadcast_to(np.arange(56, dtype=np.int32), (2, 56)).copy())
    kv_seg = jnp.asarray((np.arange(56) >= 3).astype(np.int32)[None].repeat(2, 0))
    kw = masks.AttentionMask(mask, q_pos, kv_pos, jnp.ones((2, 24), jnp.int32), kv_seg)
    q, k, v, dout = cases.qkv(1, 2, 24, 56, 4, 2, 16, jnp.float32)
    got = _output_and_grads(
        lambda q, k, v: pallas_gpu.flash_attention(q, k, v, kw, block_sizes=SMALL, interpret=True),
        q, k, v, dout)
    assert max(cases.max_errors(got, _reference(q, k, v, dout, kw))) < 1e-5


# bfloat16: inputs rounded to bf16, reference in float32 on the rounded inputs. The kernel
# multiplies bf16 tiles with float32 accumulation and rounds p to bf16 before p @ V (as the
# XLA path does), so errors are a few bf16 ulps of the result scale.
BF16_TOLERANCE = {"out": 2e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}


def test_flash_bfloat16_within_documented_tolerance():
    mask = masks.block_diffusion(4)
    kw = cases.training_inputs(3, mask=mask, batch=2, length=64, n_segments=2)
    q, k, v, dout = cases.qkv(3, 2, 128, 128, 4, 2, 32, jnp.bfloat16)
    got = _output_and_grads(
        lambda q, k, v: pallas_gpu.flash_attention(q, k, v, kw, block_sizes=MIXED, interpret=True),
        q, k, v, dout)
    assert got[0].dtype == jnp.float32  # cast by the helper; the kernel returned bf16
    want = _reference(q, k, v, dout, kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= BF16_TOLERANCE[name] * max(scale, 1.0), name


def test_flash_rejects_block_not_multiple_of_group():
    q, k, v, _ = cases.qkv(0, 1, 16, 16, 8, 1, 16, jnp.float32)
    pos = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="block_q"):
        pallas_gpu.flash_attention(q, k, v, masks.AttentionMask.self_attention(masks.causal(), pos),
                                   block_sizes=pallas_gpu.BlockSizes(4, 16, 16, 16), interpret=True)


H100 = "NVIDIA H100 80GB HBM3"  # the compute capability (9.0) Triton lowers for


def test_triton_lowering_of_forward_backward_and_decode():
    """The kernels lower to Triton for CUDA (done in Python, no GPU needed): catches ops and
    tile shapes Triton cannot take, which interpret mode accepts."""
    import jax

    from sdar_jax.ops import pallas_decode

    bf16, i32 = jnp.bfloat16, jnp.int32
    q = jax.ShapeDtypeStruct((1, 256, 8, 64), bf16)
    k = jax.ShapeDtypeStruct((1, 256, 2, 64), bf16)
    pos = jax.ShapeDtypeStruct((1, 256), i32)

    def loss(q, k, v, pos):
        out = pallas_gpu.flash_attention(q, k, v,
                                         masks.AttentionMask.self_attention(masks.block_diffusion(4), pos, pos))
        return out.astype(jnp.float32).sum()

    with cases.lowering_target(H100, "gpu", 132):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, pos).lower(
            lowering_platforms=("cuda",))
    assert grad.as_text().count("triton") >= 3  # forward, dQ and dK/dV kernels

    def decode(q, k, v, q_pos, kv_pos):
        return pallas_decode.decode_attention(q, k, v, masks.AttentionMask(masks.block_causal(4), q_pos, kv_pos))

    with cases.lowering_target(H100, "gpu", 132):
        lowered = jax.jit(decode).trace(
            jax.ShapeDtypeStruct((2, 4, 8, 64), bf16), k, k, jax.ShapeDtypeStruct((2, 4), i32),
            jax.ShapeDtypeStruct((2, 256), i32)).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


def test_tile_sizes_thread_through_the_dispatcher():
    """The dispatcher passes its tile arguments to the kernels (the tuning hooks)."""
    kw = cases.training_inputs(5, mask=masks.block_diffusion(4), batch=1, length=32, n_segments=2)
    q, k, v, _ = cases.qkv(5, 1, 64, 64, 4, 2, 16, jnp.float32)

    def pallas(q, mask, **tuning):  # under jit: eagerly it was dispatched op by op
        return jax.jit(lambda q: attention.attention(q, k, v, mask, impl="pallas", backend="gpu", interpret=True,
                                                     tuning=attention.KernelTuning(**tuning)))(q)

    got = pallas(q, kw, gpu_blocks=MIXED)
    np.testing.assert_allclose(got, _reference(q, k, v, q, kw)[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"BlockSizes.block_q \(1\)"):
        pallas(q, kw, gpu_blocks=pallas_gpu.BlockSizes(1, 16, 16, 16))
    dkw = masks.AttentionMask(masks.block_causal(4), kw.q_positions[:, 60:], kw.kv_positions)
    decoded = pallas(q[:, 60:], dkw, decode_block_k=16, decode_splits=2)
    want = _reference(q[:, 60:], k, v, q[:, 60:], dkw)[0]
    np.testing.assert_allclose(decoded, want, atol=1e-5)
    with pytest.raises(ValueError, match="block_k"):
        pallas(q[:, 60:], dkw, decode_block_k=24)
