"""Remasking strategies against plain-Python versions of spec §3.4-§3.5."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.decode import strategies
from sdar_jax.decode.decoder import DecodeConfig


def _inputs(seed, batch=16, length=8, ties=True):
    rng = np.random.default_rng(seed)
    confidence = rng.random((batch, length)).astype(np.float32)
    entropy = (rng.random((batch, length)) * 2).astype(np.float32)
    if ties:  # repeated values exercise the lowest-index-first tie break
        confidence = np.round(confidence * 4) / 4
        entropy = np.round(entropy * 4) / 4
    masked = rng.random((batch, length)) < 0.6
    count = rng.integers(1, length + 1, batch).astype(np.int32)
    return confidence, entropy, masked, count


def _run(name, confidence, entropy, masked, count, threshold=0.5, bound=1.0):
    x = strategies.StepInputs(
        jnp.asarray(confidence), jnp.asarray(entropy), jnp.asarray(masked), jnp.asarray(count),
        jnp.float32(threshold), jnp.float32(bound),
    )
    return np.asarray(strategies.STRATEGIES[name](x))


def _expected(name, conf, ent, masked, n, threshold=0.5, bound=1.0):
    cand = [i for i in range(len(conf)) if masked[i]]
    by_conf = sorted(cand, key=lambda i: (-conf[i], i))
    if name == "sequential":
        chosen = cand[:n]
    elif name == "low_confidence_static":
        chosen = by_conf[:n]
    elif name == "low_confidence_dynamic":
        above = [i for i in cand if conf[i] > threshold]
        chosen = above if len(above) >= n else by_conf[:n]
    else:
        chosen, total = [], 0.0
        for i in sorted(cand, key=lambda i: (ent[i], i)):
            if chosen and total + ent[i] > bound:
                break
            chosen.append(i)
            total += ent[i]
    out = np.zeros(len(conf), bool)
    out[chosen] = True
    return out


@pytest.mark.parametrize("name", sorted(strategies.STRATEGIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_python(name, seed):
    confidence, entropy, masked, count = _inputs(seed)
    got = _run(name, confidence, entropy, masked, count)
    for r in range(len(count)):
        want = _expected(name, confidence[r], entropy[r], masked[r], count[r])
        np.testing.assert_array_equal(got[r], want, err_msg=f"{name} row {r}")
    assert not np.any(got & ~masked), "committed a position that was not masked"


@pytest.mark.parametrize("name", sorted(strategies.STRATEGIES))
def test_more_requested_than_masked_commits_only_masked(name):
    # The released top-k picks decoded/prompt positions here and overwrites them.
    masked = np.array([[False, True, False, False, True, False, False, False]])
    confidence = np.array([[0.99, 0.1, 0.98, 0.97, 0.2, 0.96, 0.95, 0.94]], np.float32)
    entropy = np.full((1, 8), 0.01, np.float32)
    got = _run(name, confidence, entropy, masked, np.array([4], np.int32), threshold=0.9, bound=5.0)
    np.testing.assert_array_equal(got, masked)


def test_ties_break_by_lowest_position():
    confidence = np.full((1, 6), 0.5, np.float32)
    masked = np.array([[False, True, True, True, True, False]])
    entropy = np.full((1, 6), 0.3, np.float32)
    got = _run("low_confidence_static", confidence, entropy, masked, np.array([2], np.int32))
    np.testing.assert_array_equal(got[0], [False, True, True, False, False, False])
    got = _run("entropy_bounded", confidence, entropy, masked, np.array([1], np.int32), bound=0.65)
    np.testing.assert_array_equal(got[0], [False, True, True, False, False, False])


def test_dynamic_threshold_commits_more_than_count():
    confidence = np.array([[0.95, 0.2, 0.91, 0.3]], np.float32)
    masked = np.ones((1, 4), bool)
    got = _run("low_confidence_dynamic", confidence, confidence, masked, np.array([1], np.int32),
               threshold=0.9)
    np.testing.assert_array_equal(got[0], [True, False, True, False])
    got = _run("low_confidence_dynamic", confidence, confidence, masked, np.array([3], np.int32),
               threshold=0.9)
    np.testing.assert_array_equal(got[0], [True, False, True, True])


def test_entropy_bounded_commits_at_least_one():
    entropy = np.array([[3.0, 2.0, 4.0]], np.float32)
    got = _run("entropy_bounded", entropy, entropy, np.ones((1, 3), bool), np.array([1], np.int32),
               bound=0.1)
    np.testing.assert_array_equal(got[0], [False, True, False])


@pytest.mark.parametrize("length,steps", [(b, s) for b in (1, 2, 4, 8, 7) for s in range(1, b + 1)])
def test_step_count_schedule(length, steps):
    got = [int(strategies.step_count(s, steps, length)) for s in range(steps)]
    assert sum(got) == length
    extra = length % steps
    assert got == [length // steps + (1 if s < extra else 0) for s in range(steps)]
    assert int(strategies.step_count(steps, steps, length)) == length


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="low_confidence_dynamic"):
        DecodeConfig(strategy="top_k_margin")
