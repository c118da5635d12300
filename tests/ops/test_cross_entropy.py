"""Tiled cross-entropy equals the dense computation in loss and gradients, and the compiled
training loss never holds whole-row float32 logits."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.diffusion.loss import ar_loss, sdar_loss
from sdar_jax.model import transformer
from sdar_jax.model.head import chunked_token_ce
from sdar_jax.ops.cross_entropy import head_cross_entropy


def _numpy_ce(hidden, head, targets):
    """Float64 log-softmax cross entropy and argmax hits (the independent reference)."""
    logits = np.einsum("bsh,hv->bsv", np.asarray(hidden, np.float64), np.asarray(head, np.float64))
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ce, logits.argmax(-1) == targets


@pytest.mark.parametrize("seq, chunk", [(12, 4), (13, 5), (7, 64)])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_tiled_equals_dense_loss_and_gradients(seq, chunk, vocab_major):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, seq, 16))
    head = jax.random.normal(k2, (16, 40))
    targets = jax.random.randint(k3, (3, seq), 0, 40)
    weights = jnp.linspace(0.5, 2.0, 3 * seq).reshape(3, seq)
    stored = head.T if vocab_major else head

    def loss(fn, hidden, stored):
        ce, _ = fn(hidden, stored, targets)
        return jnp.sum(weights * ce)

    tiled = functools.partial(head_cross_entropy, vocab_major=vocab_major, chunk_size=chunk)

    def dense(hidden, stored, targets):
        logits = jnp.einsum("bsh,vh->bsv" if vocab_major else "bsh,hv->bsv", hidden, stored)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return ce, jnp.argmax(logits, -1) == targets

    ce, correct = jax.jit(tiled)(hidden, stored, targets)
    want_ce, want_correct = _numpy_ce(hidden, head, np.asarray(targets))
    np.testing.assert_allclose(np.asarray(ce), want_ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(correct), want_correct)

    value, grads = jax.jit(jax.value_and_grad(lambda h, w: loss(tiled, h, w), argnums=(0, 1)))(hidden, stored)
    ref_value, ref_grads = jax.value_and_grad(lambda h, w: loss(dense, h, w), argnums=(0, 1))(hidden, stored)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="head \\(8, 40\\) does not match hidden size 16"):
        head_cross_entropy(jnp.zeros((1, 4, 16)), jnp.zeros((8, 40)), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        head_cross_entropy(jnp.zeros((1, 4, 16)), jnp.zeros((16, 40)), jnp.zeros((1, 4), jnp.int32), chunk_size=0)


def _batch(config, batch=2, seq=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config.vocab_size - 1, (batch, seq), dtype=np.int32)
    positions = np.arange(seq, dtype=np.int32)[None].repeat(batch, 0)
    segment_ids = np.ones((batch, seq), np.int32)
    return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=positions >= 4)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("objective", ["sdar", "ar"])
def test_model_losses_with_tiled_ce_equal_dense(tie, objective):
    """Both objectives through the real model: loss, metrics and every parameter's gradient."""
    config = get_preset("tiny", tie_word_embeddings=tie)
    params = transformer.init_params(config, jax.random.key(1))
    batch = _batch(config)
    apply_fn = functools.partial(transformer.apply, config)

    def run(chunked: bool):
        def loss(params):
            kwargs = {"token_ce": chunked_token_ce(config, params, chunk_size=5)} if chunked else {}
            if objective == "sdar":
                return sdar_loss(apply_fn, params, batch, jax.random.key(2), block_size=4,
                                 mask_token_id=config.mask_token_id, **kwargs)
            return ar_loss(apply_fn, params, batch, **kwargs)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (value, metrics), grads = run(True)
    (ref_value, ref_metrics), ref_grads = run(False)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for key in ref_metrics:
        np.testing.assert_allclose(np.asarray(metrics[key]), np.asarray(ref_metrics[key]), rtol=1e-6, err_msg=key)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_compiled_training_loss_has_no_whole_row_float32_logits():
    """The gradient of the SDAR loss with the tiled CE compiles without any float32 buffer
    of [batch, seq, vocab] (or [batch * seq, vocab]) elements; the dense loss has one."""
    config = get_preset("tiny", vocab_size=1000, mask_token_id=999)
    params = transformer.init_params(config, jax.random.key(1))
    batch, seq = 2, 64
    data = _batch(config, batch, seq)
    apply_fn = functools.partial(transformer.apply, config)

    def hlo(chunked: bool) -> str:
        def loss(params):
            kwargs = {"token_ce": chunked_token_ce(config, params, chunk_size=16)} if chunked else {}
            return sdar_loss(apply_fn, params, data, jax.random.key(2), block_size=4,
                             mask_token_id=config.mask_token_id, **kwargs)[0]

        return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

    def whole_row(text: str) -> list[str]:
        pattern = rf"f32\[(?:{batch},{seq}|{batch * seq}),{config.vocab_size}\]"
        return re.findall(pattern, text)

    tiled = hlo(True)
    assert whole_row(hlo(False))
    assert not whole_row(tiled)
    assert re.search(rf"f32\[{batch},16,{config.vocab_size}\]", tiled)  # one tile's logits
