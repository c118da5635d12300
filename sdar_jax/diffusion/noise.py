"""SDAR forward (masking) process and the `[xt ; x0]` training row (spec §2).

Every packed example (a maximal run of equal segment ids in a row) draws one
noise level `t ~ U(0, 1)`, `p = (1 - eps) * t + eps`, and each of its eligible
tokens (`loss_mask` True) is replaced by the mask token independently with
probability `p`. Prompt tokens and row padding (`loss_mask` False) are never
masked.

At least one masked token per segment that has an eligible token. The release
(`forward_add_noise_packed`) redraws `t` and the mask of a *whole packed row*
up to 10 times until any token of the row is masked, then forces one random
eligible token; a row with a masked token can still hold segments with none.
Here the same procedure runs per *segment*, and all `max_tries` draws are made
at once: each segment keeps its first draw (in try order) that masks at least
one of its tokens, which is exactly the distribution of the sequential loop
(the draws are i.i.d. and the loop stops at the first success). If every draw
of a segment is empty, one of its eligible tokens, chosen uniformly, is masked
and the segment keeps the last draw's `p` (as the release does).
`max_tries=1` is "force one right away". No Python loop over examples and no
data-dependent control flow: everything is a few O(batch * seq) array ops.

Segments are contiguous runs of equal `segment_ids` (packed examples); the
per-segment quantities are computed with cumulative sums along the row, so the
segment id values themselves are arbitrary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-3
DEFAULT_MAX_TRIES = 10


class NoisedTokens(NamedTuple):
    """The result of the forward process.

    xt: [batch, seq] int32, the noisy tokens (mask token where masked).
    masked: [batch, seq] bool, which tokens were replaced.
    p: [batch, seq] float32, the noise level of each token's segment.
    """

    xt: jnp.ndarray
    masked: jnp.ndarray
    p: jnp.ndarray


def segment_bounds(segment_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """First and last index of each token's segment (contiguous run of equal ids).

    Args:
      segment_ids: [batch, seq] int.

    Returns:
      (start, end): [batch, seq] int32 each; `start[b, i] <= i <= end[b, i]`.
    """
    batch, seq = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # [batch, seq - 1]
    edge = jnp.ones((batch, 1), bool)
    is_first = jnp.concatenate([edge, change], axis=1)
    is_last = jnp.concatenate([change, edge], axis=1)
    start = jax.lax.cummax(jnp.where(is_first, idx, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_last, idx, seq - 1), axis=1, reverse=True)
    return start, end


def _gather(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """x[..., index] along the last axis; index [batch, seq] broadcasts over x's leading axes."""
    return jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=-1)


def _segment_sum(x: jnp.ndarray, start: jnp.ndarray, end: jnp.ndarray) -> jnp.ndarray:
    """Sum of x over each token's segment, broadcast back to the tokens.

    Args:
      x: [..., batch, seq] int32.
      start, end: [batch, seq] int32 from `segment_bounds`.

    Returns:
      [..., batch, seq] int32.
    """
    total = jnp.cumsum(x, axis=-1)
    return _gather(total, end) - _gather(total, start) + _gather(x, start)


