"""Grouped matmul over rows sorted by group: `out[rows of g] = x[rows of g] @ w[g]` (Flax-free).

Two implementations of the same function, with the semantics of
`jax.lax.ragged_dot` (rows past `sum(group_sizes)` come out as zeros):

- "ragged_dot": `jax.lax.ragged_dot`. TPUs run it as a native grouped matmul
  and XLA:GPU hands it to cuDNN where supported; XLA:CPU (and XLA:GPU's
  fallback) expand it into a zero-masked batched matmul over *all* groups,
  i.e. num_groups times the work of the grouped product.
- "tiled": a megablox-style loop in plain XLA. Rows are cut into tiles of
  `tile` rows; a work item is one (tile, group) pair that overlaps, and there
  are at most `ceil(M / tile) + num_groups - 1` of them (a group boundary
  inside a tile adds one item). Each item is one `[tile, K] @ [K, N]` matmul
  whose rows outside the group are masked; the loop runs only the items
  that exist, so it does about `sum(group_sizes) + num_groups * tile` rows
  of work (padding rows past the groups cost nothing). The backward pass is the same loop
  with transposed weights for dx and a transposed grouped matmul (one
  `[K, tile] @ [tile, N]` per item, accumulated into its group) for dw.

`impl="auto"` picks ragged_dot on TPU and GPU and the tiled loop elsewhere
(resolved by `sdar_jax.ops.platform.resolve`, as attention's "auto" is).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdar_jax.ops import platform

IMPLS = ("auto", "ragged_dot", "tiled")
DEFAULT_TILE = 128


class _WorkItems(NamedTuple):
    """The (tile, group) pairs of a sorted row layout, in group order.

    group, tile: [W] int32 (W = num_tiles + num_groups - 1, a static bound);
    valid: [W] bool, False for the unused items at the end;
    count: [] int32, the number of valid items (the loops run only these);
    starts, ends: [num_groups] int32 row ranges of the groups.
    """

    group: jnp.ndarray
    tile: jnp.ndarray
    valid: jnp.ndarray
    count: jnp.ndarray
    starts: jnp.ndarray
    ends: jnp.ndarray


def _work_items(group_sizes: jnp.ndarray, num_tiles: int, tile: int) -> _WorkItems:
    num_groups = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first_tile = starts // tile
    tiles_per_group = jnp.where(group_sizes > 0, (ends - 1) // tile - first_tile + 1, 0)
    item_ends = jnp.cumsum(tiles_per_group)
    item = jnp.arange(num_tiles + num_groups - 1, dtype=jnp.int32)
    group = jnp.searchsorted(item_ends, item, side="right").astype(jnp.int32)
    valid = group < num_groups
    group = jnp.minimum(group, num_groups - 1)
    tile_index = first_tile[group] + item - (item_ends - tiles_per_group)[group]
    tile_index = jnp.where(valid, tile_index, 0)
    return _WorkItems(group, tile_index, valid, item_ends[-1], starts, ends)


def _item_rows(items: _WorkItems, i: jnp.ndarray, tile: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(group, first row of the tile, [tile] bool mask of the group's rows) of item i."""
    g, t = items.group[i], items.tile[i]
    row0 = t * tile
    rows = row0 + jnp.arange(tile, dtype=jnp.int32)
    mask = items.valid[i] & (rows >= items.starts[g]) & (rows < items.ends[g])
    return g, row0, mask


def _pad_rows(a: jnp.ndarray, tile: int) -> jnp.ndarray:
    return jnp.pad(a, ((0, -a.shape[0] % tile), (0, 0)))


