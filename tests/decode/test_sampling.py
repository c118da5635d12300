"""Proposals, confidences and entropies against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.decode import sampling


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits(seed, shape=(3, 5, 40), scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_greedy_is_argmax_with_unfiltered_confidence():
    logits = _logits(0)
    tokens, confidence, entropy = sampling.propose(jnp.asarray(logits), None, temperature=None,
                                                   top_k=1)
    probs = _softmax(logits)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    # Not 1 despite top_k=1: confidence comes from the unfiltered softmax.
    np.testing.assert_allclose(confidence, probs.max(-1), rtol=1e-5)
    assert float(np.max(confidence)) < 0.999
    np.testing.assert_allclose(entropy, -(probs * np.log(probs)).sum(-1), rtol=1e-5)


def test_top_k_filter_keeps_k_largest():
    logits = _logits(1)
    got = np.asarray(sampling.filter_top_k(jnp.asarray(logits), 5))
    kth = np.sort(logits, -1)[..., -5][..., None]
    np.testing.assert_array_equal(np.isfinite(got), logits >= kth)
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[logits >= kth])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_filter_keeps_smallest_nucleus(top_p):
    logits = _logits(2)
    got = np.isfinite(np.asarray(sampling.filter_top_p(jnp.asarray(logits), top_p)))
    probs = _softmax(logits)
    for idx in np.ndindex(*logits.shape[:-1]):
        order = np.argsort(-probs[idx], kind="stable")
        keep, mass = set(), 0.0
        for t in order:
            if mass >= top_p:
                break
            keep.add(int(t))
            mass += probs[idx][t]
        assert set(np.flatnonzero(got[idx]).tolist()) == keep, idx


def test_sampling_follows_the_filtered_distribution():
    logits = np.array([[[2.0, 1.0, 0.5, -1.0, -3.0]]], np.float32)
    keys = jax.random.split(jax.random.key(0), 20000)
    tokens, confidence, _ = jax.vmap(
        lambda key: sampling.propose(jnp.asarray(logits), key[None], temperature=0.7, top_k=3)
    )(keys)
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=5) / keys.shape[0]
    want = _softmax(logits[0, 0, :3] / 0.7)
    np.testing.assert_allclose(counts[:3], want, atol=0.015)
    assert counts[3:].sum() == 0
    # Confidence: probability under the unfiltered tempered softmax.
    full = _softmax(logits[0, 0] / 0.7)
    np.testing.assert_allclose(np.asarray(confidence).ravel(), full[np.asarray(tokens).ravel()], rtol=1e-5)


def test_per_row_keys_make_rows_independent():
    logits = jnp.asarray(_logits(3, (2, 4, 40), scale=0.5))
    keys = jax.random.split(jax.random.key(7), 2)
    both = sampling.propose(logits, keys, temperature=1.0, top_p=0.9)[0]
    alone = sampling.propose(logits[1:], keys[1:], temperature=1.0, top_p=0.9)[0]
    np.testing.assert_array_equal(both[1:], alone)


def test_greedy_ignores_keys_and_sampling_needs_them():
    logits = jnp.asarray(_logits(4))
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(sampling.propose(logits, keys, temperature=None)[0],
                                  sampling.propose(logits, None, temperature=None)[0])
    with pytest.raises(ValueError, match="keys"):
        sampling.propose(logits, None, temperature=1.0)
