"""SAID stage partition and step-budget split (spec §4.1-4.2), enumerated."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.decode import said, strategies

CASES = list(itertools.product((4, 8, 16, 32), (1, 2, 3)))


@pytest.mark.parametrize("block_length,num_stages", CASES)
def test_partition_follows_the_checkerboard_rule(block_length, num_stages):
    stage = said.stage_partition(block_length, num_stages)
    # Rule: U_k = {p : lowest set bit of p is bit k-1} for k < K; the rest is R.
    for p in range(block_length):
        low_bit = next((k for k in range(1, num_stages) if p % 2**k == 2 ** (k - 1)), None)
        want = 0 if low_bit is None else num_stages - low_bit
        assert stage[p] == want, (p, stage.tolist())
    sizes = said.stage_sizes(block_length, num_stages)
    assert sum(sizes) == block_length
    if num_stages >= 2:
        assert sizes[-1] == block_length // 2  # the odd positions: the details
        assert sizes[0] == block_length // 2 ** (num_stages - 1)  # the scaffold grid


def test_partition_examples():
    assert said.stage_partition(8, 1).tolist() == [0] * 8
    assert said.stage_partition(8, 2).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert said.stage_partition(8, 3).tolist() == [0, 2, 1, 2, 0, 2, 1, 2]
    assert said.stage_partition(16, 3).tolist()[:8] == [0, 2, 1, 2, 0, 2, 1, 2]


def test_partition_rejects_empty_stages():
    with pytest.raises(ValueError, match="num_stages=4"):
        said.stage_partition(4, 4)  # U_3 = {4} is outside a block of 4


def _budgets(block_length, num_stages):
    sizes = said.stage_sizes(block_length, num_stages)
    for budget in range(1, block_length + 1):
        for rec in range(1, sizes[-1] + 1):
            yield budget, rec


@pytest.mark.parametrize("block_length,num_stages", CASES)
def test_step_split_rules(block_length, num_stages):
    sizes = said.stage_sizes(block_length, num_stages)
    valid = 0
    for budget, rec in _budgets(block_length, num_stages):
        feasible = (
            1 <= budget <= block_length
            if num_stages == 1
            else num_stages - 1 <= budget - rec <= sum(sizes[:-1])
        )
        if not feasible:
            with pytest.raises(ValueError, match="said"):
                said.stage_steps(block_length, num_stages, budget, rec)
            continue
        valid += 1
        steps = said.stage_steps(block_length, num_stages, budget, rec)
        assert sum(steps) == budget
        assert all(1 <= s <= size for s, size in zip(steps, sizes)), (steps, sizes)
        if num_stages == 1:
            assert steps == (budget,)
            continue
        assert steps[-1] == rec
        gen, gen_sizes = steps[:-1], sizes[:-1]
        # Linearly decreasing where the sizes allow: a later stage has more
        # steps than an earlier one only when the earlier one is full.
        for j in range(len(gen) - 1):
            assert gen[j] >= gen[j + 1] or gen[j] == gen_sizes[j], (gen, gen_sizes)
    assert valid > 0


def test_step_split_examples():
    # B=16, K=3: stages R(4), U_2(4), U_1(8); budget 8, 2 reconstruction steps:
    # the 6 generation steps split 2:1.
    assert said.stage_steps(16, 3, 8, 2) == (4, 2, 2)
    assert said.stage_steps(32, 3, 10, 1) == (6, 3, 1)
    assert said.stage_steps(8, 2, 5, 1) == (4, 1)
    # CHLG's reconstruction stage may take more steps than it has positions.
    assert said.stage_steps(4, 2, 6, 4, rec_capped=False) == (2, 4)


def test_k1_selection_is_low_confidence_static():
    rng = np.random.default_rng(0)
    for block_length in (4, 8, 16):
        stage_of = said.stage_partition(block_length, 1)
        for steps in range(1, block_length + 1):
            for step in range(steps):
                confidence = jnp.asarray(np.round(rng.random((6, block_length)), 1), jnp.float32)
                masked = jnp.asarray(rng.random((6, block_length)) < 0.7)
                stage_done = jnp.full((6, 1), step, jnp.int32)
                got, _ = said.said_select(
                    confidence, masked, stage_done, stage_of=stage_of,
                    steps_per_stage=jnp.array([steps], jnp.int32), threshold=None,
                    chlg_threshold=None, chlg_extra_steps=None,
                )
                count = strategies.step_count(step, steps, block_length)
                want = strategies.low_confidence_static(strategies.StepInputs(
                    confidence, confidence, masked, jnp.full((6,), count), jnp.float32(0),
                    jnp.float32(0),
                ))
                np.testing.assert_array_equal(got, want)


def test_selection_stays_in_the_current_stage():
    # B=8, K=3: stage 0 = {0, 4}; row 0 has both masked, row 1 only the details.
    masked = jnp.array([[True] * 8, [False, True, False, True, False, True, False, True]])
    confidence = jnp.asarray(np.linspace(0.1, 0.9, 16).reshape(2, 8), jnp.float32)
    commit, stage = said.said_select(
        confidence, masked, jnp.zeros((2, 3), jnp.int32), stage_of=said.stage_partition(8, 3),
        steps_per_stage=jnp.array([2, 1, 1], jnp.int32), threshold=None,
        chlg_threshold=None, chlg_extra_steps=None,
    )
    assert stage.tolist() == [0, 2]
    np.testing.assert_array_equal(commit[0], [False, False, False, False, True, False, False, False])
    np.testing.assert_array_equal(commit[1], [False, True, False, True, False, True, False, True])


def test_chlg_commits_confident_at_once_then_spreads_the_rest():
    stage_of = said.stage_partition(8, 2)  # details = odd positions
    masked = jnp.array([[False, True, False, True, False, True, False, True]])
    confidence = jnp.array([[0.0, 0.85, 0.0, 0.3, 0.0, 0.95, 0.0, 0.5]], jnp.float32)
    kwargs = dict(stage_of=stage_of, steps_per_stage=jnp.array([3, 4], jnp.int32), threshold=None,
                  chlg_threshold=jnp.float32(0.8), chlg_extra_steps=jnp.int32(3))
    commit, _ = said.said_select(confidence, masked, jnp.array([[3, 0]], jnp.int32), **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 1, 0, 0, 0, 1, 0, 0])
    # Nothing above tau: still commits the most confident one.
    low = confidence * 0.5
    commit, _ = said.said_select(low, masked, jnp.array([[3, 0]], jnp.int32), **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 0, 0, 0, 0, 1, 0, 0])
    # Extra steps: 4 left over 3 steps -> ceil(4/3) = 2 most confident first.
    commit, _ = said.said_select(low, masked, jnp.array([[3, 1]], jnp.int32), **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 1, 0, 0, 0, 1, 0, 0])
