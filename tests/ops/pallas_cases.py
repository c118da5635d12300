"""Shared inputs for the Pallas kernel tests: packed rows, random q/k/v, reference gradients."""

from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
import jax.numpy as jnp
import numpy as np

from sdar_jax.ops import attention, masks


def packed_rows(seed: int, batch: int, length: int, block_size: int, n_segments: int, pad_blocks: int = 0):
    """Positions and segment ids [batch, length]: examples start on block boundaries,
    positions restart at 0 per example, and `pad_blocks` trailing blocks are row padding
    (segment 0, positions continuing from 0 like an example of their own)."""
    rng = np.random.default_rng(seed)
    n_blocks = length // block_size
    if length % block_size:
        raise ValueError(f"length {length} must be a multiple of block_size {block_size}")
    positions = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        used = n_blocks - pad_blocks
        cuts = np.sort(rng.choice(np.arange(1, used), size=n_segments - 1, replace=False)) if n_segments > 1 else []
        bounds = [0, *[int(c) * block_size for c in cuts], used * block_size, length]
        for seg, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            if stop > start:
                positions[row, start:stop] = np.arange(stop - start)
                segments[row, start:stop] = seg if stop <= used * block_size else 0
    return positions, segments


def qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, head_dim: int, dtype):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    dout = jax.random.normal(kd, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, dout


def training_inputs(seed: int, *, mask: masks.MaskSpec, batch: int, length: int, n_segments: int,
                    pad_blocks: int = 0) -> dict:
    """Mask keyword arguments for a training row: [xt; x0] (length 2L) for block_diffusion."""
    block = mask.block_size if mask.kind != "causal" else 1
    pos, seg = packed_rows(seed, batch, length, block, n_segments, pad_blocks)
    if mask.kind == "block_diffusion":
        pos, seg = np.concatenate([pos, pos], 1), np.concatenate([seg, seg], 1)
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    return dict(mask=mask, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)


def output_and_grads(fn, q, k, v, dout):
    """fn(q, k, v) and its vjp against dout, as float32 arrays."""
    out, vjp = jax.vjp(fn, q, k, v)
    return [x.astype(jnp.float32) for x in (out, *vjp(dout))]


def reference(q, k, v, dout, mask_kwargs):
    """The XLA reference computed in float32 from the (possibly rounded) inputs."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    return output_and_grads(lambda q, k, v: attention.attention(q, k, v, **mask_kwargs, impl="xla"), *f32)


def max_errors(got, want):
    return [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)]


def lowering_target(device_kind: str, platform: str, num_cores: int):
    """A context naming the device to lower for on a machine without it.

    JAX 0.11 asks the abstract mesh for the target of an ahead-of-time Triton or
    Mosaic lowering (GPU compute capability, TPU generation) instead of the
    local device; 0.10 reads the same field for Mosaic. A one-device mesh keeps
    `pallas_attention` off its shard_map path.
    """
    device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform=platform)
    mesh = AbstractMesh((1,), ("lowering",), (AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)