def _checked_segments(caller: str, tokens: jnp.ndarray, loss_mask: jnp.ndarray,
                      segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """Checks the [batch, seq] shapes; returns segment_ids (one segment per row when None)."""
    if tokens.ndim != 2 or loss_mask.shape != tokens.shape:
        raise ValueError(
            f"{caller}: tokens {tokens.shape} must be [batch, seq] and loss_mask "
            f"{loss_mask.shape} the same shape"
        )
    if segment_ids is None:
        return jnp.zeros(tokens.shape, jnp.int32)
    if segment_ids.shape != tokens.shape:
        raise ValueError(f"{caller}: segment_ids {segment_ids.shape} must match tokens {tokens.shape}")
    return segment_ids


def noise_tokens(
    rng: jax.Array,
    tokens: jnp.ndarray,
    loss_mask: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    *,
    mask_token_id: int,
    eps: float = DEFAULT_EPS,
    max_tries: int = DEFAULT_MAX_TRIES,
) -> NoisedTokens:
    """Masks the eligible tokens of every segment at that segment's noise level.

    Args:
      rng: a PRNG key.
      tokens: [batch, seq] int32 clean tokens x0.
      loss_mask: [batch, seq] bool, True where a token may be masked.
      segment_ids: [batch, seq] int32 packing segments, or None (one segment
        per row).
      mask_token_id: the id written at masked positions.
      eps: the noise-level floor, `p = (1 - eps) * t + eps`; in (0, 1].
      max_tries: draws per segment before forcing one masked token (>= 1).

    Returns:
      NoisedTokens(xt, masked, p); `masked` implies `loss_mask`, and every
      segment with an eligible token has at least one masked token.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"noise_tokens: eps must lie in (0, 1], got {eps!r}")
    if not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"noise_tokens: max_tries must be a positive int, got {max_tries!r}")
    segment_ids = _checked_segments("noise_tokens", tokens, loss_mask, segment_ids)
    eligible = loss_mask.astype(bool)
    start, end = segment_bounds(segment_ids)
    t_rng, mask_rng, force_rng = jax.random.split(rng, 3)

    # All tries at once: [tries, batch, seq]; one t per segment, read at its first token.
    shape = (max_tries, *tokens.shape)
    t = _gather(jax.random.uniform(t_rng, shape, jnp.float32), start)
    p = (1.0 - eps) * t + eps
    candidates = (jax.random.uniform(mask_rng, shape, jnp.float32) < p) & eligible
    hit = _segment_sum(candidates.astype(jnp.int32), start, end) > 0
    any_hit = hit.any(axis=0)  # [batch, seq], constant over a segment
    chosen = jnp.where(any_hit, jnp.argmax(hit, axis=0), max_tries - 1)[None]
    masked = jnp.take_along_axis(candidates, chosen, axis=0)[0]
    p = jnp.take_along_axis(p, chosen, axis=0)[0]

    # Segments whose every draw was empty: mask the r-th eligible token, r uniform.
    eligible_i32 = eligible.astype(jnp.int32)
    num_eligible = _segment_sum(eligible_i32, start, end)
    cumulative = jnp.cumsum(eligible_i32, axis=-1)
    rank = cumulative - _gather(cumulative, start) + _gather(eligible_i32, start) - 1
    r = jax.random.randint(force_rng, tokens.shape, 0, jnp.maximum(num_eligible, 1))
    forced = ~any_hit & eligible & (rank == _gather(r, start))
    masked = masked | forced

    xt = jnp.where(masked, jnp.asarray(mask_token_id, tokens.dtype), tokens)
    return NoisedTokens(xt=xt, masked=masked, p=p)


def complementary_noise(
    rng: jax.Array,
    tokens: jnp.ndarray,
    loss_mask: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    *,
    mask_token_id: int,
    eps: float = DEFAULT_EPS,
) -> tuple[NoisedTokens, NoisedTokens]:
    """Two noisings of the same tokens whose masks are exact complements (spec §2.7).

    Every segment draws `t ~ U(eps, 1 - eps)`; the first copy masks each
    eligible token independently with probability t, the second masks exactly
    the eligible tokens the first left clean, an independent Bernoulli(1 - t)
    mask (so its `p` is 1 - t). Every eligible token is masked in exactly one
    copy. No forcing: a segment whose first copy masks nothing is fully masked
    in the second.

    Args: as `noise_tokens` (without max_tries); eps in (0, 0.5).

    Returns:
      (first, second) NoisedTokens; `first.masked ^ second.masked == eligible`.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"complementary_noise: eps must lie in (0, 0.5), got {eps!r}")
    segment_ids = _checked_segments("complementary_noise", tokens, loss_mask, segment_ids)
    eligible = loss_mask.astype(bool)
    start, _ = segment_bounds(segment_ids)
    t_rng, mask_rng = jax.random.split(rng)
    t = _gather(jax.random.uniform(t_rng, tokens.shape, jnp.float32, eps, 1.0 - eps), start)
    first = (jax.random.uniform(mask_rng, tokens.shape, jnp.float32) < t) & eligible
    second = eligible & ~first
    mask_id = jnp.asarray(mask_token_id, tokens.dtype)
    return (
        NoisedTokens(xt=jnp.where(first, mask_id, tokens), masked=first, p=t),
        NoisedTokens(xt=jnp.where(second, mask_id, tokens), masked=second, p=1.0 - t),
    )


def diffusion_row(
    xt: jnp.ndarray, x0: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The 2L-token training row `[xt ; x0]` with duplicated positions and segments.

    Feed it to the model with `MaskSpec("block_diffusion", B)` and
    `logits_slice=(0, L)` (logits of the noisy half only).

    Args:
      xt: [batch, L] int32 noisy tokens.
      x0: [batch, L] int32 clean tokens.
      positions: [batch, L] int32 per-segment position ids.
      segment_ids: [batch, L] int32 packing segments.

    Returns:
      (tokens, positions, segment_ids), each [batch, 2L] int32.
    """
    shapes = {a.shape for a in (xt, x0, positions, segment_ids)}
    if len(shapes) != 1 or xt.ndim != 2:
        raise ValueError(
            "diffusion_row: xt, x0, positions and segment_ids must share one [batch, L] shape, "
            f"got {xt.shape}, {x0.shape}, {positions.shape}, {segment_ids.shape}"
        )

    def twice(a: jnp.ndarray) -> jnp.ndarray:
        return jnp.concatenate([a, a], axis=1)

    return jnp.concatenate([xt, x0], axis=1), twice(positions), twice(segment_ids)
