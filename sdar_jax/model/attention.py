"""Grouped-query self-attention with q/k RMSNorm before RoPE, and an optional KV cache."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from sdar_jax.config import ModelConfig
from sdar_jax.model.layers import RMSNorm, dtype_of, projection, rotary_embedding
from sdar_jax.ops import attention as attention_ops
from sdar_jax.ops.masks import AttentionMask, MaskSpec


@flax.struct.dataclass
class LayerCache:
    """One layer's view of the KV cache.

    k, v: [batch, max_len, kv_heads, head_dim] when `layer` is None (the
      layer's own arrays, as a layer scan hands them out), or every layer's
      [layers, batch, max_len, kv_heads, head_dim] with `layer` the static
      index of this one. Writing through the stacked form updates the one
      buffer in place; slicing a layer out and setting it back copies the
      layer's cache twice per forward on XLA:CPU (docs/benchmarks.md).
    """

    k: jnp.ndarray
    v: jnp.ndarray
    layer: int | None = flax.struct.field(pytree_node=False, default=None)

    def write(self, k: jnp.ndarray, v: jnp.ndarray, positions: jnp.ndarray) -> LayerCache:
        """Writes each row's new keys and values ([batch, seq, kv_heads, head_dim])
        at that row's own positions ([batch, seq] int32, each < max_len)."""
        index = () if self.layer is None else (self.layer,)
        rows = jnp.arange(positions.shape[0])[:, None]
        return self.replace(k=self.k.at[index + (rows, positions)].set(k.astype(self.k.dtype)),
                            v=self.v.at[index + (rows, positions)].set(v.astype(self.v.dtype)))

    def layer_arrays(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """This layer's (k, v), each [batch, max_len, kv_heads, head_dim]."""
        if self.layer is None:
            return self.k, self.v
        return self.k[self.layer], self.v[self.layer]


class Attention(nn.Module):
    """Self-attention of one decoder layer.

    Without a cache it attends within the given row. With a cache it writes
    the row's keys and values at their positions first and then attends to the
    whole cache (positions 0..max_len-1); the mask hides the unwritten part.
    """

    config: ModelConfig
    mask: MaskSpec

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray | None,
        cache: LayerCache | None,
    ) -> tuple[jnp.ndarray, LayerCache | None]:
        """
        Args:
          x: [batch, seq, hidden] in the compute dtype.
          positions: [batch, seq] int32.
          segment_ids: [batch, seq] int32 or None (ignored with a cache).
          cache: this layer's LayerCache, or None.

        Returns:
          ([batch, seq, hidden], updated cache or None).
        """
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        def heads_projection(heads: int, head_axis: str, name: str) -> nn.Module:
            return projection((heads, cfg.head_dim), ("embed", head_axis, "head_dim"), name,
                              parent=self, dtype=dtype, param_dtype=param_dtype)

        q = heads_projection(cfg.num_heads, "heads", "q_proj")(x)
        k = heads_projection(cfg.num_kv_heads, "kv_heads", "k_proj")(x)
        v = heads_projection(cfg.num_kv_heads, "kv_heads", "v_proj")(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, param_dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, param_dtype, "head_dim", name="k_norm")(k)
        q = rotary_embedding(q, positions, cfg.rope_theta)
        k = rotary_embedding(k, positions, cfg.rope_theta)

        if cache is None:
            mask = AttentionMask.self_attention(self.mask, positions, segment_ids)
            new_cache = None
        else:
            new_cache = cache.write(k, v, positions)
            cache_k, cache_v = new_cache.layer_arrays()
            k, v = cache_k.astype(dtype), cache_v.astype(dtype)
            batch, max_len = cache_k.shape[:2]
            kv_positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
            mask = AttentionMask(self.mask, positions, kv_positions)

        out = attention_ops.attention(q, k, v, mask, impl=cfg.attention_impl)
        out = projection(cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj", parent=self,
                         axis=(-2, -1), dtype=dtype, param_dtype=param_dtype)(out)
        return out, new_cache
