"""The SDAR forward process and the [xt ; x0] row (spec §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.diffusion import noise
from sdar_jax.ops.masks import MaskSpec, dense_mask

MASK_ID = 99


def packed_row(lengths, prompt_lengths, seq_len, first_token=10):
    """A packed row (numpy): segments 1.. of the given lengths, prompts at their start, padding 0."""
    tokens = np.zeros(seq_len, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    loss_mask = np.zeros(seq_len, bool)
    at = 0
    for i, (n, n_prompt) in enumerate(zip(lengths, prompt_lengths)):
        tokens[at:at + n] = first_token + np.arange(n) + 7 * i
        seg[at:at + n] = i + 1
        pos[at:at + n] = np.arange(n)
        loss_mask[at + n_prompt:at + n] = True
        at += n
    assert at <= seq_len
    return tokens, seg, pos, loss_mask


def stack_rows(rows):
    return tuple(np.stack(parts) for parts in zip(*rows))


def test_segment_bounds():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    start, end = noise.segment_bounds(seg)
    np.testing.assert_array_equal(start, [[0, 0, 2, 2, 2, 5, 5], [0] * 7])
    np.testing.assert_array_equal(end, [[1, 1, 4, 4, 4, 6, 6], [6] * 7])


def explicit_rule(q, k, L, pos, seg, B):
    """Spec §2.3 written out, for the 2L row; q, k index the row."""
    if seg[q % L] != seg[k % L]:
        return False
    q_noisy, k_noisy = q < L, k < L
    bq, bk = pos[q % L] // B, pos[k % L] // B
    if q_noisy and k_noisy:
        return bq == bk
    if q_noisy and not k_noisy:
        return bk < bq
    if not q_noisy and not k_noisy:
        return bk <= bq
    return False  # clean q -> noisy k


def test_block_diffusion_mask_matches_enumeration():
    B, L = 4, 28
    tokens, seg, pos, loss_mask = packed_row([8, 12, 4], [4, 0, 0], L)
    tokens2, pos2, seg2 = noise.diffusion_row(
        jnp.asarray(tokens)[None], jnp.asarray(tokens)[None], jnp.asarray(pos)[None],
        jnp.asarray(seg)[None])
    np.testing.assert_array_equal(pos2[0], np.concatenate([pos, pos]))
    np.testing.assert_array_equal(seg2[0], np.concatenate([seg, seg]))
    got = np.asarray(dense_mask(MaskSpec("block_diffusion", B), pos2, pos2, seg2, seg2))[0]
    want = np.array([[explicit_rule(q, k, L, pos, seg, B) for k in range(2 * L)]
                     for q in range(2 * L)])
    np.testing.assert_array_equal(got, want)
    # The enumeration is not vacuous: every rule fires somewhere.
    assert want[:L, :L].any() and want[:L, L:].any() and want[L:, L:].any()
    assert not want[L:, :L].any()


def test_diffusion_row_layout():
    xt = jnp.array([[5, 99, 7, 99]])
    x0 = jnp.array([[5, 6, 7, 8]])
    pos = jnp.array([[0, 1, 0, 1]])
    seg = jnp.array([[1, 1, 2, 2]])
    tokens2, pos2, seg2 = noise.diffusion_row(xt, x0, pos, seg)
    np.testing.assert_array_equal(tokens2, [[5, 99, 7, 99, 5, 6, 7, 8]])
    np.testing.assert_array_equal(pos2, [[0, 1, 0, 1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(seg2, [[1, 1, 2, 2, 1, 1, 2, 2]])
    with pytest.raises(ValueError, match="share one"):
        noise.diffusion_row(xt, x0[:, :2], pos, seg)


@pytest.fixture(scope="module")
def packed_batch():
    rows = [
        packed_row([8, 4, 12, 4], [4, 0, 8, 4], 32),   # last segment is all prompt
        packed_row([4, 4, 4, 4, 8], [0, 3, 0, 0, 0], 28 + 4),
        packed_row([32], [0], 32),
    ]
    return stack_rows(rows)


@pytest.mark.parametrize("max_tries", [1, 10])
def test_invariants_over_many_draws(packed_batch, max_tries):
    tokens, seg, pos, loss_mask = packed_batch
    draw = jax.jit(jax.vmap(
        lambda key: noise.noise_tokens(key, tokens, loss_mask, seg, mask_token_id=MASK_ID,
                                       max_tries=max_tries)))
    out = draw(jax.random.split(jax.random.key(0), 400))
    xt, masked, p = (np.asarray(a) for a in out)
    # Only eligible tokens are masked; xt is x0 with the mask token exactly there.
    assert not (masked & ~loss_mask).any()
    np.testing.assert_array_equal(xt, np.where(masked, MASK_ID, tokens[None]))
    for b in range(tokens.shape[0]):
        for s in np.unique(seg[b]):
            cols = seg[b] == s
            eligible = loss_mask[b, cols]
            n_masked = masked[:, b, cols].sum(-1)
            if eligible.any():
                assert (n_masked >= 1).all(), (b, s)
            else:
                assert (n_masked == 0).all(), (b, s)
            # One noise level per segment, in [eps, 1].
            seg_p = p[:, b, cols]
            np.testing.assert_array_equal(seg_p, seg_p[:, :1].repeat(cols.sum(), 1))
            assert (seg_p >= noise.DEFAULT_EPS).all() and (seg_p <= 1.0).all()
    # Different segments get different noise levels.
    assert not np.allclose(p[:, 0, 4], p[:, 0, 8])


def sequential_reference(key, tokens, loss_mask, seg, max_tries, eps=noise.DEFAULT_EPS):
    """The release's resample-then-force loop, run per segment in Python on the same draws."""
    shape = (max_tries, *tokens.shape)
    t_rng, mask_rng, force_rng = jax.random.split(key, 3)
    u_t = np.asarray(jax.random.uniform(t_rng, shape, jnp.float32))
    u_m = np.asarray(jax.random.uniform(mask_rng, shape, jnp.float32))
    masked = np.zeros(tokens.shape, bool)
    p_out = np.zeros(tokens.shape, np.float32)
    num_forced = 0
    for b in range(tokens.shape[0]):
        bounds = np.flatnonzero(np.diff(seg[b], prepend=-1, append=-1))
        for start, stop in zip(bounds[:-1], bounds[1:]):
            eligible = loss_mask[b, start:stop]
            for k in range(max_tries):
                p = np.float32(1.0 - eps) * u_t[k, b, start] + np.float32(eps)
                cand = (u_m[k, b, start:stop] < p) & eligible
                if cand.any():
                    break
            p_out[b, start:stop] = p
            if not cand.any() and eligible.any():
                n = int(eligible.sum())
                r_all = np.asarray(jax.random.randint(force_rng, tokens.shape, 0,
                                                      np.maximum(n, 1)))
                cand[np.flatnonzero(eligible)[r_all[b, start]]] = True
                num_forced += 1
            masked[b, start:stop] = cand
    return masked, p_out, num_forced


