"""Block-sparse flash attention for GPUs: Pallas kernels lowered through Triton.

Forward, dQ and dK/dV kernels (FlashAttention-2 recurrences, base-2
exponentials) with the mask evaluated inside the kernel by `masks.mask_fn` on
the runtime positions and segment ids, so any mask kind and any packing work.
Each program walks only the non-empty key (or query) tiles listed by
`tiles.compact_split`: empty tiles are neither loaded nor computed, and tiles
the mask allows entirely come first and skip the in-kernel mask evaluation.

Grouped-query attention folds the query heads of a kv head into rows (see
`sdar_jax.ops.tiles`): K/V are indexed by kv head in the BlockSpecs and never
repeated, and dK/dV come out summed over the group directly.

Decoding against a KV cache reuses the tile helpers here in a split-K kernel
(`sdar_jax.ops.pallas_decode`); `flash_forward` serves long prefill queries.

Triton needs power-of-two tiles; sequences are padded to whole tiles with
segment ids that match nothing and the padding is cut off again.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sdar_jax.ops import masks, tiles

try:  # The Triton backend module; on a JAX without it only interpret mode runs.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the installed JAX
    plgpu = None

LOG2_E = math.log2(math.e)
# A finite "minus infinity": exp2(MASK_VALUE - m) underflows to 0 without NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two).

    Attributes:
      block_q: folded query rows per forward tile (a multiple of the GQA group).
      block_k: keys per forward tile.
      block_q_bwd, block_k_bwd: the same for the dQ and dK/dV kernels.
      num_warps: Triton warps per program (None: 4 for head_dim <= 64, else 8).
      num_stages: Triton software-pipelining stages.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            tiles.check_tile(f"BlockSizes.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one kernel call (hashable, for custom_vjp)."""

    spec: masks.MaskSpec
    blocks: BlockSizes
    groups: int
    noisy_len: int
    interpret: bool


def tile_dot(a: jnp.ndarray, b: jnp.ndarray, trans_a: bool = False, trans_b: bool = False) -> jnp.ndarray:
    """A float32-accumulating tile matmul that lowers through Triton."""
    if plgpu is not None:
        return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b).astype(jnp.float32)
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def tile_allowed(st: Static, rows, k_idx, q_pos, k_pos, q_seg, k_seg) -> jnp.ndarray:
    """The mask on a tile: rows [bq, 1] folded row ids, the rest [bq, 1] / [1, bk]."""
    return masks.mask_fn(
        st.spec, rows // st.groups, k_idx, q_pos, k_pos, q_seg, k_seg, noisy_len=st.noisy_len
    )


def compiler_params(blocks: BlockSizes, head_dim: int):
    if plgpu is None:
        return None
    warps = blocks.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


# ----------------------------------------------------------------------------- kernels


def _two_loops(body, full_ref, count_ref, init):
    """Runs body(j, carry, masked) over the listed tiles: full ones first, unmasked."""
    carry = lax.fori_loop(0, full_ref[0], functools.partial(body, masked=False), init)
    return lax.fori_loop(full_ref[0], count_ref[0], functools.partial(body, masked=True), carry)


