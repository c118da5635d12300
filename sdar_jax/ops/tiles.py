"""Block sparsity for the attention kernels, derived from `masks.mask_fn`.

The kernels tile the (query row, key) plane. A tile is *empty* when the mask
allows no pair inside it; empty tiles are never loaded or computed. The tile
table is computed from the same `mask_fn` the dense reference uses, evaluated
on the runtime positions and segment ids (an `any` reduction that XLA fuses,
so the dense mask is never materialised), then compacted into per-row-tile
lists of non-empty key tiles that the kernels loop over.

Grouped-query attention is handled by *folding*: the `groups` query heads that
share a kv head become consecutive rows of one matrix, `[batch, kv_heads,
q_len * groups, head_dim]`, row `i * groups + g` holding query `i` of head
`kv_head * groups + g`. Each K/V tile is then loaded once for all of its query
heads, and the key-tile loop of the dK/dV kernel already sums over them.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.ops import masks

# Segment ids given to padding rows and padding keys: they match nothing.
PAD_Q_SEGMENT = -1
PAD_KV_SEGMENT = -2


def tile_masks(
    spec: masks.MaskSpec,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    *,
    block_q: int,
    block_k: int,
    noisy_len: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Which (query tile, key tile) pairs allow some pair (non-empty) and every pair (full).

    Args:
      spec: the mask description.
      q_positions, q_segment_ids: [batch, q_len] int32; q_len % block_q == 0.
      kv_positions, kv_segment_ids: [batch, kv_len] int32; kv_len % block_k == 0.
      block_q, block_k: tile sizes in queries and keys.
      noisy_len: the noisy half's length for block_diffusion (ignored otherwise).

    Returns:
      (nonempty, full), each [batch, q_len // block_q, kv_len // block_k] bool.
      Full tiles need no masking inside the kernel.
    """
    batch, q_len = q_positions.shape
    kv_len = kv_positions.shape[1]
    if q_len % block_q or kv_len % block_k:
        raise ValueError(
            f"tile_mask: q_len {q_len} / kv_len {kv_len} must be multiples of block_q "
            f"{block_q} / block_k {block_k}"
        )
    nq, nk = q_len // block_q, kv_len // block_k

    def q_side(x):  # [batch, nq, block_q, 1, 1]
        return x.reshape(batch, nq, block_q, 1, 1)

    def k_side(x):  # [batch, 1, 1, nk, block_k]
        return x.reshape(batch, 1, 1, nk, block_k)

    q_idx = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    k_idx = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    allowed = masks.mask_fn(
        spec,
        q_side(q_idx), k_side(k_idx),
        q_side(q_positions), k_side(kv_positions),
        q_side(q_segment_ids), k_side(kv_segment_ids),
        noisy_len=noisy_len,
    )
    return allowed.any(axis=(2, 4)), allowed.all(axis=(2, 4))


def tile_mask(spec: masks.MaskSpec, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
              block_q: int, block_k: int, noisy_len: int) -> jnp.ndarray:
    """The non-empty half of `tile_masks`: [batch, q tiles, key tiles] bool."""
    return tile_masks(spec, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                      block_q=block_q, block_k=block_k, noisy_len=noisy_len)[0]


class CacheTiles(NamedTuple):
    """The ids of a few queries against a cache padded to whole tiles, and its tile table.

    qpos, qseg: [batch, q_len] int32; kpos, kseg: [batch, kv_pad] int32 (padding keys
    in segment PAD_KV_SEGMENT); nonempty: [batch, 1, kv_pad // block_k] bool (all the
    queries form one row tile).
    """

    qpos: jnp.ndarray
    qseg: jnp.ndarray
    kpos: jnp.ndarray
    kseg: jnp.ndarray
    nonempty: jnp.ndarray


