"""Scaffold-aware decoding (SAID) and CHLG as staged strategies (spec §4).

A block of length B is split into K stages by a 1-D checkerboard hierarchy
(`stage_partition`), decoded coarsest grid first; a per-block step budget is
split over the stages (`stage_steps`). Inside a stage only that stage's masked
positions may be committed, by the low-confidence rules of spec §3.5. CHLG
replaces the fixed steps of the last (reconstruction) stage by one scoring
pass that commits every position with confidence >= tau, plus a few extra
steps for the rest, most confident first.

The partition and the split are plain Python on static sizes; `said_select`
is the jit-compatible per-step selection used inside the decoder's loop.

Choices where spec §4 leaves room (each keeps K = 1 identical to
low_confidence_static):
  * a generation stage's per-step count follows the §3.4 schedule over the
    stage's *size* (prompt positions included, as §3.4 counts the whole
    block), committing the masked ones when fewer remain;
  * CHLG's scoring pass commits at least the most confident position (so every
    step makes progress), and its extra steps spread the remaining count
    front-loaded: ceil(remaining / extra steps left);
  * for said_chlg the reconstruction stage's share of the budget is
    1 + chlg_extra_steps (its worst case), so the budget bounds the forwards
    per block for both strategies.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from sdar_jax.decode import strategies


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
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if num_stages < 1:
        raise ValueError(f"said num_stages must be >= 1, got {num_stages}")
    stage = np.zeros(block_length, np.int32)
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
    return stage


def stage_sizes(block_length: int, num_stages: int) -> tuple[int, ...]:
    """Number of positions of each stage, in decoding order."""
    return tuple(np.bincount(stage_partition(block_length, num_stages), minlength=num_stages).tolist())


def stage_steps(
    block_length: int, num_stages: int, budget: int, rec_steps: int, rec_capped: bool = True
) -> tuple[int, ...]:
    """Splits a per-block step budget T over the stages (spec §4.2).

    The last (reconstruction) stage gets `rec_steps`; the generation stages
    share `T - rec_steps`, each at least 1 and at most its size (more steps
    than positions would waste forwards), as close as possible to shares
    proportional to K-1, K-2, ..., 1 (linearly decreasing from the first
    generation stage to the last). Steps are handed out one at a time to the
    generation stage furthest below its share (ties: the earlier stage), so the
    total is exactly T. With K = 1 the single stage gets all T steps.

    Args:
      block_length: B.
      num_stages: K.
      budget: T, steps per block.
      rec_steps: steps of the reconstruction stage (ignored when K = 1).
      rec_capped: whether rec_steps may not exceed that stage's size (False
        for CHLG, whose steps are not one position each).

    Returns:
      Steps per stage, in decoding order; sums to T.
    """
    sizes = stage_sizes(block_length, num_stages)
    if num_stages == 1:
        if not 1 <= budget <= block_length:
            raise ValueError(
                f"said steps (per-block budget) must be in [1, {block_length}] for "
                f"block_length={block_length}, num_stages=1; got {budget}"
            )
        return (budget,)
    rec_max = sizes[-1] if rec_capped else budget
    if not 1 <= rec_steps <= rec_max:
        raise ValueError(
            f"said reconstruction steps must be in [1, {rec_max}] (block_length={block_length}, "
            f"num_stages={num_stages}); got {rec_steps}"
        )
    gen_sizes = sizes[:-1]
    gen_budget = budget - rec_steps
    if not len(gen_sizes) <= gen_budget <= sum(gen_sizes):
        raise ValueError(
            f"said steps (per-block budget) {budget} leaves {gen_budget} steps for "
            f"{len(gen_sizes)} generation stages of sizes {gen_sizes}; the budget must be in "
            f"[{len(gen_sizes) + rec_steps}, {sum(gen_sizes) + rec_steps}]"
        )
    weights = np.arange(len(gen_sizes), 0, -1, dtype=np.float64)
    shares = gen_budget * weights / weights.sum()
    steps = [1] * len(gen_sizes)
    for _ in range(gen_budget - len(gen_sizes)):
        room = [j for j in range(len(steps)) if steps[j] < gen_sizes[j]]
        j = max(room, key=lambda j: (shares[j] - steps[j], -j))
        steps[j] += 1
    return tuple(steps) + (rec_steps,)


def said_select(
    confidence: jnp.ndarray,
    masked: jnp.ndarray,
    stage_done: jnp.ndarray,
    *,
    stage_of: np.ndarray,
    steps_per_stage: jnp.ndarray,
    threshold: jnp.ndarray | None,
    chlg_threshold: jnp.ndarray | None,
    chlg_extra_steps: jnp.ndarray | None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One SAID (or SAID + CHLG) step: commit mask and the current stage per row.

    Each row works on its first stage (in decoding order) that still has
    masked positions; `stage_done[r, j]` counts the forwards row r has spent
    in stage j of this block.

    Args:
      confidence: [batch, B] float32.
      masked: [batch, B] bool, still-masked positions of rows taking this step.
      stage_done: [batch, K] int32 forwards spent per stage so far.
      stage_of: [B] static stage index of each position (`stage_partition`).
      steps_per_stage: [K] int32 step budget of each stage (`stage_steps`).
      threshold: scalar float32 dynamic threshold inside stages, or None for
        the static rule.
      chlg_threshold: scalar float32 tau for CHLG in the last stage, or None
        for plain SAID.
      chlg_extra_steps: scalar int32 extra steps after the CHLG pass.

    Returns:
      commit: [batch, B] bool, a subset of `masked`.
      stage: [batch] int32, the stage each row worked on (K - 1 when a row
        has no masked position left; callers gate on that).
    """
    num_stages = stage_done.shape[-1]
    in_stage = jnp.asarray(stage_of)[None, :] == jnp.arange(num_stages)[:, None]  # [K, B]
    sizes = jnp.sum(in_stage, axis=-1).astype(jnp.int32)  # [K]
    has_masked = jnp.any(masked[:, None, :] & in_stage[None], axis=-1)  # [batch, K]
    stage = jnp.where(
        jnp.any(has_masked, -1), jnp.argmax(has_masked, axis=-1), num_stages - 1
    ).astype(jnp.int32)
    eligible = masked & in_stage[stage]
    step = jnp.take_along_axis(stage_done, stage[:, None], axis=-1)[:, 0]
    count = strategies.step_count(step, steps_per_stage[stage], sizes[stage])
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
        remaining = jnp.sum(eligible, axis=-1)
        steps_left = jnp.maximum(chlg_extra_steps - (step - 1), 1)
        extra_count = -(-remaining // steps_left)
        extra_step = eligible & (rank < extra_count[:, None])
        chlg_commit = jnp.where((step == 0)[:, None], scoring_pass, extra_step)
        commit = jnp.where((stage == num_stages - 1)[:, None], chlg_commit, commit)
    return commit, stage
