"""Decode attention on GPUs: a block's few queries against a long KV cache.

Decoding a block of B tokens attends from `[batch, B, heads, d]` queries to the
whole static cache `[batch, max_len, kv_heads, d]` with kv positions
`0..max_len-1` and a block_causal mask, so each row sees its own visible prefix
(a different length per row) plus its block. The mask is evaluated by
`masks.mask_fn` on the runtime positions, and cache tiles no query of a row can
see are skipped (the tile table of `sdar_jax.ops.tiles`), so a row pays for its
visible prefix, not for max_len.

GPU: the `groups` query heads of a kv head fold into one row tile (B * groups
rows), and the row's non-empty cache tiles are split into `splits` contiguous
chunks handled by parallel programs (flash-decoding), whose partial results are
merged in XLA. The TPU counterpart is `pallas_tpu.cache_attention`; the
dispatcher (`sdar_jax.ops.attention`) picks between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sdar_jax.ops import masks, pallas_gpu, tiles

MAX_DECODE_ROWS = 64  # larger query tiles (prompt prefill) go through the tiled forward kernel


def _decode_kernel(ids_ref, count_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                   acc_ref, m_ref, l_ref, *, st: pallas_gpu.Static, splits: int, scale: float):
    rows, head_dim = q_ref.shape
    block_k = st.blocks.block_k
    split = pl.program_id(0)
    count = count_ref[0]
    chunk = (count + splits - 1) // splits
    first = split * chunk
    last = jnp.minimum(first + chunk, count)
    row_ids = jnp.arange(rows)[:, None]
    q = q_ref[...]
    q_pos, q_seg = qpos_ref[...][:, None], qseg_ref[...][:, None]

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(ids_ref[j] * block_k, block_k)
        keys = pl.ds(start, block_k)
        s = pallas_gpu.tile_dot(q, k_ref[keys, :], trans_b=True) * (scale * pallas_gpu.LOG2_E)
        allowed = pallas_gpu.tile_allowed(
            st, row_ids, (start + jnp.arange(block_k))[None, :], q_pos, kpos_ref[keys][None, :],
            q_seg, kseg_ref[keys][None, :],
        )
        s = jnp.where(allowed, s, pallas_gpu.MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(allowed, jnp.exp2(s - m_new[:, None]), 0.0)
        correction = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + pallas_gpu.tile_dot(p.astype(v.dtype), v)
        return acc, m_new, l * correction + p.sum(axis=1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), pallas_gpu.MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _merge(acc, m, l):
    """Combines per-split partial softmax sums: acc [splits, ..., d], m, l [splits, ...]."""
    m_max = m.max(axis=0)
    weight = jnp.exp2(m - m_max)
    total = (l * weight).sum(axis=0)
    out = (acc * weight[..., None]).sum(axis=0)
    return out / jnp.where(total > 0.0, total, 1.0)[..., None]


def _gpu_decode(q, k, v, mask: masks.AttentionMask, *, block_k: int, splits: int | None,
                interpret: bool):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    rows = max(16, pl.next_power_of_2(q_len * groups))
    if rows > MAX_DECODE_ROWS:
        return pallas_gpu.flash_forward(
            q, k, v, mask,
            block_sizes=pallas_gpu.BlockSizes(block_q=MAX_DECODE_ROWS, block_k=block_k),
            interpret=interpret,
        )
    kv_pad = tiles.round_up(kv_len, block_k)
    n_tiles = kv_pad // block_k
    if splits is None:  # enough programs to fill a large GPU twice over
        splits = max(1, min(n_tiles, 256 // (batch * kv_heads)))
    st = pallas_gpu.Static(mask.spec, pallas_gpu.BlockSizes(block_q=rows, block_k=block_k),
                            groups, q_len // 2, interpret)
    qpos, qseg, kpos, kseg, nonempty = tiles.cache_tiles(mask, kv_pad, block_k)
    ids, counts = tiles.compact(nonempty)  # [batch, 1, n_tiles], [batch, 1]

    def row_meta(x, fill):  # [batch, q_len] -> [batch, rows]
        return tiles.pad_axis(jnp.repeat(x, groups, axis=1), 1, rows, fill)

    qf = tiles.pad_axis(tiles.fold_heads(q, kv_heads), 2, rows, 0)
    k = tiles.pad_axis(k, 1, kv_pad, 0)
    v = tiles.pad_axis(v, 1, kv_pad, 0)

    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda s, b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda s, b, h: (b, 0, h, 0))
    q_meta = pl.BlockSpec((None, rows), lambda s, b, h: (b, 0))
    k_meta = pl.BlockSpec((None, kv_pad), lambda s, b, h: (b, 0))
    ids_spec = pl.BlockSpec((None, None, n_tiles), lambda s, b, h: (b, 0, 0))
    count_spec = pl.BlockSpec((None, 1), lambda s, b, h: (b, 0))
    acc_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda s, b, h: (s, b, h, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda s, b, h: (s, b, h, 0))
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, st=st, splits=splits, scale=head_dim**-0.5),
        grid=(splits, batch, kv_heads),
        in_specs=[ids_spec, count_spec, q_spec, kv_spec, kv_spec, q_meta, q_meta, k_meta, k_meta],
        out_specs=[acc_spec, stat_spec, stat_spec],
        out_shape=[
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32),
        ],
        compiler_params=pallas_gpu.compiler_params(st.blocks, head_dim),
        interpret=interpret,
        name="sdar_decode_attention",
    )(ids, counts, qf, k, v, row_meta(qpos, 0), row_meta(qseg, tiles.PAD_Q_SEGMENT), kpos, kseg)
    out = _merge(acc, m, l).astype(q.dtype)[:, :, : q_len * groups]
    return tiles.unfold_heads(out, q_len)


@tiles.forward_only
def decode_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: masks.AttentionMask,
    *,
    block_k: int = 64,
    splits: int | None = None,
    interpret: bool = False,
) -> jnp.ndarray:
    """Attention of a few queries to a KV cache, skipping cache tiles no query sees.

    Args:
      q: [batch, q_len, heads, head_dim]: the block being decoded (q_len = B).
      k, v: [batch, max_len, kv_heads, head_dim]: the cache.
      mask: usually block_causal(B) (causal for AR decoding) over absolute positions;
        q_positions [batch, q_len] int32 (rows may differ), kv_positions
        [batch, max_len] int32, usually arange(max_len); optional int32 segments.
      block_k: cache tile length.
      splits: parallel chunks per row (default: fill the device).
      interpret: run in the Pallas interpreter.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Forward only (see `tiles.forward_only`).
    """
    masks.require_decode_mask(mask.spec, "decode_attention")
    return _gpu_decode(q, k, v, mask, block_k=block_k, splits=splits, interpret=interpret)