def _fwd_kernel(
    ids_ref, full_ref, count_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
    o_ref, lse_ref, *, st: Static, scale: float,
):
    block_q, head_dim = q_ref.shape
    block_k = st.blocks.block_k
    rows = (pl.program_id(0) * block_q + jnp.arange(block_q))[:, None]
    q = q_ref[...]
    q_pos, q_seg = qpos_ref[...][:, None], qseg_ref[...][:, None]

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(ids_ref[j] * block_k, block_k)
        keys = pl.ds(start, block_k)
        s = tile_dot(q, k_ref[keys, :], trans_b=True) * (scale * LOG2_E)
        if masked:
            allowed = tile_allowed(
                st, rows, (start + jnp.arange(block_k))[None, :], q_pos, kpos_ref[keys][None, :],
                q_seg, kseg_ref[keys][None, :],
            )
            s = jnp.where(allowed, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(allowed, p, 0.0)
        correction = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + tile_dot(p.astype(v.dtype), v)
        return acc, m_new, l * correction + p.sum(axis=1)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = _two_loops(body, full_ref, count_ref, init)
    # A row that sees no key (padding) gets zeros, like the reference.
    visible = l > 0.0
    safe_l = jnp.where(visible, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(visible, m + jnp.log2(safe_l), 0.0)


def _dq_kernel(
    ids_ref, full_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    qpos_ref, qseg_ref, kpos_ref, kseg_ref, dq_ref, *, st: Static, scale: float,
):
    block_q, head_dim = q_ref.shape
    block_k = st.blocks.block_k_bwd
    rows = (pl.program_id(0) * block_q + jnp.arange(block_q))[:, None]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos, q_seg = qpos_ref[...][:, None], qseg_ref[...][:, None]

    def body(j, dq, masked):
        start = pl.multiple_of(ids_ref[j] * block_k, block_k)
        keys = pl.ds(start, block_k)
        k = k_ref[keys, :]
        p = jnp.exp2(tile_dot(q, k, trans_b=True) * (scale * LOG2_E) - lse)
        if masked:
            allowed = tile_allowed(
                st, rows, (start + jnp.arange(block_k))[None, :], q_pos, kpos_ref[keys][None, :],
                q_seg, kseg_ref[keys][None, :],
            )
            p = jnp.where(allowed, p, 0.0)
        ds = p * (tile_dot(do, v_ref[keys, :], trans_b=True) - delta)
        return dq + tile_dot(ds.astype(k.dtype), k)

    dq = _two_loops(body, full_ref, count_ref, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    ids_ref, full_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    qpos_ref, qseg_ref, kpos_ref, kseg_ref, dk_ref, dv_ref, *, st: Static, scale: float,
):
    block_k, head_dim = k_ref.shape
    block_q = st.blocks.block_q_bwd
    k, v = k_ref[...], v_ref[...]
    k_idx = (pl.program_id(0) * block_k + jnp.arange(block_k))[None, :]
    k_pos, k_seg = kpos_ref[...][None, :], kseg_ref[...][None, :]

    def body(i, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(ids_ref[i] * block_q, block_q)
        sel = pl.ds(start, block_q)
        q, do = q_ref[sel, :], do_ref[sel, :]
        p = jnp.exp2(tile_dot(q, k, trans_b=True) * (scale * LOG2_E) - lse_ref[sel][:, None])
        if masked:
            allowed = tile_allowed(
                st, (start + jnp.arange(block_q))[:, None], k_idx, qpos_ref[sel][:, None], k_pos,
                qseg_ref[sel][:, None], k_seg,
            )
            p = jnp.where(allowed, p, 0.0)
        dv = dv + tile_dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (tile_dot(do, v, trans_b=True) - delta_ref[sel][:, None])
        dk = dk + tile_dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = _two_loops(body, full_ref, count_ref, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _row_specs(block_rows: int, head_dim: int, row_block: bool):
    """BlockSpecs for folded-row arrays on a (tile, batch, kv_head) grid.

    With row_block the tile index picks a row tile; otherwise every program sees
    all rows (the dK/dV kernel loops over them).
    """
    if row_block:
        mat = pl.BlockSpec((None, None, block_rows, head_dim), lambda t, b, h: (b, h, t, 0))
        vec = pl.BlockSpec((None, None, block_rows), lambda t, b, h: (b, h, t))
        meta = pl.BlockSpec((None, block_rows), lambda t, b, h: (b, t))
    else:
        mat = pl.BlockSpec((None, None, block_rows, head_dim), lambda t, b, h: (b, h, 0, 0))
        vec = pl.BlockSpec((None, None, block_rows), lambda t, b, h: (b, h, 0))
        meta = pl.BlockSpec((None, block_rows), lambda t, b, h: (b, 0))
    return mat, vec, meta


def _key_specs(block_keys: int, head_dim: int, key_block: bool):
    """BlockSpecs for K/V [batch, kv_len, kv_heads, d] (indexed by kv head) and key metadata."""
    if key_block:
        mat = pl.BlockSpec((None, block_keys, None, head_dim), lambda t, b, h: (b, t, h, 0))
        meta = pl.BlockSpec((None, block_keys), lambda t, b, h: (b, t))
    else:
        mat = pl.BlockSpec((None, block_keys, None, head_dim), lambda t, b, h: (b, 0, h, 0))
        meta = pl.BlockSpec((None, block_keys), lambda t, b, h: (b, 0))
    return mat, meta


def _table_specs(n_cols: int):
    """Specs for (ids, full_counts, counts) of `tiles.compact_split`."""
    ids = pl.BlockSpec((None, None, n_cols), lambda t, b, h: (b, t, 0))
    count = pl.BlockSpec((None, 1), lambda t, b, h: (b, t))
    return [ids, count, count]


def _fwd_call(st, qf, k, v, rpos, rseg, kpos, kseg, table):
    batch, kv_heads, rows, head_dim = qf.shape
    kv_len = k.shape[1]
    bq = st.blocks.block_q
    q_mat, q_vec, q_meta = _row_specs(bq, head_dim, row_block=True)
    k_mat, k_meta = _key_specs(kv_len, head_dim, key_block=False)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, scale=head_dim**-0.5),
        grid=(rows // bq, batch, kv_heads),
        in_specs=[*_table_specs(table[0].shape[-1]), q_mat, k_mat, k_mat, q_meta, q_meta, k_meta, k_meta],
        out_specs=[q_mat, q_vec],
        out_shape=[
            jax.ShapeDtypeStruct(qf.shape, qf.dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32),
        ],
        compiler_params=compiler_params(st.blocks, head_dim),
        interpret=st.interpret,
        name="sdar_flash_fwd",
    )(*table, qf, k, v, rpos, rseg, kpos, kseg)


def _bwd_calls(st, qf, k, v, dof, lse, delta, rpos, rseg, kpos, kseg, table, table_t):
    batch, kv_heads, rows, head_dim = qf.shape
    kv_len = k.shape[1]
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    params = compiler_params(st.blocks, head_dim)
    scale = head_dim**-0.5

    q_mat, q_vec, q_meta = _row_specs(bq, head_dim, row_block=True)
    k_mat, k_meta = _key_specs(kv_len, head_dim, key_block=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, scale=scale),
        grid=(rows // bq, batch, kv_heads),
        in_specs=[*_table_specs(table[0].shape[-1]), q_mat, k_mat, k_mat, q_mat, q_vec, q_vec,
                  q_meta, q_meta, k_meta, k_meta],
        out_specs=q_mat,
        out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
        compiler_params=params,
        interpret=st.interpret,
        name="sdar_flash_dq",
    )(*table, qf, k, v, dof, lse, delta, rpos, rseg, kpos, kseg)

    q_mat, q_vec, q_meta = _row_specs(rows, head_dim, row_block=False)
    k_mat, k_meta = _key_specs(bk, head_dim, key_block=True)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, scale=scale),
        grid=(kv_len // bk, batch, kv_heads),
        in_specs=[*_table_specs(table_t[0].shape[-1]), q_mat, k_mat, k_mat, q_mat, q_vec, q_vec,
                  q_meta, q_meta, k_meta, k_meta],
        out_specs=[k_mat, k_mat],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=st.interpret,
        name="sdar_flash_dkv",
    )(*table_t, qf, k, v, dof, lse, delta, rpos, rseg, kpos, kseg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- public entry


def _prepare(st: Static, q, k, v, mask: masks.AttentionMask):
    """Pads to whole tiles and folds heads; returns the folded operands and row metadata."""
    q_len, kv_len = q.shape[1], k.shape[1]
    kv_heads = k.shape[2]
    row_tile = max(st.blocks.block_q, st.blocks.block_q_bwd)
    key_tile = max(st.blocks.block_k, st.blocks.block_k_bwd)
    q_pad = tiles.round_up(q_len, row_tile // st.groups)
    kv_pad = tiles.round_up(kv_len, key_tile)
    qseg = tiles.pad_axis(tiles.default_segments(mask.q_segment_ids, mask.q_positions), 1, q_pad,
                          tiles.PAD_Q_SEGMENT)
    kseg = tiles.pad_axis(tiles.default_segments(mask.kv_segment_ids, mask.kv_positions), 1, kv_pad,
                          tiles.PAD_KV_SEGMENT)
    qpos = tiles.pad_axis(mask.q_positions.astype(jnp.int32), 1, q_pad, 0)
    kpos = tiles.pad_axis(mask.kv_positions.astype(jnp.int32), 1, kv_pad, 0)
    qf = tiles.fold_heads(tiles.pad_axis(q, 1, q_pad, 0), kv_heads)
    k = tiles.pad_axis(k, 1, kv_pad, 0)
    v = tiles.pad_axis(v, 1, kv_pad, 0)
    rpos = jnp.repeat(qpos, st.groups, axis=1)
    rseg = jnp.repeat(qseg, st.groups, axis=1)
    return qf, k, v, (qpos, qseg, kpos, kseg), (rpos, rseg)


def _tile_masks(st: Static, meta, block_q: int, block_k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(nonempty, full), [batch, row tiles, key tiles] bool, for row tiles of block_q folded rows."""
    qpos, qseg, kpos, kseg = meta
    return tiles.tile_masks(
        st.spec, qpos, kpos, qseg, kseg,
        block_q=block_q // st.groups, block_k=block_k, noisy_len=st.noisy_len,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: Static, q, k, v, mask: masks.AttentionMask):
    return _flash_fwd(st, q, k, v, mask)[0]


def _flash_fwd(st, q, k, v, mask):
    q_len = q.shape[1]
    qf, kp, vp, meta, (rpos, rseg) = _prepare(st, q, k, v, mask)
    table = tiles.compact_split(*_tile_masks(st, meta, st.blocks.block_q, st.blocks.block_k))
    of, lse = _fwd_call(st, qf, kp, vp, rpos, rseg, meta[2], meta[3], table)
    out = tiles.unfold_heads(of, of.shape[2] // st.groups)[:, :q_len]
    return out, (q, k, v, mask, of, lse)


def _flash_bwd(st, residuals, dout):
    q, k, v, mask, of, lse = residuals
    q_len, kv_len, kv_heads = q.shape[1], k.shape[1], k.shape[2]
    qf, kp, vp, meta, (rpos, rseg) = _prepare(st, q, k, v, mask)
    dof = tiles.fold_heads(tiles.pad_axis(dout, 1, qf.shape[2] // st.groups, 0), kv_heads)
    delta = jnp.sum(of.astype(jnp.float32) * dof.astype(jnp.float32), axis=-1)
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    nonempty, full = _tile_masks(st, meta, bq, bk)
    table = tiles.compact_split(nonempty, full)  # key tiles per row tile (dQ)
    table_t = tiles.compact_split(jnp.swapaxes(nonempty, 1, 2), jnp.swapaxes(full, 1, 2))  # (dK/dV)
    dqf, dk, dv = _bwd_calls(st, qf, kp, vp, dof, lse, delta, rpos, rseg, meta[2], meta[3], table, table_t)
    dq = tiles.unfold_heads(dqf, qf.shape[2] // st.groups)[:, :q_len]
    return dq, dk[:, :kv_len], dv[:, :kv_len], None  # the mask ids have no gradient


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: masks.AttentionMask,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> jnp.ndarray:
    """Masked flash attention with tile skipping (differentiable in q, k, v).

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
      mask: the mask and its ids ([batch, q_len] / [batch, kv_len]; `sdar_jax.ops.masks`).
      block_sizes: tile sizes; block_q and block_q_bwd must be multiples of the
        group size heads // kv_heads.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype, equal to `xla_attention`.
    """
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    groups = heads // kv_heads
    for name in ("block_q", "block_q_bwd"):
        if getattr(block_sizes, name) % groups:
            raise ValueError(
                f"BlockSizes.{name} ({getattr(block_sizes, name)}) must be a multiple of the "
                f"query heads per kv head ({groups})"
            )
    if not interpret and head_dim & (head_dim - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head_dim, got {head_dim}")
    if mask.spec.kind == "block_diffusion" and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"block_diffusion is self-attention over [xt; x0]: q_len {q.shape[1]} != kv_len {k.shape[1]}"
        )
    st = Static(mask.spec, block_sizes, groups, q.shape[1] // 2, interpret)
    return _flash(st, q, k, v, mask)


@tiles.forward_only
def flash_forward(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: masks.AttentionMask,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> jnp.ndarray:
    """The forward kernel alone (no custom_vjp, no residuals); arguments as `flash_attention`.

    Used for decoding, where nothing is differentiated.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    groups = heads // kv_heads
    if block_sizes.block_q % groups:
        raise ValueError(
            f"BlockSizes.block_q ({block_sizes.block_q}) must be a multiple of the query heads "
            f"per kv head ({groups})"
        )
    forward_only = dataclasses.replace(
        block_sizes, block_q_bwd=block_sizes.block_q, block_k_bwd=block_sizes.block_k
    )
    st = Static(mask.spec, forward_only, groups, q.shape[1] // 2, interpret)
    return _flash_fwd(st, q, k, v, mask)[0]
