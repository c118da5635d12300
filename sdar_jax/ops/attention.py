"""The single attention entry point.

`attention` dispatches to an implementation by name. "xla" is the plain
reference: a dense mask from `masks.dense_mask`, einsum scores and a float32
softmax, with grouped-query attention done by grouping query heads (K/V are
never repeated). Kernels register further implementations and are tested
against it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sdar_jax.ops import masks

AttentionFn = Callable[..., jnp.ndarray]
_IMPLEMENTATIONS: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator registering an attention implementation under `name`."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        _IMPLEMENTATIONS[name] = fn
        return fn

    return wrap


def available() -> tuple[str, ...]:
    return tuple(sorted(_IMPLEMENTATIONS))


def _check_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v of rank 4 [batch, seq, heads, head_dim]; got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attention: k shape {k.shape} != v shape {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})"
        )


@register("xla")
def xla_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: masks.MaskSpec,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    q_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Reference masked attention; see `attention` for the arguments."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    allowed = masks.dense_mask(mask, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query with no visible key (only possible for padding) gets zeros, not a uniform mix.
    probs = jnp.where(allowed[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, head_dim)


@register("pallas")
def pallas_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, **kwargs) -> jnp.ndarray:
    """Block-sparse Pallas kernels, lowered for the current backend (interpreted on CPU).

    See `sdar_jax.ops.pallas_attention`; imported lazily so the XLA path never
    loads the kernel modules.
    """
    from sdar_jax.ops import pallas_attention as kernels

    return kernels.pallas_attention(q, k, v, **kwargs)


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: masks.MaskSpec,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    q_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
    impl: str = "xla",
) -> jnp.ndarray:
    """Masked multi-head attention with grouped K/V heads.

    Args:
      q: [batch, q_len, heads, head_dim] queries (already rotated and normed).
      k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
      mask: the mask description (see `sdar_jax.ops.masks`).
      q_positions: [batch, q_len] int32 position ids.
      kv_positions: [batch, kv_len] int32 position ids.
      q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] int32
        packing segments, or None.
      impl: implementation name ("xla", or a registered kernel).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; softmax scale head_dim**-0.5.
    """
    _check_shapes(q, k, v)
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is unknown; available: {available()}")
    return _IMPLEMENTATIONS[impl](
        q, k, v,
        mask=mask,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