def cache_tiles(mask: masks.AttentionMask, kv_pad: int, block_k: int) -> CacheTiles:
    """The decode kernels' metadata: mask ids padded to `kv_pad` keys, and the cache tiles
    of `block_k` keys that any query of a row can see."""
    q_len = mask.q_positions.shape[1]
    qseg = default_segments(mask.q_segment_ids, mask.q_positions)
    kseg = pad_axis(default_segments(mask.kv_segment_ids, mask.kv_positions), 1, kv_pad, PAD_KV_SEGMENT)
    qpos = mask.q_positions.astype(jnp.int32)
    kpos = pad_axis(mask.kv_positions.astype(jnp.int32), 1, kv_pad, 0)
    nonempty = tile_mask(mask.spec, qpos, kpos, qseg, kseg, block_q=q_len, block_k=block_k,
                         noisy_len=q_len // 2)
    return CacheTiles(qpos, qseg, kpos, kseg, nonempty)


def _compact(rank: jnp.ndarray, counts: jnp.ndarray) -> jnp.ndarray:
    """Column indices sorted by `rank` (stable), padded past `counts` with the last listed one."""
    cols = rank.shape[-1]
    order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    return jnp.where(jnp.arange(cols, dtype=jnp.int32) < counts[..., None], order, last)


def compact(nonempty: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-row lists of the non-empty column tiles.

    Args:
      nonempty: [batch, rows, cols] bool tile mask.

    Returns:
      ids: [batch, rows, cols] int32; the first `counts` entries of each list are
        the non-empty column indices in ascending order; the rest repeat the last
        one (0 for an empty list), so a pipelined kernel that keeps fetching
        `ids[j]` past the count asks for the block it already holds.
      counts: [batch, rows] int32.
    """
    counts = nonempty.sum(axis=-1, dtype=jnp.int32)
    return _compact(~nonempty, counts), counts


def compact_split(nonempty: jnp.ndarray, full: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Like `compact`, with the full tiles listed first.

    Args:
      nonempty, full: [batch, rows, cols] bool (full implies non-empty).

    Returns:
      ids: [batch, rows, cols] int32: full tiles (ascending), then partial ones
        (ascending), then padding as in `compact`.
      full_counts: [batch, rows] int32, how many leading entries need no mask.
      counts: [batch, rows] int32, how many entries are non-empty.
    """
    full = full & nonempty
    rank = jnp.where(full, 0, jnp.where(nonempty, 1, 2)).astype(jnp.int32)
    counts = nonempty.sum(axis=-1, dtype=jnp.int32)
    return _compact(rank, counts), full.sum(axis=-1, dtype=jnp.int32), counts


def fold_heads(x: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """[batch, len, heads, d] -> [batch, kv_heads, len * groups, d] (row = i * groups + g)."""
    batch, length, heads, dim = x.shape
    groups = heads // kv_heads
    x = x.reshape(batch, length, kv_heads, groups, dim)
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(batch, kv_heads, length * groups, dim)


def unfold_heads(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """Inverse of `fold_heads`: [batch, kv_heads, len * groups, d] -> [batch, len, heads, d]."""
    batch, kv_heads, rows, dim = x.shape
    groups = rows // length
    x = x.reshape(batch, kv_heads, length, groups, dim)
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(batch, length, kv_heads * groups, dim)


def pad_axis(x: jnp.ndarray, axis: int, size: int, value) -> jnp.ndarray:
    """Pads `x` along `axis` up to `size` with `value`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_segments(segment_ids: jnp.ndarray | None, like: jnp.ndarray) -> jnp.ndarray:
    """The given segment ids, or a single segment (zeros) shaped like `like`."""
    if segment_ids is None:
        return jnp.zeros(like.shape, jnp.int32)
    return segment_ids.astype(jnp.int32)


def check_tile(name: str, size: int) -> None:
    if size < 1 or size & (size - 1):
        raise ValueError(f"{name} must be a positive power of two, got {size}")



def forward_only(fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
    """Wraps a forward-only kernel entry point in a `jax.custom_vjp`.

    JAX never dead-code-eliminates a bare `pallas_call` (a kernel may write
    through aliased buffers), and flax's `nn.scan` (0.12.12; 0.12.8 used
    partial evaluation instead) proves its broadcast outputs loop-invariant by
    tracing the layer body and dead-code-eliminating it: a bare kernel fed by
    the carry then reads as a data dependency and the model does not trace. A custom_vjp call is removed when
    its outputs are unused. Differentiating through the wrapped function raises.

    Positional arguments and keyword values that are arrays (or pytrees of
    arrays, such as a `masks.AttentionMask`) are traced; every other keyword
    argument is static.
    """

    def traced(value) -> bool:
        leaves = jax.tree.leaves(value)
        return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        arrays = {k: v for k, v in kwargs.items() if traced(v)}
        static = {k: v for k, v in kwargs.items() if k not in arrays}

        @jax.custom_vjp
        def run(args, arrays):
            return fn(*args, **arrays, **static)

        def run_fwd(args, arrays):
            return run(args, arrays), None

        def run_bwd(residuals, cotangent):
            raise TypeError(f"{fn.__name__} is a forward-only kernel and cannot be differentiated")

        run.defvjp(run_fwd, run_bwd)
        return run(args, arrays)

    return call
