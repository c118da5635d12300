"""The "pallas" attention implementation: picks a kernel by backend and call shape.

  GPU  self-attention / training, any mask and positions: `pallas_gpu.flash_attention`
       (Triton; forward + custom_vjp backward).
       A few queries against a cache (q_len != kv_len, q_len * groups <= 64):
       `pallas_decode` (split-K decode kernel, forward only).
  TPU  self-attention (q_len == kv_len): splash attention (`pallas_tpu.splash_attention`),
       which refuses non-canonical positions (see `sdar_jax.ops.pallas_tpu`).
       Against a cache: `pallas_tpu.cache_attention` (forward only).
  CPU  the GPU kernels in the Pallas interpreter (for tests; slow).
  A head_dim the compiled kernels cannot tile (TPU: not a multiple of 128; GPU:
  not a power of two >= 16) falls back to the XLA reference, with a warning.

`interpret=True` with `backend="gpu"` or `"tpu"` runs that lowering's kernels in
the interpreter, which is how the tests check both on a CPU machine.

A `pallas_call` is opaque to GSPMD, which would gather its operands onto every
device. With a mesh set (the run's `sdar_jax.parallel.ShardingContext`, as the
trainer and sharded inference activate it) the kernels therefore run inside
`shard_map` with the context's specs (`ShardingContext.attention_specs`): the
batch split over the `batch` rule's axes and the heads over the `heads`
rule's, each device attending over its own rows and heads. A dimension its
axes do not divide is replicated over them instead.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sdar_jax import parallel
from sdar_jax.ops import masks, pallas_decode, pallas_gpu

logger = logging.getLogger(__name__)

BACKENDS = ("gpu", "tpu")


def _check_metadata(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids) -> None:
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    expected = {"q_positions": (batch, q_len), "kv_positions": (batch, kv_len),
                "q_segment_ids": (batch, q_len), "kv_segment_ids": (batch, kv_len)}
    given = {"q_positions": q_positions, "kv_positions": kv_positions,
             "q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids}
    for name, array in given.items():
        if array is None:
            continue
        if tuple(array.shape) != expected[name] or not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(
                f"pallas_attention: {name} must be an integer array of shape {expected[name]} "
                f"[batch, len], got {array.dtype}{tuple(array.shape)}"
            )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pallas_attention: give both q_segment_ids and kv_segment_ids, or neither")


def pallas_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: masks.MaskSpec,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    q_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    gpu_blocks: pallas_gpu.BlockSizes = pallas_gpu.BlockSizes(),
    decode_block_k: int | None = None,
    decode_splits: int | None = None,
) -> jnp.ndarray:
    """Masked attention through the Pallas kernels; arguments as `ops.attention.attention`.

    Args:
      backend: "gpu" or "tpu" lowering; None: the default JAX backend ("gpu"
        kernels interpreted when that is the CPU).
      interpret: run in the Pallas interpreter; None: only when the default
        JAX backend is not an accelerator.
      gpu_blocks: tile sizes of the GPU training / prefill kernels (tuning).
      decode_block_k, decode_splits: cache tile length and split count of the
        decode kernel (None: its defaults; see `pallas_decode.decode_attention`).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    _check_metadata(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    platform = jax.default_backend()
    if backend is None:
        backend = platform if platform in BACKENDS else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"pallas_attention: backend {backend!r} is not one of {BACKENDS}")
    if interpret is None:
        interpret = platform not in BACKENDS
    metadata = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    tuning = dict(gpu_blocks=gpu_blocks, decode_block_k=decode_block_k, decode_splits=decode_splits)

    def local(q, k, v, *metadata):
        return _dispatch(q, k, v, mask, *metadata, backend=backend, interpret=interpret, **tuning)

    context = parallel.current_context()
    if context is None:
        return local(q, k, v, *metadata)
    return _shard_mapped(local, context, q, k, v, metadata)


def _shard_mapped(local, context: parallel.ShardingContext, q, k, v, metadata):
    """Runs `local` per device with the context's attention specs (batch and heads split)."""
    rows, meta = context.attention_specs(q.shape[0], q.shape[2], k.shape[2])
    mesh = context.mesh
    present = [i for i, x in enumerate(metadata) if x is not None]

    def body(q, k, v, *given):
        full = [None] * len(metadata)
        for i, x in zip(present, given):
            full[i] = x
        return local(q, k, v, *full)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(rows, rows, rows, *([meta] * len(present))), out_specs=rows,
        check_vma=False,
    )(q, k, v, *(metadata[i] for i in present))


def _kernel_head_dim(backend: str, head_dim: int) -> bool:
    """Triton tiles need a power of two (>= 16); Mosaic slices heads in 128-lane units."""
    if backend == "tpu":
        return head_dim % 128 == 0
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _dispatch(q, k, v, mask, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
              backend: str, interpret: bool, gpu_blocks: pallas_gpu.BlockSizes,
              decode_block_k: int | None, decode_splits: int | None) -> jnp.ndarray:
    """Chooses the kernel for one device's operands."""
    q_len, kv_len = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    kw = dict(mask=mask, q_positions=q_positions, kv_positions=kv_positions,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    head_dim = q.shape[3]
    if not interpret and not _kernel_head_dim(backend, head_dim):
        # Tiny test models (head_dim 16, 32, ...) on a TPU: the kernels tile head_dim in lanes.
        logger.warning("pallas_attention: head_dim %d does not suit the %s kernels; using the XLA "
                       "reference", head_dim, backend)
        from sdar_jax.ops import attention as attention_ops

        return attention_ops.xla_attention(q, k, v, **kw)
    if backend == "tpu":
        from sdar_jax.ops import pallas_tpu  # only TPU callers import splash and Mosaic

        if q_len == kv_len:
            return pallas_tpu.splash_attention(
                q, k, v, mask=mask, positions=q_positions, segment_ids=q_segment_ids,
                kv_positions=kv_positions, kv_segment_ids=kv_segment_ids, interpret=interpret)
        return pallas_decode.decode_attention(q, k, v, **kw, backend="tpu", block_k=decode_block_k,
                                              interpret=interpret)
    if q_len != kv_len and q_len * groups <= pallas_decode.MAX_DECODE_ROWS and mask.kind != "block_diffusion":
        return pallas_decode.decode_attention(q, k, v, **kw, backend="gpu", block_k=decode_block_k,
                                              splits=decode_splits, interpret=interpret)
    return pallas_gpu.flash_attention(q, k, v, **kw, block_sizes=gpu_blocks, interpret=interpret)