@pytest.mark.parametrize("max_tries", [1, 3])
def test_equals_sequential_resampling(packed_batch, max_tries):
    tokens, seg, pos, loss_mask = packed_batch
    fn = jax.jit(lambda key: noise.noise_tokens(key, tokens, loss_mask, seg, mask_token_id=MASK_ID,
                                                max_tries=max_tries))
    forced_seen = 0
    for i in range(12):
        key = jax.random.key(100 + i)
        out = fn(key)
        want_masked, want_p, num_forced = sequential_reference(key, tokens, loss_mask, seg,
                                                               max_tries)
        np.testing.assert_array_equal(np.asarray(out.masked), want_masked)
        np.testing.assert_allclose(np.asarray(out.p)[loss_mask], want_p[loss_mask], rtol=1e-6)
        forced_seen += num_forced
    assert forced_seen > 0  # the forcing path was exercised


@pytest.mark.parametrize("max_tries", [1, 10])
def test_noise_rate_matches_p(max_tries):
    # All-eligible segments of n tokens: the masked count is Binomial(n, p) given p, then
    # either forced to 1 when empty (max_tries=1) or, with resampling, conditioned on >= 1.
    n_seg, n, rows, keys = 16, 32, 4, 256
    eps = noise.DEFAULT_EPS
    tokens = np.ones((rows, n_seg * n), np.int32)
    seg = np.repeat(np.arange(1, n_seg + 1), n)[None].repeat(rows, 0).astype(np.int32)
    loss_mask = np.ones_like(tokens, bool)
    draw = jax.jit(jax.vmap(lambda key: noise.noise_tokens(
        key, tokens, loss_mask, seg, mask_token_id=MASK_ID, max_tries=max_tries)))
    out = draw(jax.random.split(jax.random.key(1), keys))
    frac = np.asarray(out.masked).reshape(-1, n, ).mean(-1)
    p = np.asarray(out.p).reshape(-1, n)[:, 0].astype(np.float64)
    count = p.size  # 16384 segments
    empty = (1 - p) ** n
    if max_tries == 1:
        expected_frac = p + empty / n
        density = np.ones_like  # p ~ U(eps, 1)
    else:
        expected_frac = p / (1 - empty)
        density = lambda x: 1 - (1 - x) ** n  # noqa: E731  (t is resampled while empty)
    # E[frac | p]: the residual mean is ~N(0, sigma), sigma = sqrt(E[var]/count) < 2e-4.
    residual = frac - expected_frac
    assert abs(residual.mean()) < 1e-3
    for part in (p < 0.3, p > 0.7):
        assert abs(residual[part].mean()) < 2e-3
    # The distribution of p: compare the CDF with the expected one (Kolmogorov-Smirnov).
    grid = np.linspace(eps, 1.0, 20001)
    cdf = np.cumsum(density(grid))
    cdf /= cdf[-1]
    empirical = np.searchsorted(np.sort(p), grid, side="right") / count
    assert np.abs(empirical - cdf).max() < 2.0 / np.sqrt(count)  # alpha ~ 1e-3
    assert p.min() >= eps


def test_bad_arguments():
    tokens = jnp.zeros((2, 8), jnp.int32)
    mask = jnp.ones((2, 8), bool)
    with pytest.raises(ValueError, match="eps"):
        noise.noise_tokens(jax.random.key(0), tokens, mask, mask_token_id=1, eps=0.0)
    with pytest.raises(ValueError, match="max_tries"):
        noise.noise_tokens(jax.random.key(0), tokens, mask, mask_token_id=1, max_tries=0)
    with pytest.raises(ValueError, match="loss_mask"):
        noise.noise_tokens(jax.random.key(0), tokens, mask[:, :4], mask_token_id=1)
