"""Attention kernels for TPUs.

Training (self-attention over one row) uses splash attention from
`jax.experimental.pallas.ops.tpu.splash_attention`: block-sparse forward, dQ
and dK/dV kernels with a mask object built from `masks.mask_fn`, evaluated
lazily inside the kernel and on the host for the per-tile sparsity tables.
Splash masks are functions of the row *indices*, not of runtime positions, so
this path requires canonical positions: within each half of the row (the whole
row for the AR kinds) every packed example starts on a block boundary and its
positions count 0, 1, 2, ... from its start. The data pipeline's packed rows
satisfy this (see the batch contract); segment ids carry the packing.
Exactly: for every segment id, position minus canonical index (the index
within its half for block_diffusion) must be one offset for all of the
segment's queries and keys, a multiple of the block size for the block kinds
(any offset for causal; bidirectional ignores positions). Then the index mask
equals `masks.mask_fn` on the runtime positions. Other positions are refused
rather than silently given another mask than the XLA and GPU paths
(`PositionsError`): with concrete positions before any kernel runs; under
`jit` (or `shard_map`) the same check runs on the device and a host callback,
taken only when a row fails it, raises `PositionsError` from the running
computation (surfacing as a `JaxRuntimeError` that carries the message; the
kernel itself may already have run, its results are never returned).

Attention against a KV cache (q_len != kv_len, queries at arbitrary absolute
positions per row) uses `cache_attention`, an own Pallas TPU kernel that
evaluates `masks.mask_fn` on the runtime positions and walks only the cache
tiles that `tiles.compact` lists as non-empty (scalar-prefetched; skipped grid
steps repeat the previous block index so no DMA is issued).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from sdar_jax.ops import masks, tiles

LANES = 128
SUBLANES = 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- splash (training)


class IndexMask(splash_mask._ComputableMask):  # noqa: SLF001 - the documented extension point
    """A splash mask computed from `masks.mask_fn` on row indices.

    Positions are the canonical ones: the index within its half for
    block_diffusion (the half is `noisy_len` long), the index otherwise.
    """

    def __init__(self, spec: masks.MaskSpec, length: int, noisy_len: int):
        self.spec = spec
        self.noisy_len = noisy_len

        def mask_function(q_ids, kv_ids):
            # Plain array arithmetic: NumPy on the host (the sparsity tables, built while a
            # jit is tracing, possibly under an abstract mesh), jnp inside the kernel.
            if spec.kind == "block_diffusion":
                q_pos = q_ids - noisy_len * (q_ids >= noisy_len)
                k_pos = kv_ids - noisy_len * (kv_ids >= noisy_len)
            else:
                q_pos, k_pos = q_ids, kv_ids
            return masks.mask_fn(
                spec, q_ids, kv_ids, q_pos, k_pos, q_ids * 0, kv_ids * 0, noisy_len=noisy_len
            )

        super().__init__(shape=(length, length), mask_function=mask_function)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexMask):
            return NotImplemented
        return (self.spec, self.shape, self.noisy_len) == (other.spec, other.shape, other.noisy_len)

    def __hash__(self) -> int:
        return hash((IndexMask, self.spec, self.shape, self.noisy_len))


class PositionsError(ValueError):
    """Positions or segment ids on which the splash index mask is not `mask_fn`."""


def canonical_rows(spec: masks.MaskSpec, q_positions, kv_positions, q_segment_ids, kv_segment_ids
                   ) -> jnp.ndarray:
    """[batch] bool: rows whose splash index mask equals `masks.mask_fn` on their positions.

    Args:
      spec: the mask; q_positions, q_segment_ids: [batch, length] int;
      kv_positions, kv_segment_ids: [batch, length] int (self-attention).

    Within every segment id the offset position - canonical index must be one
    value over the segment's queries and keys (a stable sort by segment id
    puts each segment's offsets side by side), and a multiple of the block
    size for the block kinds.
    """
    batch, length = q_positions.shape
    if spec.kind == "bidirectional":
        return jnp.ones((batch,), bool)
    index = jnp.arange(length, dtype=jnp.int32)
    if spec.kind == "block_diffusion":
        index = index - (length // 2) * (index >= length // 2)
    offsets = jnp.concatenate([q_positions - index, kv_positions - index], axis=1).astype(jnp.int32)
    segments = jnp.concatenate([q_segment_ids, kv_segment_ids], axis=1).astype(jnp.int32)
    order = jnp.argsort(segments, axis=1, stable=True)
    segments = jnp.take_along_axis(segments, order, axis=1)
    offsets = jnp.take_along_axis(offsets, order, axis=1)
    same = segments[:, 1:] == segments[:, :-1]
    ok = jnp.all(~same | (offsets[:, 1:] == offsets[:, :-1]), axis=1)
    if spec.kind != "causal":
        ok &= jnp.all(offsets % spec.block_size == 0, axis=1)
    return ok


def _positions_message(spec: masks.MaskSpec, ok: np.ndarray, where: str) -> str:
    bad = np.flatnonzero(~np.asarray(ok))
    half = " within its half" if spec.kind == "block_diffusion" else ""
    return (
        f"splash_attention: rows {bad[:8].tolist()} of {where} have positions the TPU kernel "
        f"cannot honour for the {spec.kind} mask (block {spec.block_size}): it computes the mask "
        f"from row indices, so each segment's positions must be its indices{half} minus one "
        f"offset{' that is a multiple of the block size' if spec.kind != 'causal' else ''} "
        "(e.g. every packed example restarting at 0 on a block boundary, row padding included); "
        "use attention_impl='xla' for other positions"
    )


def _raise_positions_error(spec: masks.MaskSpec, ok: np.ndarray) -> None:
    raise PositionsError(_positions_message(spec, ok, "this device's batch"))


def check_positions(spec: masks.MaskSpec, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                    *, interpret: bool) -> None:
    """Refuses positions the index mask would not honour (see the module docstring).

    Concrete arrays are checked now (raises PositionsError); traced ones on the
    device, with a host callback that raises only when a row fails. A host
    callback needs the backend the program runs on, so a compiled TPU kernel
    traced on another backend (ahead-of-time lowering for a TPU target) gets
    no run-time check; it cannot run there anyway.
    """
    ok = canonical_rows(spec, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    if not isinstance(ok, jax.core.Tracer):  # outside any trace: concrete values
        if not np.all(np.asarray(ok)):
            raise PositionsError(_positions_message(spec, ok, "the batch"))
        return
    if interpret or jax.default_backend() == "tpu":
        jax.lax.cond(jnp.all(ok), lambda: None,
                     lambda: jax.debug.callback(functools.partial(_raise_positions_error, spec), ok))


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Splash tile sizes (multiples of 128 on hardware; segment ids need block_kv % 128 == 0)."""

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int = 512
    block_kv_bwd: int = 512


