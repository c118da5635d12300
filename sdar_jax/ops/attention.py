"""The attention entry point: resolves the implementation and picks one kernel, in one step.

`impl` is "xla" (`xla_attention`, the dense-mask reference), "pallas" (the
block-sparse kernels) or "auto" (Pallas on a GPU or TPU, XLA on CPU; see
`sdar_jax.ops.platform`). For "pallas" the kernel follows the lowering and
the call shape:

  GPU  self-attention / training, any mask and positions: `pallas_gpu.flash_attention`
       (Triton; forward + custom_vjp backward).
       A few queries against a cache (q_len != kv_len, q_len * groups <= 64, not
       block_diffusion): `pallas_decode.decode_attention` (split-K, forward only).
  TPU  self-attention (q_len == kv_len): `pallas_tpu.splash_attention`, which
       refuses non-canonical positions (see `sdar_jax.ops.pallas_tpu`).
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

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from sdar_jax import parallel
from sdar_jax.config import ATTENTION_IMPLS
from sdar_jax.ops import pallas_decode, pallas_gpu, platform
from sdar_jax.ops.masks import AttentionMask
from sdar_jax.ops.xla_attention import xla_attention

logger = logging.getLogger(__name__)

BACKENDS = platform.ACCELERATORS


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """Tile sizes of the Pallas kernels (tuning; the defaults suit the released shapes).

    Attributes:
      gpu_blocks: tiles of the GPU training / prefill kernels.
      decode_block_k: cache tile length of the decode kernels (None: 64 on GPU, 512 on TPU).
      decode_splits: GPU decode: parallel chunks per row (None: fill the device).
    """

    gpu_blocks: pallas_gpu.BlockSizes = pallas_gpu.BlockSizes()
    decode_block_k: int | None = None
    decode_splits: int | None = None


def resolve_impl(impl: str) -> str:
    """"auto" -> "pallas" on a GPU or TPU, "xla" elsewhere; other names checked and kept."""
    return platform.resolve(impl, ATTENTION_IMPLS, accelerated="pallas", portable="xla", what="attention")


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


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: AttentionMask,
    *,
    impl: str = "xla",
    backend: str | None = None,
    interpret: bool | None = None,
    tuning: KernelTuning = KernelTuning(),
) -> jnp.ndarray:
    """Masked multi-head attention with grouped K/V heads.

    Args:
      q: [batch, q_len, heads, head_dim] queries (already rotated and normed).
      k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
      mask: the mask description with its position and segment ids
        ([batch, q_len] / [batch, kv_len] int32).
      impl: "xla", "pallas" or "auto" (module docstring).
      backend: "pallas" only: the "gpu" or "tpu" lowering; None: the default
        JAX backend's ("gpu" kernels interpreted when that is the CPU).
      interpret: "pallas" only: run in the Pallas interpreter; None: only when
        the default JAX backend is not an accelerator.
      tuning: "pallas" only: kernel tile sizes.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; softmax scale head_dim**-0.5.
    """
    _check_shapes(q, k, v)
    if resolve_impl(impl) == "xla":
        return xla_attention(q, k, v, mask)
    mask.check(q.shape[0], q.shape[1], k.shape[1], "attention")
    accelerator = platform.accelerator()
    backend = backend or accelerator or "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend {backend!r} is not one of {BACKENDS}")
    local = functools.partial(_kernel, backend=backend,
                              interpret=accelerator is None if interpret is None else interpret,
                              tuning=tuning)
    context = parallel.current_context()
    if context is None:
        return local(q, k, v, mask)
    rows, meta = context.attention_specs(q.shape[0], q.shape[2], k.shape[2])
    mask_specs = jax.tree.map(lambda _: meta, mask)  # absent segment ids stay None
    return jax.shard_map(local, mesh=context.mesh, in_specs=(rows, rows, rows, mask_specs),
                         out_specs=rows, check_vma=False)(q, k, v, mask)


def _kernel_head_dim(backend: str, head_dim: int) -> bool:
    """Triton tiles need a power of two (>= 16); Mosaic slices heads in 128-lane units."""
    if backend == "tpu":
        return head_dim % 128 == 0
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _kernel(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask, *, backend: str,
            interpret: bool, tuning: KernelTuning) -> jnp.ndarray:
    """The Pallas kernel for one device's operands (shapes as `attention`)."""
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    groups = q.shape[2] // k.shape[2]
    if not interpret and not _kernel_head_dim(backend, head_dim):
        # Tiny test models (head_dim 16, 32, ...) on a TPU: the kernels tile head_dim in lanes.
        logger.warning("attention: head_dim %d does not suit the %s kernels; using the XLA "
                       "reference", head_dim, backend)
        return xla_attention(q, k, v, mask)
    if backend == "tpu":
        from sdar_jax.ops import pallas_tpu  # only TPU callers import splash and Mosaic

        if q_len == kv_len:
            return pallas_tpu.splash_attention(
                q, k, v, mask=mask.spec, positions=mask.q_positions, segment_ids=mask.q_segment_ids,
                kv_positions=mask.kv_positions, kv_segment_ids=mask.kv_segment_ids, interpret=interpret)
        return pallas_tpu.cache_attention(q, k, v, mask, block_k=tuning.decode_block_k or 512,
                                          interpret=interpret)
    decodes = q_len * groups <= pallas_decode.MAX_DECODE_ROWS and mask.spec.kind != "block_diffusion"
    if q_len != kv_len and decodes:
        return pallas_decode.decode_attention(q, k, v, mask, block_k=tuning.decode_block_k or 64,
                                              splits=tuning.decode_splits, interpret=interpret)
    return pallas_gpu.flash_attention(q, k, v, mask, block_sizes=tuning.gpu_blocks, interpret=interpret)
