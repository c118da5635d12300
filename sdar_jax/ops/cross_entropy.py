"""Cross-entropy straight from hidden states and the output head, tile by tile (Flax-free).

The dense way, `logits = hidden @ head` cast to float32 over the whole row and
then a log-softmax, makes `[batch, seq, vocab]` float32 the largest tensor of a
step (SDAR's vocabulary has 151,936 entries: 2.5 GB for one 4096-token row,
and as much again for its gradient). `head_cross_entropy` instead runs over
tiles of `chunk_size` sequence positions (`lax.map`): each tile computes its
`[batch, chunk, vocab]` logits exactly as the model's head does (operands cast
to the compute dtype, then float32), its per-token cross entropy and argmax
hits, and keeps only those. The tile function is rematerialised
(`jax.checkpoint`), so the backward pass recomputes one tile's logits at a
time instead of storing them; the head's gradient is accumulated over the
tiles in the head's own (parameter) dtype.

Tiles follow the sequence, not the flattened tokens, so a batch sharded over
devices stays sharded in every tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

DEFAULT_CHUNK_SIZE = 512


def _tile(hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, *, dtype: jnp.dtype,
          vocab_major: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """CE and hits of one tile: hidden [batch, chunk, hidden], targets [batch, chunk]."""
    h, w = hidden.astype(dtype), head.astype(dtype)
    logits = jnp.einsum("bch,vh->bcv" if vocab_major else "bch,hv->bcv", h, w).astype(jnp.float32)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce, jnp.argmax(logits, axis=-1) == targets


def head_cross_entropy(
    hidden: jnp.ndarray,
    head: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    dtype: jnp.dtype = jnp.float32,
    vocab_major: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-token cross entropy of `hidden @ head` without whole-row float32 logits.

    Args:
      hidden: [batch, seq, hidden] final-normed hidden states.
      head: the output projection, [hidden, vocab] (an `lm_head` kernel) or,
        with `vocab_major`, [vocab, hidden] (a tied embedding table).
      targets: [batch, seq] int32.
      dtype: the compute dtype both operands are cast to (the model's
        `dtype`); logits are float32 after the matmul, as in the model.
      vocab_major: `head` is [vocab, hidden].
      chunk_size: sequence positions per tile (the last tile is padded).

    Returns:
      (ce, correct): [batch, seq] float32 (log-softmax with max subtraction)
      and [batch, seq] bool (argmax == target), equal to the dense
      computation on the same logits.
    """
    if chunk_size < 1:
        raise ValueError(f"head_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    batch, seq, width = hidden.shape
    if targets.shape != (batch, seq):
        raise ValueError(f"head_cross_entropy: targets {targets.shape} must be [batch, seq] = {(batch, seq)}")
    head_width = head.shape[1] if vocab_major else head.shape[0]
    if head.ndim != 2 or head_width != width:
        raise ValueError(
            f"head_cross_entropy: head {head.shape} does not match hidden size {width} "
            f"({'[vocab, hidden]' if vocab_major else '[hidden, vocab]'} expected)"
        )
    tile = jax.checkpoint(functools.partial(_tile, dtype=dtype, vocab_major=vocab_major))
    chunk = min(chunk_size, seq)
    num_tiles = -(-seq // chunk)
    pad = num_tiles * chunk - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [num_tiles, batch, chunk, ...]: the batch dimension (and its sharding) is kept in every tile.
    h_tiles = hidden.reshape(batch, num_tiles, chunk, width).swapaxes(0, 1)
    t_tiles = targets.reshape(batch, num_tiles, chunk).swapaxes(0, 1)
    ce, correct = jax.lax.map(lambda xs: tile(xs[0], head, xs[1]), (h_tiles, t_tiles))
    ce = ce.swapaxes(0, 1).reshape(batch, num_tiles * chunk)[:, :seq]
    correct = correct.swapaxes(0, 1).reshape(batch, num_tiles * chunk)[:, :seq]
    return ce, correct
