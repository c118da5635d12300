"""Inputs and comparisons for checking attention kernels against the XLA reference.

Shared by the kernel tests (interpret mode on CPU) and the accelerator check
(`bench/accelerator_check.py`, compiled kernels on a GPU): packed training rows
whose examples start on block boundaries, random q/k/v, and the reference's
values and gradients computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.ops import masks
from sdar_jax.ops.xla_attention import xla_attention


def packed_rows(seed: int, batch: int, length: int, block_size: int, n_segments: int, pad_blocks: int = 0):
    """Positions and segment ids [batch, length]: examples start on block boundaries,
    positions restart at 0 per example, and `pad_blocks` trailing blocks are row padding
    (segment 0, positions continuing from 0 like an example of their own)."""
    rng = np.random.default_rng(seed)
    n_blocks = length // block_size
    if length % block_size:
        raise ValueError(f"length {length} must be a multiple of block_size {block_size}")
    positions = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        used = n_blocks - pad_blocks
        cuts = np.sort(rng.choice(np.arange(1, used), size=n_segments - 1, replace=False)) if n_segments > 1 else []
        bounds = [0, *[int(c) * block_size for c in cuts], used * block_size, length]
        for seg, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            if stop > start:
                positions[row, start:stop] = np.arange(stop - start)
                segments[row, start:stop] = seg if stop <= used * block_size else 0
    return positions, segments


def qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, head_dim: int, dtype):
    """Standard-normal q, k, v and an output cotangent, rounded to `dtype`."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    dout = jax.random.normal(kd, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, dout


def training_inputs(seed: int, *, mask: masks.MaskSpec, batch: int, length: int, n_segments: int,
                    pad_blocks: int = 0) -> masks.AttentionMask:
    """The mask of a training row: [xt; x0] (length 2L) for block_diffusion."""
    block = mask.block_size if mask.kind != "causal" else 1
    pos, seg = packed_rows(seed, batch, length, block, n_segments, pad_blocks)
    if mask.kind == "block_diffusion":
        pos, seg = np.concatenate([pos, pos], 1), np.concatenate([seg, seg], 1)
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    return masks.AttentionMask.self_attention(mask, pos, seg)


def decode_inputs(seed: int, *, batch: int, block_size: int, max_len: int) -> masks.AttentionMask:
    """The mask of one decoding step: row r's block at a ragged start (the first
    row's prefix empty, the last row's cache full), attending to the whole static cache."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, max_len // block_size, size=batch) * block_size
    starts[0] = 0
    starts[-1] = max_len - block_size
    q_pos = jnp.asarray(starts[:, None] + np.arange(block_size)[None], jnp.int32)
    kv_pos = jnp.asarray(np.broadcast_to(np.arange(max_len, dtype=np.int32), (batch, max_len)).copy())
    return masks.AttentionMask(masks.block_causal(block_size), q_pos, kv_pos)


def output_and_grads(fn, q, k, v, dout):
    """fn(q, k, v) and its vjp against dout, as float32 arrays."""
    out, vjp = jax.vjp(fn, q, k, v)
    return [x.astype(jnp.float32) for x in (out, *vjp(dout))]


def reference(q, k, v, dout, mask: masks.AttentionMask):
    """The XLA reference's output and gradients, computed in float32 from the (possibly
    rounded) inputs at full matmul precision."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    with jax.default_matmul_precision("highest"):
        return output_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), *f32)


def max_errors(got, want):
    """Max absolute difference per array pair."""
    return [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)]


def relative_errors(got, want):
    """Max absolute difference per pair over the reference's max magnitude (at least 1)."""
    return [err / max(float(jnp.max(jnp.abs(w))), 1.0) for err, w in zip(max_errors(got, want), want)]
