"""Building blocks of the decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `vocab`, `norm`) that `sdar_jax.parallel` maps to mesh
axes.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdar_jax.config import DTYPES


def dtype_of(name: str) -> jnp.dtype:
    """The jnp scalar type named by a config dtype field (one of `config.DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    return getattr(jnp, name)


def logical_init(init: nn.initializers.Initializer, names: Sequence[str | None]):
    """An initializer whose parameter is boxed with logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def dense_init(scale: float = 0.02) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=scale)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 (Hugging Face semantics:
    normalise in float32, cast back to the input dtype, then scale)."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param(
            "scale", logical_init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(
    x: jnp.ndarray, positions: jnp.ndarray, theta: float
) -> jnp.ndarray:
    """Rotate-half RoPE (the Hugging Face convention).

    Args:
      x: [batch, seq, heads, head_dim].
      positions: [batch, seq] int32 position ids.
      theta: the RoPE base.

    Returns:
      x rotated, same shape and dtype.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated_half * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[batch, seq, hidden] -> [batch, seq, hidden]."""
        dense = lambda features, names, name: nn.DenseGeneral(  # noqa: E731
            features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical_init(dense_init(), names), name=name,
        )
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(self.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
