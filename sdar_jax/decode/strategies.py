"""Remasking strategies (spec §3.5): which still-masked positions a denoising step commits.

Each strategy is a pure, jit-compatible function of one step's inputs
(`StepInputs`) returning a commit mask that is always a subset of the
still-masked positions (the released top-k can pick decoded or prompt
positions when fewer are masked than requested, and overwrite them; here a
position that is not masked is never committed).

Ties are broken by position, lowest index first, so an independent reference
written with plain sorts agrees exactly with the jitted decoder.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp


class StepInputs(NamedTuple):
    """One denoising step of one block, for a batch of sequences.

    Attributes:
      confidence: [batch, B] float32, probability of each position's proposal.
      entropy: [batch, B] float32, entropy of each position's full predictive
        distribution.
      masked: [batch, B] bool, positions that may be committed (still masked,
        and, for staged strategies, in the current stage).
      count: [batch] int32, the schedule's number of positions for this step
        (spec §3.4); a strategy commits all masked ones when fewer remain.
      threshold: scalar float32 confidence threshold (dynamic strategies).
      eb_bound: scalar float32 entropy bound (entropy_bounded).
    """

    confidence: jnp.ndarray
    entropy: jnp.ndarray
    masked: jnp.ndarray
    count: jnp.ndarray
    threshold: jnp.ndarray
    eb_bound: jnp.ndarray


Strategy = Callable[[StepInputs], jnp.ndarray]


def step_count(step: jnp.ndarray, steps: jnp.ndarray, length: int | jnp.ndarray) -> jnp.ndarray:
    """Spec §3.4 schedule: positions to commit at `step` when `length` are spread over `steps`.

    `length // steps`, plus one for the first `length % steps` steps. Steps at
    or past `steps` get `length` (commit everything left); the schedule never
    reaches them, since it commits `length` positions in `steps` steps.

    Args:
      step: int32 step index (any shape, broadcasting with the others).
      steps: int32 number of steps, >= 1.
      length: number of positions to commit over the schedule.

    Returns:
      int32 with the broadcast shape.
    """
    step, steps, length = jnp.asarray(step), jnp.asarray(steps), jnp.asarray(length)
    per_step = length // steps + (step < length % steps).astype(jnp.int32)
    return jnp.where(step < steps, per_step, length).astype(jnp.int32)


def rank_among_masked(score: jnp.ndarray, masked: jnp.ndarray, descending: bool) -> jnp.ndarray:
    """Rank of each masked position by score, ties broken by lower position first.

    Args:
      score: [batch, B] float32.
      masked: [batch, B] bool.
      descending: rank the highest score first.

    Returns:
      [batch, B] int32: 0 for the first masked position in the order, B for
      every unmasked position.
    """
    length = score.shape[-1]
    s_i, s_j = score[:, :, None], score[:, None, :]
    better = (s_j > s_i) if descending else (s_j < s_i)
    index = jnp.arange(length)
    earlier_tie = (s_j == s_i) & (index[None, None, :] < index[None, :, None])
    ahead = masked[:, None, :] & (better | earlier_tie)
    rank = jnp.sum(ahead, axis=-1).astype(jnp.int32)
    return jnp.where(masked, rank, length)


def sequential(x: StepInputs) -> jnp.ndarray:
    """Commits the `count` left-most masked positions."""
    order = jnp.cumsum(x.masked, axis=-1) - 1
    return x.masked & (order < x.count[:, None])


def low_confidence_static(x: StepInputs) -> jnp.ndarray:
    """Commits the `count` most confident masked positions."""
    rank = rank_among_masked(x.confidence, x.masked, descending=True)
    return x.masked & (rank < x.count[:, None])


def low_confidence_dynamic(x: StepInputs) -> jnp.ndarray:
    """Commits every masked position with confidence above the threshold, or,
    when fewer than `count` are, the `count` most confident ones.

    When at least `count` positions exceed the threshold the `count` most
    confident are among them, so the union below is exactly that rule.
    """
    rank = rank_among_masked(x.confidence, x.masked, descending=True)
    return x.masked & ((x.confidence > x.threshold) | (rank < x.count[:, None]))


def entropy_bounded(x: StepInputs) -> jnp.ndarray:
    """EB-sampler: masked positions sorted by entropy (ascending); commits the
    longest prefix whose cumulative entropy is at most the bound, and at least
    one position."""
    rank = rank_among_masked(x.entropy, x.masked, descending=False)
    # Cumulative entropy up to and including each position, in sorted order.
    upto = x.masked[:, None, :] & (rank[:, None, :] <= rank[:, :, None])
    cumulative = jnp.sum(jnp.where(upto, x.entropy[:, None, :], 0.0), axis=-1)
    return x.masked & ((cumulative <= x.eb_bound) | (rank == 0))


STRATEGIES: dict[str, Strategy] = {
    "sequential": sequential,
    "low_confidence_static": low_confidence_static,
    "low_confidence_dynamic": low_confidence_dynamic,
    "entropy_bounded": entropy_bounded,
}

# Staged strategies (spec §4) built on the ones above; see sdar_jax.decode.said.
STAGED_STRATEGIES = ("said", "said_chlg")
STRATEGY_NAMES = tuple(STRATEGIES) + STAGED_STRATEGIES

