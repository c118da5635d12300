"""Adaptation aids of spec §2.7 against plain NumPy references: the shifted logits
convention, complementary masking, mixed B and the block-size schedule."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.diffusion import loss as loss_lib
from sdar_jax.diffusion import noise
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.train import config as run_config
from sdar_jax.train import step as step_lib

from tests.diffusion.test_loss import B, MASK_ID, fake_model, make_batch, np_log_softmax


def np_source(j, L, block, convention):
    """Index in the 2L row whose output predicts token j (spec §2.7, written out)."""
    if convention == "same_position":
        return j
    if j % block:
        return j - 1  # the noisy-half output one position to the left
    return L + j - 1  # the clean-half output at the end of the previous block


def np_sdar_loss(row_tokens, positions, x0, masked, p, params, block, convention, denominator):
    """The objective in loops: sum over masked j of CE(output at source(j), x0_j) / p_j."""
    logits = np.asarray(params["E"])[row_tokens] + np.asarray(params["P"])[positions]
    logp = np_log_softmax(logits)
    rows, L = x0.shape
    total = 0.0
    for b in range(rows):
        for j in range(L):
            if masked[b, j]:
                total -= logp[b, np_source(j, L, block, convention), x0[b, j]] / p[b, j]
    return total / denominator


def segment_starts(segment_ids):
    seg = np.asarray(segment_ids)
    return np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], 1)


@pytest.mark.parametrize("normalization", ["non_prompt", "masked"])
def test_shifted_loss_matches_numpy(normalization):
    batch = make_batch()
    batch["loss_mask"] = batch["segment_ids"] > 0  # pretraining rows: segment starts are maskable
    apply_fn, params, calls = fake_model()
    rng = jax.random.key(5)
    loss, metrics = loss_lib.sdar_loss(
        apply_fn, params, batch, rng, block_size=B, mask_token_id=MASK_ID,
        normalization=normalization, logits_convention="shifted")
    eligible = batch["loss_mask"] & ~segment_starts(batch["segment_ids"])
    noised = noise.noise_tokens(rng, batch["tokens"], eligible, batch["segment_ids"],
                                mask_token_id=MASK_ID)
    xt, masked, p = (np.asarray(a) for a in noised)
    L = batch["tokens"].shape[1]
    (call,) = calls
    assert call["logits_slice"] == (0, 2 * L)  # both halves' outputs are read
    row = np.concatenate([xt, batch["tokens"]], 1)
    np.testing.assert_array_equal(call["tokens"], row)
    assert not masked[segment_starts(batch["segment_ids"])].any()
    denominator = eligible.sum() if normalization == "non_prompt" else masked.sum()
    want = np_sdar_loss(row, np.tile(batch["positions"], 2), batch["tokens"], masked, p, params,
                        B, "shifted", denominator)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert int(metrics["num_loss_tokens"]) == eligible.sum()


def test_prediction_index():
    np.testing.assert_array_equal(loss_lib.prediction_index(8, 4, "same_position"), np.arange(8))
    # j = 0: unused; 1-3 from the noisy half; 4 from the clean half's position 3 (8 + 3).
    np.testing.assert_array_equal(loss_lib.prediction_index(8, 4, "shifted"),
                                  [0, 0, 1, 2, 11, 4, 5, 6])
    with pytest.raises(ValueError, match="logits convention"):
        loss_lib.prediction_index(8, 4, "next")


def _row_logits(config, params, xt, x0, block):
    L = x0.shape[1]
    positions = jnp.broadcast_to(jnp.arange(L), x0.shape)
    segments = jnp.ones(x0.shape, jnp.int32)
    tokens, row_pos, row_seg = noise.diffusion_row(xt, x0, positions, segments)
    return transformer.apply(config, params, tokens, row_pos,
                             mask=MaskSpec("block_diffusion", block), segment_ids=row_seg,
                             logits_slice=(0, 2 * L)).logits


@pytest.mark.parametrize("num_layers", [1, 2])
def test_shifted_first_position_reads_the_causal_context(num_layers):
    """The shifted first-in-block prediction comes from the clean half's last position of the
    previous block: it sees exactly tokens < j (the AR context). With one layer it equals the
    causal model's next-token logits; deeper, the earlier positions of that block also attend
    within the block, so only the context (not the function) is the AR one."""
    config = get_preset("tiny", num_layers=num_layers)
    params = transformer.init_params(config, jax.random.key(0))
    L, block = 16, 4
    x0 = jax.random.randint(jax.random.key(1), (2, L), 0, config.vocab_size - 1)
    xt = jnp.full_like(x0, config.mask_token_id)
    index = loss_lib.prediction_index(L, block, "shifted")
    firsts = np.arange(block, L, block)
    logits = _row_logits(config, params, xt, x0, block)
    if num_layers == 1:
        positions = jnp.broadcast_to(jnp.arange(L), (2, L))
        causal = transformer.apply(config, params, x0, positions, mask=MaskSpec("causal"),
                                   segment_ids=jnp.ones((2, L), jnp.int32)).logits
        np.testing.assert_allclose(logits[:, index[firsts]], causal[:, firsts - 1], atol=2e-5)
    for j in firsts:  # changing tokens >= j (clean and noisy) leaves the prediction of j alone
        changed = x0.at[:, j:].set((x0[:, j:] + 1) % (config.vocab_size - 1))
        other = _row_logits(config, params, xt.at[:, j:].set(changed[:, j:]), changed, block)
        np.testing.assert_allclose(other[:, index[j]], logits[:, index[j]], atol=2e-5)
        assert not np.allclose(other[:, index[j] + 1], logits[:, index[j] + 1], atol=1e-3)


def test_complementary_masks_cover_every_token_once():
    batch = make_batch()
    first, second = noise.complementary_noise(
        jax.random.key(2), batch["tokens"], batch["loss_mask"], batch["segment_ids"],
        mask_token_id=MASK_ID, eps=1e-3)
    m1, m2 = np.asarray(first.masked), np.asarray(second.masked)
    np.testing.assert_array_equal(m1 ^ m2, batch["loss_mask"])
    assert not (m1 & m2).any()
    np.testing.assert_allclose(np.asarray(first.p) + np.asarray(second.p), 1.0, rtol=1e-6)
    for nz in (first, second):
        np.testing.assert_array_equal(np.asarray(nz.xt)[np.asarray(nz.masked)], MASK_ID)
        clean = ~np.asarray(nz.masked)
        np.testing.assert_array_equal(np.asarray(nz.xt)[clean], batch["tokens"][clean])
    # One noise level per segment.
    p = np.asarray(first.p)
    seg = batch["segment_ids"]
    for b in range(seg.shape[0]):
        for s in set(seg[b]) - {0}:
            assert len(set(p[b][seg[b] == s])) == 1
    with pytest.raises(ValueError, match="eps"):
        noise.complementary_noise(jax.random.key(0), batch["tokens"], batch["loss_mask"],
                                  mask_token_id=MASK_ID, eps=0.5)


def test_complementary_mask_marginals():
    """Each copy's per-token mask rate is E[t] = 1/2, and given t the copies are Bernoulli(t)
    and Bernoulli(1 - t): the masked fraction of a segment tracks its p."""
    tokens = np.zeros((1, 4096), np.int32)
    loss_mask = np.ones((1, 4096), bool)
    rates, ps = [], []
    for i in range(40):
        first, _ = noise.complementary_noise(jax.random.key(i), tokens, loss_mask,
                                             mask_token_id=MASK_ID, eps=1e-3)
        rates.append(np.asarray(first.masked).mean())
        ps.append(float(first.p[0, 0]))
    np.testing.assert_allclose(rates, ps, atol=0.03)  # binomial sd at n=4096 is <= 0.008
    assert 0.35 < np.mean(ps) < 0.65


@pytest.mark.parametrize("convention", ["same_position", "shifted"])
@pytest.mark.parametrize("normalization", ["non_prompt", "masked"])
def test_complementary_loss_matches_numpy(convention, normalization):
    batch = make_batch()
    apply_fn, params, calls = fake_model()
    rng = jax.random.key(11)
    loss, metrics = loss_lib.sdar_loss(
        apply_fn, params, batch, rng, block_size=B, mask_token_id=MASK_ID,
        normalization=normalization, logits_convention=convention, complementary=True)
    eligible = np.asarray(batch["loss_mask"])
    if convention == "shifted":
        eligible = eligible & ~segment_starts(batch["segment_ids"])
    first, second = noise.complementary_noise(rng, batch["tokens"], eligible, batch["segment_ids"],
                                              mask_token_id=MASK_ID, eps=1e-3)
    (call,) = calls
    rows = batch["tokens"].shape[0]
    assert call["tokens"].shape[0] == 2 * rows  # both copies in one forward
    masked = [np.asarray(first.masked), np.asarray(second.masked)]
    p = [np.asarray(first.p), np.asarray(second.p)]
    denominator = (2 * eligible.sum() if normalization == "non_prompt"
                   else masked[0].sum() + masked[1].sum())
    want = 0.0
    for c, nz in enumerate((first, second)):
        row = np.concatenate([np.asarray(nz.xt), batch["tokens"]], 1)
        np.testing.assert_array_equal(call["tokens"][c * rows:(c + 1) * rows], row)
        want += np_sdar_loss(row, np.tile(batch["positions"], 2), batch["tokens"], masked[c], p[c],
                             params, B, convention, denominator)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert int(metrics["num_masked"]) == eligible.sum()  # every maskable token, exactly once


def run_cfg(**objective):
    config = run_config.base_config()
    config.model.preset = "tiny"
    config.objective.update(objective)
    return config


def test_block_sizes_from_config():
    model = get_preset("tiny")
    assert run_config.block_sizes(run_cfg(block_size=4), model) == (4,)
    assert run_config.block_sizes(run_cfg(mixed_block_sizes=(8, 4)), model) == (4, 8)
    assert run_config.block_sizes(
        run_cfg(block_size=8, block_schedule_start=2, block_schedule_steps=90), model) == (2, 4, 8)
    assert run_config.data_block_size(run_cfg(mixed_block_sizes=(4, 8)), model) == 8
    assert run_config.data_block_size(run_cfg(kind="ar", mixed_block_sizes=(4, 8)), model) == 1
    with pytest.raises(run_config.RunConfigError, match="doubling"):
        run_config.block_sizes(
            run_cfg(block_size=6, block_schedule_start=4, block_schedule_steps=9), model)
    with pytest.raises(run_config.RunConfigError, match="exclude each other"):
        run_config.block_sizes(run_cfg(mixed_block_sizes=(4, 8), block_schedule_start=4), model)
    with pytest.raises(run_config.RunConfigError, match="distinct positive"):
        run_config.block_sizes(run_cfg(mixed_block_sizes=(4, 4)), model)


def test_block_index_schedule_and_mix():
    idx = functools.partial(step_lib.block_index, rng=jax.random.key(0), mixed=False,
                            schedule_steps=90, num_sizes=3)
    assert [int(idx(s)) for s in (0, 29, 30, 59, 60, 89, 90, 10**6)] == [0, 0, 1, 1, 2, 2, 2, 2]
    draws = [int(step_lib.block_index(0, jax.random.key(i), num_sizes=2, mixed=True,
                                      schedule_steps=0)) for i in range(200)]
    assert set(draws) == {0, 1} and 70 < sum(draws) < 130


def test_mixed_loss_fn_runs_the_drawn_block_size():
    """The lax.switch loss equals sdar_loss at the block size block_index draws."""
    model = get_preset("tiny", num_layers=1)
    params = transformer.init_params(model, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    batch = {k: jnp.concatenate([v, v[:, :4]], 1) for k, v in batch.items()}  # length 32
    config = run_cfg(mixed_block_sizes=(4, 8))
    loss_fn = jax.jit(step_lib.make_loss_fn(config, model))
    apply_fn = functools.partial(transformer.apply, model)
    seen = set()
    for i in range(6):
        rng = jax.random.key(i)
        choice, noise_rng = jax.random.split(rng)
        k = int(step_lib.block_index(0, choice, num_sizes=2, mixed=True, schedule_steps=0))
        want, _ = loss_lib.sdar_loss(apply_fn, params, batch, noise_rng, block_size=(4, 8)[k],
                                     mask_token_id=model.mask_token_id)
        got, _ = loss_fn(params, batch, rng, 0)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        seen.add(k)
    assert seen == {0, 1}


def test_run_config_rejects_complementary_with_large_eps():
    config = run_cfg(complementary_masking=True, eps=0.5)
    config.data.seq_len = 32
    with pytest.raises(run_config.RunConfigError, match="complementary_masking"):
        run_config.validate(config, get_preset("tiny"))
    assert isinstance(config, ml_collections.ConfigDict)


@pytest.mark.parametrize("convention", ["same_position", "shifted"])
def test_distillation_term_matches_numpy(convention):
    batch = make_batch()
    apply_fn, params, _ = fake_model()
    teacher_table = np.random.default_rng(9).normal(size=(23, 23)).astype(np.float32)

    def teacher_fn(tokens, positions, segment_ids):
        return jnp.asarray(teacher_table)[tokens] + 0.1 * positions[..., None]

    rng, weight = jax.random.key(13), 0.7
    kwargs = dict(block_size=B, mask_token_id=MASK_ID, logits_convention=convention)
    plain, _ = loss_lib.sdar_loss(apply_fn, params, batch, rng, **kwargs)
    loss, metrics = loss_lib.sdar_loss(apply_fn, params, batch, rng, teacher_fn=teacher_fn,
                                       distill_weight=weight, **kwargs)
    eligible = np.asarray(batch["loss_mask"])
    if convention == "shifted":
        eligible = eligible & ~segment_starts(batch["segment_ids"])
    nz = noise.noise_tokens(rng, batch["tokens"], eligible, batch["segment_ids"],
                            mask_token_id=MASK_ID)
    xt, masked = np.asarray(nz.xt), np.asarray(nz.masked)
    x0, seg = batch["tokens"], batch["segment_ids"]
    L = x0.shape[1]
    row = np.concatenate([xt, x0], 1)
    student = np_log_softmax(np.asarray(params["E"])[row]
                             + np.asarray(params["P"])[np.tile(batch["positions"], 2)])
    teacher = np.asarray(teacher_fn(x0, batch["positions"], seg))
    extra = 0.0
    for b in range(x0.shape[0]):
        for j in range(1, L):
            start = j - j % B
            if masked[b, j] and not masked[b, start:j].any() and seg[b, j - 1] == seg[b, j]:
                t = np.exp(np_log_softmax(teacher[b, j - 1]))
                extra -= (t * student[b, np_source(j, L, B, convention)]).sum()
    np.testing.assert_allclose(loss - plain, weight * extra / eligible.sum(), rtol=1e-4)
    assert float(metrics["ce"]) > 0
    np.testing.assert_array_equal(
        loss_lib.left_clean_masked(jnp.asarray([[1, 0, 1, 1, 0, 1, 0, 0]], bool), 4),
        [[True, False, False, False, False, True, False, False]])


@pytest.mark.parametrize("normalization", ["non_prompt", "masked"])
def test_ar_term_matches_numpy(normalization):
    """ar_weight adds the clean half's next-token CE over every eligible token, unweighted."""
    batch = make_batch()
    apply_fn, params, calls = fake_model()
    rng, weight = jax.random.key(17), 0.6
    kwargs = dict(block_size=B, mask_token_id=MASK_ID, normalization=normalization,
                  logits_convention="shifted", block_attention="causal")
    plain, _ = loss_lib.sdar_loss(apply_fn, params, batch, rng, **kwargs)
    loss, metrics = loss_lib.sdar_loss(apply_fn, params, batch, rng, ar_weight=weight, **kwargs)
    assert calls[-1]["mask"] == MaskSpec("block_diffusion", B, causal_in_block=True)
    x0, seg = batch["tokens"], batch["segment_ids"]
    eligible = np.asarray(batch["loss_mask"]) & ~segment_starts(seg)
    nz = noise.noise_tokens(rng, x0, eligible, seg, mask_token_id=MASK_ID)
    L = x0.shape[1]
    row = np.concatenate([np.asarray(nz.xt), x0], 1)
    logp = np_log_softmax(np.asarray(params["E"])[row]
                          + np.asarray(params["P"])[np.tile(batch["positions"], 2)])
    ar_total, count = 0.0, 0
    for b in range(x0.shape[0]):
        for j in range(1, L):
            if eligible[b, j]:  # the clean output one position to the left predicts x0[j]
                ar_total -= logp[b, L + j - 1, x0[b, j]]
                count += 1
    denominator = count if normalization == "non_prompt" else np.asarray(nz.masked).sum()
    np.testing.assert_allclose(loss - plain, weight * ar_total / denominator, rtol=1e-4)
    np.testing.assert_allclose(metrics["ar_ce"], ar_total / count, rtol=1e-5)


def test_ar_term_needs_shifted_and_causal_blocks():
    batch = make_batch()
    apply_fn, params, _ = fake_model()
    for convention, attention in [("shifted", "bidirectional"), ("same_position", "causal")]:
        with pytest.raises(ValueError, match="ar_weight 0.5 needs logits_convention 'shifted'"):
            loss_lib.sdar_loss(apply_fn, params, batch, jax.random.key(0), block_size=B,
                               mask_token_id=MASK_ID, logits_convention=convention,
                               block_attention=attention, ar_weight=0.5)
    config = run_cfg()
    config.objective.ar_loss_weight = 0.5
    config.data.seq_len = 32
    with pytest.raises(run_config.RunConfigError, match="objective.ar_loss_weight"):
        run_config.validate(config, get_preset("tiny"))
    run_config.validate(config, get_preset("tiny").replace(
        logits_convention="shifted", block_attention="causal"))
