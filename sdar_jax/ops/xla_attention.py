"""The attention reference in plain XLA; every kernel is tested against it.

A dense mask from `AttentionMask.dense`, einsum scores and a float32 softmax,
with grouped-query attention done by grouping query heads (K/V are never
repeated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdar_jax.ops.masks import AttentionMask


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask) -> jnp.ndarray:
    """Masked multi-head attention with grouped K/V heads.

    Args:
      q: [batch, q_len, heads, head_dim] queries (already rotated and normed).
      k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
      mask: the mask and its ids ([batch, q_len] / [batch, kv_len]).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; softmax scale head_dim**-0.5.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    allowed = mask.dense()
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query with no visible key (only possible for padding) gets zeros, not a uniform mix.
    probs = jnp.where(allowed[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, head_dim)