def _splash_kernel(spec: masks.MaskSpec, length: int, noisy_len: int, heads: int,
                   blocks: SplashBlocks, interpret: bool):
    mask = splash_mask.MultiHeadMask([IndexMask(spec, length, noisy_len)] * heads)
    sizes = splash.BlockSizes(
        block_q=min(blocks.block_q, length), block_kv=min(blocks.block_kv, length),
        block_kv_compute=min(blocks.block_kv, length),
        block_q_dkv=min(blocks.block_q_bwd, length), block_kv_dkv=min(blocks.block_kv_bwd, length),
        block_kv_dkv_compute=min(blocks.block_kv_bwd, length),
        block_q_dq=min(blocks.block_q_bwd, length), block_kv_dq=min(blocks.block_kv_bwd, length),
    )
    # Built per call, inside the caller's trace: the host-side sparsity tables are cached by
    # splash itself (its mask processing is memoised on the hashable mask).
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: masks.MaskSpec,
    positions: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    kv_positions: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
    blocks: SplashBlocks = SplashBlocks(),
    interpret: bool = False,
) -> jnp.ndarray:
    """Self-attention of a training row through splash attention (differentiable).

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      mask: the mask description.
      positions: [batch, seq] int32 position ids; must be canonical (module
        docstring), else PositionsError.
      segment_ids: [batch, seq] int32 packing segments, or None.
      kv_positions, kv_segment_ids: the keys' (None: the same as the queries').
      blocks: tile sizes.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash_attention is self-attention: q_len {length} != kv_len {k.shape[1]}")
    segments = tiles.default_segments(segment_ids, positions)
    kv_segments = segments if kv_segment_ids is None else tiles.default_segments(kv_segment_ids, positions)
    check_positions(mask, positions, positions if kv_positions is None else kv_positions, segments,
                    kv_segments, interpret=interpret)
    tile = max(blocks.block_q, blocks.block_kv, blocks.block_q_bwd, blocks.block_kv_bwd)
    padded = tiles.round_up(length, min(tile, tiles.round_up(length, LANES)))
    q_seg = tiles.pad_axis(segments, 1, padded, tiles.PAD_Q_SEGMENT)
    kv_seg = tiles.pad_axis(kv_segments, 1, padded, tiles.PAD_KV_SEGMENT)
    kernel = _splash_kernel(mask, padded, length // 2, heads, blocks, interpret)

    def heads_first(x):  # [batch, seq, h, d] -> [batch, h, padded, d]
        return jnp.swapaxes(tiles.pad_axis(x, 1, padded, 0), 1, 2)

    scaled = (q * jnp.asarray(head_dim**-0.5, q.dtype))
    out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v),
                           splash.SegmentIds(q=q_seg, kv=kv_seg))
    return jnp.swapaxes(out, 1, 2)[:, :length]


# ----------------------------------------------------------------------------- cache attention


def _cache_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, qidx_ref, qpos_ref, qseg_ref,
                  kpos_ref, kseg_ref, o_ref, acc_ref, m_ref, l_ref, *,
                  spec: masks.MaskSpec, kv_heads: int, head_dim: int, noisy_len: int):
    """One (batch row, cache step): all kv heads of one cache tile against all folded rows.

    q_ref [kv_heads, rows, d]; k_ref, v_ref [block_k, kv_heads * d] (lane-aligned head
    slices); q metadata [rows, 1]; key metadata [1, block_k]; scratch per kv head.
    """
    b, j = pl.program_id(0), pl.program_id(1)
    block_k = k_ref.shape[0]
    rows = q_ref.shape[1]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when(j < counts_ref[b])
    def _step():
        start = ids_ref[b, j] * block_k
        k_idx = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        allowed = masks.mask_fn(
            spec, qidx_ref[...], k_idx, qpos_ref[...], kpos_ref[...], qseg_ref[...], kseg_ref[...],
            noisy_len=noisy_len,
        )
        allowed = jnp.broadcast_to(allowed, (rows, block_k))
        for h in range(kv_heads):
            heads = slice(h * head_dim, (h + 1) * head_dim)
            q = q_ref[h]
            k = k_ref[:, heads]
            v = v_ref[:, heads]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * (head_dim**-0.5)
            s = jnp.where(allowed, s, MASK_VALUE)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
            correction = jnp.exp(m_prev - m_new)
            l_ref[h] = l_ref[h] * correction + p.sum(axis=1, keepdims=True)
            acc_ref[h] = acc_ref[h] * correction + jnp.dot(
                p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_ref[h] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0.0, l, 1.0)).astype(o_ref.dtype)


@tiles.forward_only
def cache_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: masks.AttentionMask,
    *,
    block_k: int = 512,
    interpret: bool = False,
) -> jnp.ndarray:
    """Few queries against a long KV cache, skipping cache tiles no query sees (forward only).

    Args:
      q: [batch, q_len, heads, head_dim], q_len small (a decoding block or a prompt).
      k, v: [batch, kv_len, kv_heads, head_dim] (the cache as the model stores it).
      mask: the mask, evaluated on its runtime ids: q_positions [batch, q_len]
        int32 absolute positions, kv_positions [batch, kv_len], optional int32 segments.
      block_k: cache tile length (a multiple of 128 on hardware).
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    masks.require_decode_mask(mask.spec, "cache_attention")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    rows = tiles.round_up(q_len * groups, SUBLANES)
    kv_pad = tiles.round_up(kv_len, block_k)
    qpos, qseg, kpos, kseg, nonempty = tiles.cache_tiles(mask, kv_pad, block_k)
    ids, counts = tiles.compact(nonempty[:, 0])  # one query tile per row: [batch, n_tiles], [batch]

    def row_meta(x, fill):  # [batch, q_len] -> [batch, rows, 1], row = i * groups + g
        return tiles.pad_axis(jnp.repeat(x, groups, axis=1), 1, rows, fill)[..., None]

    qidx = row_meta(jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len)), 0)
    qf = tiles.pad_axis(tiles.fold_heads(q, kv_heads), 2, rows, 0)  # [batch, kv_heads, rows, d]
    kf = tiles.pad_axis(k, 1, kv_pad, 0).reshape(batch, kv_pad, kv_heads * head_dim)
    vf = tiles.pad_axis(v, 1, kv_pad, 0).reshape(batch, kv_pad, kv_heads * head_dim)

    q_spec = pl.BlockSpec((None, kv_heads, rows, head_dim), lambda b, j, ids, n: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, block_k, kv_heads * head_dim), lambda b, j, ids, n: (b, ids[b, j], 0))
    q_meta = pl.BlockSpec((None, rows, 1), lambda b, j, ids, n: (b, 0, 0))
    k_meta = pl.BlockSpec((None, 1, block_k), lambda b, j, ids, n: (b, 0, ids[b, j]))
    kernel = functools.partial(_cache_kernel, spec=mask.spec, kv_heads=kv_heads, head_dim=head_dim,
                               noisy_len=q_len // 2)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_pad // block_k),
            in_specs=[q_spec, kv_spec, kv_spec, q_meta, q_meta, q_meta, k_meta, k_meta],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32),
                pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qf.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="sdar_cache_attention",
    )(ids, counts, qf, kf, vf, qidx, row_meta(qpos, 0), row_meta(qseg, tiles.PAD_Q_SEGMENT),
      kpos[:, None, :], kseg[:, None, :])
    return tiles.unfold_heads(out[:, :, : q_len * groups], q_len)

