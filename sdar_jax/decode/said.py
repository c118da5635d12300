"""Scaffold-aware decoding (SAID) and CHLG as staged strategies (spec §4).

A block of length B is split into K stages by a 1-D checkerboard hierarchy
(`stage_partition`), decoded coarsest grid first; a per-block step budget is
split over the stages exactly as the public SAID code does (`stage_steps`,
spec §4.2). Inside a stage only that stage's masked positions may be
committed, by the low-confidence rules of spec §3.5, `n` per step from the
§3.4 schedule over the stage's masked count at the stage's start. CHLG
replaces the fixed steps of the last (reconstruction) stage by one scoring
pass that commits every position with confidence >= tau, plus a few extra
steps for the rest, most confident first.

A row always works on its first stage (in decoding order) that still has a
masked position: a stage whose positions are all committed is done, so the
steps the split gives it past its last commit (the public code runs them as
forwards that commit nothing) are skipped, and the next stage starts in the
same forward. A stage made only of prompt positions takes no forward at all.

The partition and the split are plain Python on static sizes; `said_select`
is the jit-compatible per-step selection used inside the decoder's loop, with
its per-row progress in a `StageState`.

K = 1 is low_confidence_static with the schedule over the block's masked
positions (the public code's loop), which differs from spec §3.4's schedule
over B only in a block that holds a prompt tail.

Choices where spec §4 leaves room:
  * CHLG's scoring pass commits at least the most confident position (so every
    step makes progress), and its extra steps spread the remaining count
    front-loaded: ceil(remaining / extra steps left);
  * for said_chlg the reconstruction stage's share of the budget is
    1 + chlg_extra_steps (its worst case), so the budget bounds the forwards
    per block for both strategies.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sdar_jax.decode import strategies


@functools.lru_cache(maxsize=None)
def _partition(block_length: int, num_stages: int) -> tuple[int, ...]:
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if num_stages < 1:
        raise ValueError(f"said num_stages must be >= 1, got {num_stages}")
    stage = [0] * block_length
    remainder = set(range(block_length))
    for k in range(1, num_stages):
        u_k = {p for p in remainder if p % 2**k == 2 ** (k - 1)}
        if not u_k:
            raise ValueError(
                f"said num_stages={num_stages} is too many for block_length={block_length}: "
                f"stage U_{k} is empty (need block_length > {2 ** (num_stages - 2)})"
            )
        for p in u_k:
            stage[p] = num_stages - k
        remainder -= u_k
    return tuple(stage)


def stage_partition(block_length: int, num_stages: int) -> np.ndarray:
    """Stage index of every block-relative position, in decoding order.

    For k = 1..K-1, U_k = {p in R : p mod 2^k == 2^(k-1)} is removed from the
    remainder R (initially the whole block). Stages are decoded in the order
    R, U_{K-1}, ..., U_1, so R is stage 0 and U_k is stage K - k.

    Args:
      block_length: B >= 1.
      num_stages: K >= 1; every stage must be non-empty (B > 2^(K-2)).

    Returns:
      [B] int32 numpy array of stage indices in [0, K).
    """
    return np.asarray(_partition(block_length, num_stages), np.int32)


def stage_steps(block_length: int, num_stages: int, budget: int, rec_steps: int) -> tuple[int, ...]:
    """Splits a per-block step budget T over the stages as the public SAID code does (spec §4.2).

    K = 1: the one stage gets T. Otherwise the last (reconstruction) stage gets
    `rec_steps` and the n = K - 1 generation stages share G = T - rec_steps,
    linearly decreasing: s_min = max(1, G // (2n)),
    s_max = max(s_min, 2G // n - s_min), linspace(s_max, s_min, n) rounded half
    to even and floored at 1, then G - sum spread one step at a time over the
    stages in order (adding or removing by its sign) and floored at 1 again.
    Over every valid budget the parts sum to T (checked against the public
    code's values in tests/decode/data/).

    A stage may get more steps than it has masked positions; `said_select`
    skips the ones after its last commit.

    Args:
      block_length: B.
      num_stages: K (the partition must be valid for B).
      budget: T, steps per block: in [1, B] for K = 1, in
        [K - 1 + rec_steps, B] otherwise (every generation stage gets a step).
      rec_steps: steps of the reconstruction stage, >= 1 (ignored when K = 1).

    Returns:
      Steps per stage, in decoding order; sums to T.
    """
    stage_partition(block_length, num_stages)  # validates K against B
    if num_stages == 1:
        if not 1 <= budget <= block_length:
            raise ValueError(
                f"said steps (per-block budget) must be in [1, {block_length}] for "
                f"block_length={block_length}, num_stages=1; got {budget}"
            )
        return (budget,)
    n = num_stages - 1
    if not 1 <= rec_steps <= block_length - n:
        raise ValueError(
            f"said reconstruction steps must be in [1, {block_length - n}] for "
            f"block_length={block_length}, num_stages={num_stages} (the budget is at most "
            f"block_length and each of the {n} generation stages needs a step); got {rec_steps}"
        )
    if not n + rec_steps <= budget <= block_length:
        raise ValueError(
            f"said steps (per-block budget) must be in [{n + rec_steps}, {block_length}] for "
            f"block_length={block_length}, num_stages={num_stages}, {rec_steps} reconstruction "
            f"steps (each of the {n} generation stages needs a step); got {budget}"
        )
    gen = budget - rec_steps
    if n == 1:
        return (gen, rec_steps)
    s_min = max(1, gen // (2 * n))
    s_max = max(s_min, 2 * gen // n - s_min)
    steps = np.maximum(np.round(np.linspace(s_max, s_min, n)).astype(np.int64), 1)
    diff = gen - int(steps.sum())
    for i in range(abs(diff)):
        steps[i % n] += 1 if diff > 0 else -1
    steps = np.maximum(steps, 1)
    return tuple(int(s) for s in steps) + (rec_steps,)


class StageState(NamedTuple):
    """A row's SAID progress in its current block (reset for every block).

    Attributes:
      steps_done: [batch, K] int32, forwards the row has spent in each stage.
      start_masked: [batch, K] int32, the stage's masked positions when the
        row's first forward in it ran (0 before that).
    """

    steps_done: jnp.ndarray
    start_masked: jnp.ndarray


def init_stage_state(batch: int, num_stages: int) -> StageState:
    """The state of rows starting a block: no stage begun."""
    zeros = jnp.zeros((batch, num_stages), jnp.int32)
    return StageState(steps_done=zeros, start_masked=zeros)


def reset_rows(state: StageState, rows: jnp.ndarray) -> StageState:
    """`state` with the rows where `rows` ([batch] bool) is true set back to a block's start."""
    return StageState(*(jnp.where(rows[:, None], 0, field) for field in state))


def said_select(
    confidence: jnp.ndarray,
    masked: jnp.ndarray,
    state: StageState,
    *,
    stage_of: np.ndarray,
    steps_per_stage: jnp.ndarray,
    threshold: jnp.ndarray | None,
    chlg_threshold: jnp.ndarray | None,
    chlg_extra_steps: jnp.ndarray | None,
) -> tuple[jnp.ndarray, StageState]:
    """One SAID (or SAID + CHLG) step: the commit mask and the rows' updated progress.

    Each row works on its first stage (in decoding order) that still has a
    masked position. A row with no masked position takes no step: it commits
    nothing and its state is unchanged.

    Args:
      confidence: [batch, B] float32.
      masked: [batch, B] bool, still-masked positions of rows taking this step.
      state: the rows' `StageState` in this block.
      stage_of: [B] static stage index of each position (`stage_partition`).
      steps_per_stage: [K] int32 step budget of each stage (`stage_steps`).
      threshold: scalar float32 dynamic threshold inside stages, or None for
        the static rule.
      chlg_threshold: scalar float32 tau for CHLG in the last stage, or None
        for plain SAID.
      chlg_extra_steps: scalar int32 extra steps after the CHLG pass.

    Returns:
      commit: [batch, B] bool, a subset of `masked`.
      state: the updated `StageState`.
    """
    num_stages = state.steps_done.shape[-1]
    in_stage = jnp.asarray(stage_of)[None, :] == jnp.arange(num_stages)[:, None]  # [K, B]
    has_masked = jnp.any(masked[:, None, :] & in_stage[None], axis=-1)  # [batch, K]
    stage = jnp.argmax(has_masked, axis=-1).astype(jnp.int32)  # [batch]; 0 when none is masked
    eligible = masked & in_stage[stage]
    remaining = jnp.sum(eligible, axis=-1).astype(jnp.int32)
    current = jnp.arange(num_stages)[None] == stage[:, None]  # [batch, K]
    step = jnp.sum(jnp.where(current, state.steps_done, 0), axis=-1)
    start = jnp.where(step == 0, remaining, jnp.sum(jnp.where(current, state.start_masked, 0), -1))
    count = strategies.step_count(step, steps_per_stage[stage], start)
    zero = jnp.zeros((), jnp.float32)
    inputs = strategies.StepInputs(
        confidence=confidence, entropy=jnp.zeros_like(confidence), masked=eligible, count=count,
        threshold=zero if threshold is None else threshold, eb_bound=zero,
    )
    if threshold is None:
        commit = strategies.low_confidence_static(inputs)
    else:
        commit = strategies.low_confidence_dynamic(inputs)
    if chlg_threshold is not None:
        rank = strategies.rank_among_masked(confidence, eligible, descending=True)
        scoring_pass = eligible & ((confidence >= chlg_threshold) | (rank == 0))
        steps_left = jnp.maximum(chlg_extra_steps - (step - 1), 1)
        extra_count = -(-remaining // steps_left)
        extra_step = eligible & (rank < extra_count[:, None])
        chlg_commit = jnp.where((step == 0)[:, None], scoring_pass, extra_step)
        commit = jnp.where((stage == num_stages - 1)[:, None], chlg_commit, commit)
    took_step = current & jnp.any(masked, axis=-1)[:, None]
    new_state = StageState(
        steps_done=state.steps_done + took_step,
        start_masked=jnp.where(took_step & (step == 0)[:, None], remaining[:, None],
                               state.start_masked),
    )
    return commit, new_state
