"""The learning-rate schedule, the weight-decay mask and the AdamW update, against
closed forms and a NumPy AdamW."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdar_jax.train import optimizer
from sdar_jax.train.config import base_config


def _opt(**changes) -> ml_collections.ConfigDict:
    opt = base_config().optimizer
    opt.update(changes)
    return opt


def test_schedule_warmup_cosine_floor():
    opt = _opt(peak_lr=2e-3, warmup_steps=10, end_lr_ratio=0.1, decay_steps=110)
    schedule = optimizer.learning_rate_schedule(opt, total_steps=500)
    floor = 2e-4

    def expected(step: int) -> float:
        if step < 10:
            return 2e-3 * step / 10
        frac = min(step - 10, 100) / 100
        return floor + (2e-3 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    for step in (0, 1, 5, 10, 35, 60, 109, 110, 300):
        np.testing.assert_allclose(float(schedule(step)), expected(step), rtol=1e-5, atol=1e-9)


def test_schedule_rejects_decay_shorter_than_warmup():
    with pytest.raises(ValueError, match="decay_steps"):
        optimizer.learning_rate_schedule(_opt(warmup_steps=100), total_steps=50)


def _params():
    return {
        "embed_tokens": {"embedding": jnp.full((5, 3), 0.5)},
        "layers": {
            "input_layernorm": {"scale": jnp.ones((2, 3))},
            "mlp": {"up_proj": {"kernel": jnp.full((2, 3, 4), -0.25)}},
        },
        "norm": {"scale": jnp.ones((3,))},
    }


def test_weight_decay_mask_excludes_norm_scales():
    mask = optimizer.weight_decay_mask(_params())
    assert mask == {
        "embed_tokens": {"embedding": True},
        "layers": {"input_layernorm": {"scale": False}, "mlp": {"up_proj": {"kernel": True}}},
        "norm": {"scale": False},
    }
    no_embed = optimizer.weight_decay_mask(_params(), decay_embeddings=False)
    assert no_embed["embed_tokens"]["embedding"] is False
    assert no_embed["layers"]["mlp"]["up_proj"]["kernel"] is True


def _numpy_adamw(params, grads_seq, lrs, *, b1, b2, eps, wd, clip, decay):
    """Reference: global-norm clip, Adam with bias correction, decoupled decay."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, clip / norm)
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g * g
            update = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
            if decay[k]:
                update = update + wd * params[k]
            params[k] = params[k] - lr * update
    return params


def test_adamw_matches_numpy_reference():
    opt = _opt(peak_lr=0.1, warmup_steps=1, end_lr_ratio=0.5, decay_steps=4, weight_decay=0.3,
               b1=0.8, b2=0.9, eps=1e-6, clip_norm=0.7)
    tx = optimizer.make_optimizer(opt, total_steps=4)
    schedule = optimizer.learning_rate_schedule(opt, total_steps=4)
    keys = jax.random.split(jax.random.key(0), 8)
    params = {
        "kernel": jax.random.normal(keys[0], (3, 4)),
        "scale": jax.random.normal(keys[1], (4,)),
    }
    grads_seq = [
        {"kernel": jax.random.normal(keys[2 + 2 * i], (3, 4)),
         "scale": jax.random.normal(keys[3 + 2 * i], (4,))}
        for i in range(3)
    ]
    state = tx.init(params)
    got = params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, got)
        got = jax.tree.map(jnp.add, got, updates)
    want = _numpy_adamw(
        params, grads_seq, [float(schedule(i)) for i in range(3)], b1=0.8, b2=0.9, eps=1e-6,
        wd=0.3, clip=0.7, decay={"kernel": True, "scale": False},
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)
