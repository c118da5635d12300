"""The SDAR loss and the AR loss against NumPy references; gradient isolation on the tiny model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.diffusion import loss as loss_lib
from sdar_jax.diffusion import noise
from sdar_jax.model import transformer
from sdar_jax.model.transformer import ModelOutput
from sdar_jax.ops.masks import MaskSpec

VOCAB, MASK_ID, B = 23, 22, 4
AUX = 0.375


def make_batch():
    """Two rows, several packed segments, prompts, row padding (numpy)."""
    layout = [  # (segment length, prompt length) per row; each length a multiple of B
        [(8, 4), (4, 0), (12, 8)],
        [(4, 0), (16, 5)],
    ]
    seq = 28
    rng = np.random.default_rng(0)
    batch = {k: np.zeros((2, seq), np.int32) for k in ("tokens", "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((2, seq), bool)
    for b, row in enumerate(layout):
        at = 0
        for s, (n, n_prompt) in enumerate(row):
            batch["tokens"][b, at:at + n] = rng.integers(0, VOCAB - 1, n)
            batch["positions"][b, at:at + n] = np.arange(n)
            batch["segment_ids"][b, at:at + n] = s + 1
            batch["loss_mask"][b, at + n_prompt:at + n] = True
            at += n
    return batch


def fake_model():
    """apply_fn with logits = E[token] + P[position] + bias[index in the returned slice]."""
    rng = np.random.default_rng(1)
    params = {
        "E": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32),
        "P": jnp.asarray(rng.normal(size=(64, VOCAB)), jnp.float32),
        "bias": jnp.zeros((64, VOCAB), jnp.float32),
    }
    calls = []

    def apply_fn(params, tokens, positions, *, mask, segment_ids, logits_slice):
        calls.append(dict(tokens=tokens, positions=positions, mask=mask, segment_ids=segment_ids,
                          logits_slice=logits_slice))
        start, stop = logits_slice
        logits = params["E"][tokens] + params["P"][positions]
        logits = logits[:, start:stop] + params["bias"][None, : stop - start]
        return ModelOutput(logits=logits, cache=None, aux_loss=jnp.float32(AUX), hidden=logits)

    return apply_fn, params, calls


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("normalization", ["non_prompt", "masked"])
def test_sdar_loss_matches_numpy(normalization):
    batch = make_batch()
    apply_fn, params, calls = fake_model()
    rng = jax.random.key(7)
    loss, metrics = loss_lib.sdar_loss(apply_fn, params, batch, rng, block_size=B,
                                       mask_token_id=MASK_ID, normalization=normalization)
    # The same draw, made directly.
    noised = noise.noise_tokens(rng, batch["tokens"], batch["loss_mask"], batch["segment_ids"],
                                mask_token_id=MASK_ID)
    xt, masked, p = (np.asarray(a) for a in noised)
    L = batch["tokens"].shape[1]
    # The model saw [xt ; x0] with duplicated positions/segments, the block-diffusion mask,
    # and returned the noisy half only.
    (call,) = calls
    np.testing.assert_array_equal(call["tokens"], np.concatenate([xt, batch["tokens"]], 1))
    np.testing.assert_array_equal(call["positions"], np.tile(batch["positions"], 2))
    np.testing.assert_array_equal(call["segment_ids"], np.tile(batch["segment_ids"], 2))
    assert call["mask"] == MaskSpec("block_diffusion", B) and call["logits_slice"] == (0, L)

    logits = np.asarray(params["E"])[xt] + np.asarray(params["P"])[batch["positions"]]
    logp = np_log_softmax(logits)
    ce = -np.take_along_axis(logp, batch["tokens"][..., None], -1)[..., 0]
    weighted = (ce / p)[masked].sum()
    denominator = batch["loss_mask"].sum() if normalization == "non_prompt" else masked.sum()
    np.testing.assert_allclose(loss, weighted / denominator, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"], ce[masked].mean(), rtol=1e-5)
    hits = logits.argmax(-1) == batch["tokens"]
    np.testing.assert_allclose(metrics["accuracy"], hits[masked].mean(), rtol=1e-6)
    assert int(metrics["num_masked"]) == masked.sum()
    assert int(metrics["num_loss_tokens"]) == batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics["weighted_ce_sum"] / metrics["normalizer"], loss, rtol=1e-6)
    assert float(metrics["aux_loss"]) == AUX
    assert masked.sum() < batch["loss_mask"].sum()  # the two normalisations differ here


def test_prompt_and_padding_carry_no_loss():
    batch = make_batch()
    apply_fn, params, _ = fake_model()
    grad_fn = jax.jit(jax.grad(lambda prm, key: loss_lib.sdar_loss(
        apply_fn, prm, batch, key, block_size=B, mask_token_id=MASK_ID)[0]))
    touched = np.zeros(batch["tokens"].shape, bool)
    for i in range(20):
        key = jax.random.key(i)
        grads = grad_fn(params, key)
        g = np.abs(np.asarray(grads["bias"])[: batch["tokens"].shape[1]]).sum(-1)
        masked = np.asarray(noise.noise_tokens(key, batch["tokens"], batch["loss_mask"],
                                               batch["segment_ids"], mask_token_id=MASK_ID).masked)
        # Gradient reaches exactly the columns that hold a masked token in some row.
        np.testing.assert_array_equal(g > 0, masked.any(0))
        touched |= masked
    assert not (touched & ~batch["loss_mask"]).any()
    assert touched[batch["loss_mask"]].mean() > 0.5


def tiny_config():
    return get_preset("tiny", num_layers=2)


def embedding_perturbed_logits(config, params, tokens, positions, segment_ids, delta, logits_slice):
    """Model logits with `delta` added to the token embeddings (the model's first activation)."""

    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
            out = out + delta.astype(out.dtype)
        return out

    with nn.intercept_methods(add_delta):
        return transformer.apply(config, params, tokens, positions,
                                 mask=MaskSpec("block_diffusion", config.block_size),
                                 segment_ids=segment_ids, logits_slice=logits_slice).logits


def test_clean_half_cannot_see_noisy_half():
    config = tiny_config()
    params = transformer.init_params(config, jax.random.key(0))
    batch = make_batch()
    L = batch["tokens"].shape[1]
    noised = noise.noise_tokens(jax.random.key(3), batch["tokens"], batch["loss_mask"],
                                batch["segment_ids"], mask_token_id=config.mask_token_id)
    tokens, positions, segment_ids = noise.diffusion_row(
        noised.xt, batch["tokens"], batch["positions"], batch["segment_ids"])
    delta0 = jnp.zeros((*tokens.shape, config.hidden_size), jnp.float32)
    weights = jax.random.normal(jax.random.key(4), (2, L, config.vocab_size))

    def grad_of(logits_slice):
        fn = lambda delta: jnp.sum(weights * embedding_perturbed_logits(  # noqa: E731
            config, params, tokens, positions, segment_ids, delta, logits_slice))
        return np.abs(np.asarray(jax.jit(jax.grad(fn))(delta0))).sum(-1)  # [batch, 2L]

    clean_grad = grad_of((L, 2 * L))
    assert (clean_grad[:, :L] == 0).all()  # exactly zero, not merely small
    assert (clean_grad[:, L:][batch["segment_ids"] > 0] > 0).all()
    noisy_grad = grad_of((0, L))
    # The noisy half sees its own block and the clean past: nonzero on both halves.
    assert (noisy_grad[:, :L][batch["segment_ids"] > 0] > 0).all()
    assert (noisy_grad[:, L:] > 0).any()


def test_sdar_loss_jits_on_tiny_model():
    config = tiny_config()
    params = transformer.init_params(config, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    apply_fn = functools.partial(transformer.apply, config)

    @jax.jit
    def step(params, key):
        return jax.value_and_grad(
            lambda prm: loss_lib.sdar_loss(apply_fn, prm, batch, key, block_size=config.block_size,
                                           mask_token_id=config.mask_token_id), has_aux=True)(params)

    (loss, metrics), grads = step(params, jax.random.key(1))
    assert np.isfinite(float(loss)) and float(loss) > 0
    # An untrained model is near uniform: CE ~ log(vocab).
    np.testing.assert_allclose(metrics["ce"], np.log(config.vocab_size), rtol=0.1)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_ar_loss_matches_numpy():
    batch = make_batch()
    apply_fn, params, calls = fake_model()
    loss, metrics = loss_lib.ar_loss(apply_fn, params, batch)
    (call,) = calls
    assert call["mask"] == MaskSpec("causal")
    L = batch["tokens"].shape[1]
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = np.asarray(params["E"])[tokens] + np.asarray(params["P"])[batch["positions"]]
    logp = np_log_softmax(logits)
    total, count, hits = 0.0, 0, 0
    for b in range(tokens.shape[0]):
        for i in range(L - 1):
            same = seg[b, i] == seg[b, i + 1] and seg[b, i + 1] != 0
            if same and batch["loss_mask"][b, i + 1]:
                total -= logp[b, i, tokens[b, i + 1]]
                count += 1
                hits += logits[b, i].argmax() == tokens[b, i + 1]
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    assert int(metrics["num_targets"]) == count
    np.testing.assert_allclose(metrics["accuracy"], hits / count, rtol=1e-6)
    assert float(metrics["aux_loss"]) == AUX
    # No target crosses a segment boundary: the first token of every segment is never one.
    _, valid = loss_lib.ar_targets(batch)
    starts = np.diff(seg, axis=1) != 0
    assert not np.asarray(valid)[starts].any()


def test_bad_batches():
    apply_fn, params, _ = fake_model()
    batch = make_batch()
    with pytest.raises(KeyError, match="loss_mask"):
        loss_lib.ar_loss(apply_fn, params, {k: v for k, v in batch.items() if k != "loss_mask"})
    with pytest.raises(ValueError, match="normalization"):
        loss_lib.sdar_loss(apply_fn, params, batch, jax.random.key(0), block_size=B,
                           mask_token_id=MASK_ID, normalization="tokens")
    with pytest.raises(ValueError, match="multiple of block_size"):
        loss_lib.sdar_loss(apply_fn, params, batch, jax.random.key(0), block_size=8,
                           mask_token_id=MASK_ID)
