"""Log-likelihoods against brute force: AR prefix by prefix, the block-diffusion ELBO over every mask.

The references run the model without the `[xt ; x0]` row: for block b, the
clean blocks before it followed by block b with mask m, under the
block-causal mask (what decoding sees; the causal mask for a model with causal
blocks), and the output at j (same_position)
or j - 1 (shifted; for the first position of a block that is the last clean
position of the previous block, the AR prediction) scores position j.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.eval import loglikelihood as ll
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

B = 4
MASK = 4
CONTEXT = [7, 12, 30]  # block 0 holds the context and one continuation position
CONTINUATION = [41, 9, 55, 23, 17]  # positions 3..7: n = 1 in block 0, 4 in block 1


def _model(convention: str = "same_position", block_attention: str = "bidirectional"):
    cfg = get_preset("tiny", vocab_size=64, num_layers=1, mask_token_id=MASK, block_size=B,
                     max_position_embeddings=64, logits_convention=convention,
                     block_attention=block_attention)
    params = transformer.init_params(cfg, jax.random.key(3))
    # Sharper predictions than the init's, so that a wrong mask or shift moves the numbers.
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    return cfg, params


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("cfg", "mask"))
def _apply(cfg, params, tokens, mask):
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return transformer.apply(cfg, params, tokens, positions, mask=mask).logits[0]


def _logits(cfg, params, tokens, mask):
    """[len(tokens), vocab] float64 logits of one unpadded row."""
    return np.asarray(_apply(cfg, params, jnp.asarray([tokens], jnp.int32), mask), np.float64)


def _rows(pairs, seq):
    return ll._row_arrays(pairs, len(pairs), seq, pad_id=0)


# ---- AR ---------------------------------------------------------------------------------------

def test_ar_scores_equal_prefix_by_prefix_forwards():
    cfg, params = _model()
    requests = [(CONTEXT, CONTINUATION), ([5], [6, 7]), (CONTEXT + CONTINUATION, [3])]
    expected, greedy = [], []
    for context, continuation in requests:
        ids = list(context) + list(continuation)
        total, hits = 0.0, True
        for j in range(len(context), len(ids)):
            # The prefix alone (padded to one shape: the causal mask hides the padding).
            logits = _logits(cfg, params, ids[:j] + [0] * (16 - j), MaskSpec("causal"))[j - 1]
            total += _log_softmax(logits)[ids[j]]
            hits &= int(np.argmax(logits)) == ids[j]
        expected.append(total)
        greedy.append(hits)
    settings = ll.LikelihoodSettings(mode="ar", batch_size=2)
    scores = ll.score_requests(params, cfg, requests, settings)
    np.testing.assert_allclose([s.logprob for s in scores], expected, rtol=1e-5, atol=1e-5)
    assert [s.is_greedy for s in scores] == greedy
    assert all(s.stderr == 0.0 for s in scores)
    # A request that is all argmax: continue the context greedily, then check is_greedy.
    ids = list(CONTEXT)
    for _ in range(3):
        logits = _logits(cfg, params, ids + [0] * (16 - len(ids)), MaskSpec("causal"))
        ids.append(int(np.argmax(logits[len(ids) - 1])))
    (score,) = ll.score_requests(params, cfg, [(CONTEXT, ids[3:])], settings)
    assert score.is_greedy


# ---- diffusion: the exact ELBO ------------------------------------------------------------------

def _subsets(positions):
    for size in range(1, len(positions) + 1):
        yield from itertools.combinations(positions, size)


def _brute_force_elbo(cfg, params, context, continuation):
    """sum_b sum_{m != {}} S(m) / (|m| C(n_b, |m|)), one reference forward per mask."""
    x0 = list(context) + list(continuation)
    shifted = cfg.logits_convention == "shifted"
    # Causal blocks: every position sees only the positions before it, masked or not.
    mask = MaskSpec("causal") if cfg.block_attention == "causal" else MaskSpec("block_causal", B)
    total = 0.0
    for start in range(0, len(x0), B):
        end = min(start + B, len(x0))
        eligible = [j for j in range(start, end) if j >= len(context)]
        n = len(eligible)
        for m in _subsets(eligible):
            tokens = x0[:start] + [MASK if j in m else x0[j] for j in range(start, end)]
            logp = _log_softmax(_logits(cfg, params, tokens, mask))
            s = sum(logp[j - 1 if shifted else j][x0[j]] for j in m)
            total += s / (len(m) * math.comb(n, len(m)))
    return total


@pytest.mark.parametrize("convention,block_attention", [
    ("same_position", "bidirectional"), ("shifted", "bidirectional"), ("shifted", "causal")])
def test_elbo_expectation_equals_brute_force_over_every_mask(convention, block_attention):
    cfg, params = _model(convention, block_attention)
    exact = _brute_force_elbo(cfg, params, CONTEXT, CONTINUATION)
    # The sampler draws block b's mask m with probability 1 / (n_b C(n_b, |m|)); the estimator
    # is additive over blocks, so its mean is sum_b sum_m P(m) * (its block-b term under m).
    length = len(CONTEXT) + len(CONTINUATION)
    masks, probs = [], []
    for start in range(0, length, B):
        eligible = [j for j in range(start, min(start + B, length)) if j >= len(CONTEXT)]
        for m in _subsets(eligible):
            masks.append([j in m for j in range(8)])
            probs.append(1.0 / (len(eligible) * math.comb(len(eligible), len(m))))
    rows = _rows([(CONTEXT, CONTINUATION)] * len(masks), 8)
    terms, _ = ll.diffusion_scores(params, rows, jnp.asarray(masks), config=cfg, block_size=B)
    mean = float(np.dot(probs, np.asarray(terms, np.float64)))
    assert mean == pytest.approx(exact, rel=1e-5, abs=1e-5)
    # The Monte-Carlo estimate agrees within its own error bars.
    settings = ll.LikelihoodSettings(mode="diffusion", block_length=B, mc_samples=64, batch_size=32)
    (score,) = ll.score_requests(params, cfg, [(CONTEXT, CONTINUATION)], settings)
    assert 0 < score.stderr < 0.5 * abs(exact)
    assert abs(score.logprob - exact) < 4 * score.stderr


def test_greedy_flag_reads_the_fully_masked_prediction():
    cfg, params = _model()
    # All of block 1 masked after the clean block 0: the argmax at each position.
    logits = _logits(cfg, params, [7, 12, 30, 41] + [MASK] * 4, MaskSpec("block_causal", B))
    argmax = [int(t) for t in np.argmax(logits[4:], -1)]
    settings = ll.LikelihoodSettings(mode="diffusion", block_length=B, mc_samples=1)
    hit, miss = ll.score_requests(params, cfg, [([7, 12, 30, 41], argmax),
                                                ([7, 12, 30, 41], argmax[:3] + [argmax[3] + 1])],
                                  settings)
    assert hit.is_greedy and not miss.is_greedy


def test_sampled_masks_follow_the_elbo_distribution():
    rows = _rows([(CONTEXT, CONTINUATION)], 8)
    draws = 6000
    keys = jax.random.split(jax.random.key(0), draws)
    masks = np.asarray(jax.vmap(lambda k: ll.sample_block_masks(k[None], rows, B)[0])(keys))
    assert not masks[:, :3].any()  # the context is never masked
    assert masks[:, 3].all()  # block 0's single continuation position always is
    counts = {}
    for m in masks[:, 4:]:
        counts[tuple(m)] = counts.get(tuple(m), 0) + 1
    assert len(counts) == 15  # every non-empty subset of block 1 occurs, the empty one never
    for m, count in counts.items():
        p = 1.0 / (4 * math.comb(4, sum(m)))
        assert abs(count / draws - p) < 5 * math.sqrt(p * (1 - p) / draws), (m, count)


def test_request_errors_name_the_request():
    cfg, params = _model()
    settings = ll.LikelihoodSettings(mode="ar")
    with pytest.raises(ValueError, match="request 1: empty continuation"):
        ll.score_requests(params, cfg, [([1], [2]), ([1], [])], settings)
    with pytest.raises(ValueError, match="request 0: context 60 \\+ continuation 10 tokens exceed"):
        ll.score_requests(params, cfg, [([1] * 60, [2] * 10)], settings)
    with pytest.raises(ValueError, match="needs a checkpoint with mask_token_id"):
        ll.score_requests(params, cfg.replace(mask_token_id=None), [([1], [2])],
                          ll.LikelihoodSettings(mode="diffusion"))
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1"):
        ll.LikelihoodSettings(mc_samples=0)