def _varying_axes(a: jnp.ndarray) -> frozenset[str]:
    """The manual mesh axes `a` varies over inside shard_map (empty outside).
    jax 0.10 calls them `manual_axis_type.varying`, later versions `vma`."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def _zeros_varying_like(shape: tuple[int, ...], *operands: jnp.ndarray) -> jnp.ndarray:
    """float32 zeros for a loop carry that varies over the same manual mesh axes
    as `operands` (inside shard_map a loop carry must keep its type)."""
    zeros = jnp.zeros(shape, jnp.float32)
    axes = frozenset().union(*(_varying_axes(a) for a in operands))
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _gmm(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, tile: int) -> jnp.ndarray:
    """[M, K] x [G, K, N] -> [M, N], tiled forward."""
    num_rows = x.shape[0]
    x = _pad_rows(x, tile)
    items = _work_items(group_sizes, x.shape[0] // tile, tile)

    def body(i, out):
        g, row0, mask = _item_rows(items, i, tile)
        x_tile = jax.lax.dynamic_slice_in_dim(x, row0, tile)
        y = jnp.dot(x_tile, w[g], preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_slice_in_dim(out, row0, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, current + jnp.where(mask[:, None], y, 0.0), row0, 0)

    out = _zeros_varying_like((x.shape[0], w.shape[-1]), x, w, group_sizes)
    out = jax.lax.fori_loop(0, items.count, body, out)
    return out[:num_rows].astype(x.dtype)


def _tgmm(x: jnp.ndarray, dy: jnp.ndarray, group_sizes: jnp.ndarray, tile: int) -> jnp.ndarray:
    """Per-group x^T dy: [M, K] x [M, N] -> [G, K, N] (the weight gradient)."""
    num_groups = group_sizes.shape[0]
    x, dy = _pad_rows(x, tile), _pad_rows(dy, tile)
    items = _work_items(group_sizes, x.shape[0] // tile, tile)

    def body(i, dw):
        g, row0, mask = _item_rows(items, i, tile)
        x_tile = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(x, row0, tile), 0)
        dy_tile = jax.lax.dynamic_slice_in_dim(dy, row0, tile)
        update = dw[g] + jnp.dot(x_tile.T, dy_tile, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, update, g, 0)

    dw = _zeros_varying_like((num_groups, x.shape[1], dy.shape[1]), x, dy, group_sizes)
    return jax.lax.fori_loop(0, items.count, body, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x: jnp.ndarray, w: jnp.ndarray, group_sizes: jnp.ndarray, tile: int) -> jnp.ndarray:
    return _gmm(x, w, group_sizes, tile)


def _tiled_fwd(x, w, group_sizes, tile):
    return _gmm(x, w, group_sizes, tile), (x, w, group_sizes)


def _sum_to_varying_of(cotangent: jnp.ndarray, primal: jnp.ndarray) -> jnp.ndarray:
    """psum a cotangent over the manual axes its primal does not vary over
    (the transpose of the implicit broadcast of that primal inside shard_map)."""
    extra = _varying_axes(cotangent) - _varying_axes(primal)
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _tiled_bwd(tile, residuals, dy):
    x, w, group_sizes = residuals
    dx = _gmm(dy, jnp.swapaxes(w, 1, 2), group_sizes, tile).astype(x.dtype)
    dw = _tgmm(x, dy, group_sizes, tile).astype(w.dtype)
    return _sum_to_varying_of(dx, x), _sum_to_varying_of(dw, w), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def resolve_impl(impl: str) -> str:
    """'auto' -> 'ragged_dot' on TPU and GPU, 'tiled' on CPU."""
    return platform.resolve(impl, IMPLS, accelerated="ragged_dot", portable="tiled", what="grouped matmul")


def grouped_matmul(
    x: jnp.ndarray,
    w: jnp.ndarray,
    group_sizes: jnp.ndarray,
    *,
    impl: str = "auto",
    tile: int = DEFAULT_TILE,
) -> jnp.ndarray:
    """Rows grouped by expert times that expert's matrix.

    Args:
      x: [M, K]; the first group_sizes[0] rows belong to group 0, and so on.
      w: [G, K, N], cast to x's dtype.
      group_sizes: [G] int32, summing to at most M (later rows give zeros).
      impl: "auto", "ragged_dot" or "tiled" (see the module doc).
      tile: rows per tile of the tiled implementation.

    Returns:
      [M, N] in x's dtype (accumulated in float32).
    """
    x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
    if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],) or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"grouped_matmul expects x [M, K], w [G, K, N], group_sizes [G]; got x {x.shape}, "
            f"w {w.shape}, group_sizes {group_sizes.shape}"
        )
    w = w.astype(x.dtype)
    if resolve_impl(impl) == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    return _tiled(x, w, group_sizes.astype(jnp.int32), tile)
