"""Attention masks as index functions.

Every mask is written once, as a function of the query and key indices, their
position ids and their packing segment ids. The dense XLA reference, the
Pallas kernels' tile skipping and the tests all derive from `mask_fn`.

Kinds:
  causal           k_pos <= q_pos
  block_causal     k_pos // B <= q_pos // B
  block_diffusion  the SDAR training row `[xt ; x0]` of length 2L (index < L is
                   the noisy half, positions are duplicated, blk = pos // B):
                     noisy q -> noisy k   blk(k) == blk(q)
                     noisy q -> clean k   blk(k) <  blk(q)
                     clean q -> clean k   blk(k) <= blk(q)
                     clean q -> noisy k   never
  bidirectional    everything
With `causal_in_block` (a model's `block_attention="causal"`), the block kinds
also require k_pos <= q_pos wherever q and k lie in the same block and the
same half: block_causal becomes causal, and block_diffusion's clean half is
causal and its noisy blocks attend to their own earlier positions only.
Every kind also requires equal segment ids (packed examples never see each other).

`AttentionMask` carries one call's mask: the description plus the runtime
position and segment ids of the queries and keys, as one pytree argument of
every attention implementation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

MaskKind = Literal["causal", "block_causal", "block_diffusion", "bidirectional"]
MASK_KINDS = ("causal", "block_causal", "block_diffusion", "bidirectional")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A static, hashable description of an attention mask.

    Attributes:
      kind: one of MASK_KINDS.
      block_size: B for the block kinds (ignored otherwise).
      causal_in_block: the block kinds with causal attention inside a block.
    """

    kind: MaskKind
    block_size: int = 1
    causal_in_block: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"MaskSpec.kind {self.kind!r} is unknown; expected one of {MASK_KINDS}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"MaskSpec.block_size must be a positive int, got {self.block_size!r}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids"],
    meta_fields=["spec"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """The mask of one attention call: a static description and its runtime ids.

    A pytree whose leaves are the id arrays (the spec is static), so it passes
    through jit and shard_map as one argument.

    Attributes:
      spec: the mask description.
      q_positions: [batch, q_len] int32 position ids of the queries.
      kv_positions: [batch, kv_len] int32 position ids of the keys.
      q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] int32
        packing segments, or None for a single segment.
    """

    spec: MaskSpec
    q_positions: jnp.ndarray
    kv_positions: jnp.ndarray
    q_segment_ids: jnp.ndarray | None = None
    kv_segment_ids: jnp.ndarray | None = None

    @classmethod
    def self_attention(cls, spec: MaskSpec, positions: jnp.ndarray,
                       segment_ids: jnp.ndarray | None = None) -> AttentionMask:
        """Queries and keys are the same row: positions / segment_ids [batch, seq]."""
        return cls(spec, positions, positions, segment_ids, segment_ids)

    def check(self, batch: int, q_len: int, kv_len: int, caller: str) -> None:
        """Raises naming `caller` and the field unless every id array is integer [batch, len]
        and the segment ids are given for both sides or neither."""
        expected = {"q_positions": (batch, q_len), "kv_positions": (batch, kv_len),
                    "q_segment_ids": (batch, q_len), "kv_segment_ids": (batch, kv_len)}
        for name, shape in expected.items():
            array = getattr(self, name)
            if array is None:
                continue
            if tuple(array.shape) != shape or not jnp.issubdtype(array.dtype, jnp.integer):
                raise ValueError(
                    f"{caller}: {name} must be an integer array of shape {shape} "
                    f"[batch, len], got {array.dtype}{tuple(array.shape)}"
                )
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError(f"{caller}: give both q_segment_ids and kv_segment_ids, or neither")

    def dense(self) -> jnp.ndarray:
        """[batch, q_len, kv_len] bool: `dense_mask` of these ids."""
        return dense_mask(self.spec, self.q_positions, self.kv_positions, self.q_segment_ids,
                          self.kv_segment_ids)


def causal() -> MaskSpec:
    return MaskSpec("causal")


def block_causal(block_size: int, causal_in_block: bool = False) -> MaskSpec:
    return MaskSpec("block_causal", block_size, causal_in_block)


def block_diffusion(block_size: int, causal_in_block: bool = False) -> MaskSpec:
    return MaskSpec("block_diffusion", block_size, causal_in_block)


def require_decode_mask(spec: MaskSpec, caller: str) -> None:
    """Raises naming `caller` if `spec` is the training-only block_diffusion mask."""
    if spec.kind == "block_diffusion":
        raise ValueError(f"{caller}: block_diffusion is a training mask; decode with block_causal")


def mask_fn(spec: MaskSpec, q_idx, k_idx, q_pos, k_pos, q_seg, k_seg, noisy_len: int | None = None):
    """Whether query q may attend to key k; all arguments broadcast together.

    Args:
      spec: the mask description.
      q_idx, k_idx: indices in the (self-attention) row; used only by
        block_diffusion to tell the halves apart.
      q_pos, k_pos: position ids.
      q_seg, k_seg: packing segment ids.
      noisy_len: L, the length of the noisy half (block_diffusion only).

    Returns:
      A boolean array of the broadcast shape.
    """
    same_segment = q_seg == k_seg
    if spec.kind == "bidirectional":
        return same_segment
    if spec.kind == "causal":
        return same_segment & (k_pos <= q_pos)
    q_blk = q_pos // spec.block_size
    k_blk = k_pos // spec.block_size
    if spec.causal_in_block:  # within a block, only earlier positions
        same_block = (k_blk == q_blk) & (k_pos <= q_pos)
        up_to_own_block = (k_blk < q_blk) | same_block
    else:
        same_block = k_blk == q_blk
        up_to_own_block = k_blk <= q_blk
    if spec.kind == "block_causal":
        return same_segment & up_to_own_block
    if noisy_len is None:
        raise ValueError("mask_fn: block_diffusion needs noisy_len (half the row length)")
    q_noisy = q_idx < noisy_len
    k_noisy = k_idx < noisy_len
    # Boolean algebra rather than jnp.where, so NumPy inputs give a NumPy result: splash
    # attention evaluates this on the host while a jit is tracing (see pallas_tpu.IndexMask).
    allowed = (
        (q_noisy & k_noisy & same_block)
        | (q_noisy & ~k_noisy & (k_blk < q_blk))
        | (~q_noisy & ~k_noisy & up_to_own_block)
    )
    return same_segment & allowed


def dense_mask(
    spec: MaskSpec,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    q_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """The mask as a dense boolean array.

    Args:
      spec: the mask description.
      q_positions: [batch, q_len] int32 position ids of the queries.
      kv_positions: [batch, kv_len] int32 position ids of the keys.
      q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] int32, or
        None for a single segment.

    Returns:
      [batch, q_len, kv_len] bool.
    """
    batch, q_len = q_positions.shape
    kv_len = kv_positions.shape[1]
    if spec.kind == "block_diffusion" and q_len != kv_len:
        raise ValueError(
            f"block_diffusion is a self-attention mask over [xt; x0]: q_len ({q_len}) must "
            f"equal kv_len ({kv_len})"
        )
    if spec.kind == "block_diffusion" and q_len % 2:
        raise ValueError(f"block_diffusion row length must be even ([xt; x0]), got {q_len}")
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
    q_idx = jnp.arange(q_len)[None, :, None]
    k_idx = jnp.arange(kv_len)[None, None, :]
    return mask_fn(
        spec,
        q_idx,
        k_idx,
        q_positions[:, :, None],
        kv_positions[:, None, :],
        q_segment_ids[:, :, None],
        kv_segment_ids[:, None, :],
        noisy_len=q_len // 2,
    )
