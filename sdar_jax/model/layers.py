"""Building blocks of the decoder: RMSNorm, rotary embedding, projections, SwiGLU MLP.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `vocab`, `norm`) that `sdar_jax.parallel` maps to mesh
axes.

A projection's kernel is stored [in..., out...] ("kernel"), or for decoding
on CPU out-major [out..., in...] ("kernel_t", `transformer.out_major_kernels`):
XLA:CPU multiplies a few rows by an out-major weight taken as the left
operand at about twice the speed of the [in, out] product
(docs/benchmarks.md).
"""

from __future__ import annotations

import math
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


OUT_MAJOR_KERNEL = "kernel_t"
# Up to this many rows the out-major product runs weight-first (the fast few-row case).
FEW_ROWS = 16


def out_major_product(x: jnp.ndarray, kernel_t: jnp.ndarray, num_in: int) -> jnp.ndarray:
    """x [batch..., in...] times an out-major kernel [out..., in...] -> [batch..., out...]."""
    x_axes = tuple(range(x.ndim - num_in, x.ndim))
    k_axes = tuple(range(kernel_t.ndim - num_in, kernel_t.ndim))
    if math.prod(x.shape[: x.ndim - num_in]) > FEW_ROWS:
        return jax.lax.dot_general(x, kernel_t, ((x_axes, k_axes), ((), ())))
    y = jax.lax.dot_general(kernel_t, x, ((k_axes, x_axes), ((), ())))  # [out..., batch...]
    # The barrier keeps the product in its own [out..., batch...] layout; without it XLA
    # lays it out for the transpose below and runs the slow product again.
    y = jax.lax.optimization_barrier(y)
    num_out = kernel_t.ndim - num_in
    return jnp.transpose(y, tuple(range(num_out, y.ndim)) + tuple(range(num_out)))


class OutMajorDense(nn.Module):
    """A bias-free projection reading an out-major kernel "kernel_t" [out..., in...]
    (decoding only: it has no initializer)."""

    num_in: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_t = self.get_variable("params", OUT_MAJOR_KERNEL)
        return out_major_product(x.astype(self.dtype), kernel_t.astype(self.dtype), self.num_in)


def projection(features: int | Sequence[int], names: Sequence[str], name: str, *, parent: nn.Module,
               axis: int | Sequence[int] = -1, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32) -> nn.Module:
    """nn.DenseGeneral without bias, or `OutMajorDense` where `parent`'s params hold
    `name` in the out-major layout."""
    stored = parent.variables.get("params", {}).get(name, {})
    if OUT_MAJOR_KERNEL in stored:
        num_in = len(axis) if isinstance(axis, Sequence) else 1
        return OutMajorDense(num_in, dtype, name=name)
    return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=logical_init(dense_init(), names), name=name)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[batch, seq, hidden] -> [batch, seq, hidden]."""
        dense = lambda features, names, name: projection(  # noqa: E731
            features, names, name, parent=self, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(self.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
