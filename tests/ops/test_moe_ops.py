"""sdar_jax.ops.moe: routing, the load-balancing loss and the dropless grouped path,
against transformers' Qwen3-MoE router / loss and a dense all-experts reference."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_moe

from sdar_jax.ops import moe


def _expert_weights(key, num_experts=8, hidden=16, mlp=12):
    kg, ku, kd = jax.random.split(key, 3)
    return (
        0.3 * jax.random.normal(kg, (num_experts, hidden, mlp)),
        0.3 * jax.random.normal(ku, (num_experts, hidden, mlp)),
        0.3 * jax.random.normal(kd, (num_experts, mlp, hidden)),
    )


def test_route_matches_transformers_router():
    rng = np.random.default_rng(0)
    hidden, num_experts, top_k = 16, 8, 3
    x = rng.standard_normal((20, hidden)).astype(np.float32)
    w = rng.standard_normal((num_experts, hidden)).astype(np.float32)
    for norm in (True, False):
        config = hf_moe.Qwen3MoeConfig(
            hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm
        )
        router = hf_moe.Qwen3MoeTopKRouter(config)
        with torch.no_grad():
            router.weight.copy_(torch.from_numpy(w))
            ref_logits, ref_weights, ref_experts = router(torch.from_numpy(x))
        routing = moe.route(jnp.asarray(x) @ jnp.asarray(w).T, top_k, norm)
        np.testing.assert_array_equal(np.asarray(routing.experts), ref_experts.numpy())
        np.testing.assert_allclose(np.asarray(routing.weights), ref_weights.numpy(), atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(routing.probs), torch.softmax(ref_logits, -1).numpy(), atol=1e-6
        )
        if norm:
            np.testing.assert_allclose(np.asarray(routing.weights).sum(-1), 1.0, atol=1e-6)


def test_pooled_loss_matches_transformers_and_differs_from_per_layer_sum():
    rng = np.random.default_rng(1)
    layers, batch, seq, num_experts, top_k = 3, 2, 5, 8, 2
    logits = [rng.standard_normal((batch * seq, num_experts)).astype(np.float32) * 2 for _ in range(layers)]
    attention_mask = np.ones((batch, seq), np.int64)
    attention_mask[1, 3:] = 0  # right padding in the second row
    for mask in (None, attention_mask):
        ref = hf_moe.load_balancing_loss_func(
            tuple(torch.from_numpy(l) for l in logits), num_experts, top_k,
            None if mask is None else torch.from_numpy(mask),
        )
        token_mask = None if mask is None else jnp.asarray(mask.reshape(-1) > 0)
        per_layer = [moe.router_stats(moe.route(jnp.asarray(l), top_k, True), token_mask) for l in logits]
        pooled = per_layer[0]
        for stats in per_layer[1:]:
            pooled = jax.tree.map(jnp.add, pooled, stats)
        np.testing.assert_allclose(float(moe.load_balancing_loss(pooled)), float(ref), rtol=1e-6)
        per_layer_sum = sum(float(moe.load_balancing_loss(s)) / layers for s in per_layer)
        assert abs(per_layer_sum - float(ref)) > 1e-4  # pooling is not averaging per-layer losses
        # Fractions count every top-k assignment: they sum to top_k.
        np.testing.assert_allclose(float(pooled.expert_counts.sum() / pooled.num_tokens), top_k)
    assert float(moe.load_balancing_loss(moe.RouterStats.zeros(num_experts))) == 0.0


def test_dropless_matches_dense_reference_with_idle_experts_and_gradients():
    key_x, key_l, key_w = jax.random.split(jax.random.key(0), 3)
    tokens, num_experts, top_k = 24, 8, 2
    x = jax.random.normal(key_x, (tokens, 16))
    logits = 2 * jax.random.normal(key_l, (tokens, num_experts))
    logits = logits.at[:, jnp.array([3, 6])].add(-100.0)  # experts 3 and 6 receive no token
    routing = moe.route(logits, top_k, True)
    gate, up, down = _expert_weights(key_w, num_experts)
    assert np.asarray(moe.sort_assignments(routing.experts, num_experts).group_sizes)[[3, 6]].tolist() == [0, 0]

    def loss(fn, x, gate, up, down, weights):
        return jnp.sum(jnp.sin(fn(x, weights, routing.experts, gate, up, down)))

    args = (x, gate, up, down, routing.weights)
    got = moe.dropless_experts(x, routing.weights, routing.experts, gate, up, down)
    want = moe.dense_experts_reference(x, routing.weights, routing.experts, gate, up, down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    grads = jax.grad(lambda *a: loss(moe.dropless_experts, *a), argnums=range(5))(*args)
    ref_grads = jax.grad(lambda *a: loss(moe.dense_experts_reference, *a), argnums=range(5))(*args)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[1][3]).max()) == 0.0  # an idle expert gets no gradient


def test_sort_assignments_is_a_stable_permutation():
    experts = jnp.array([[2, 0], [0, 1], [2, 1]], jnp.int32)
    sorted_ = moe.sort_assignments(experts, 4)
    np.testing.assert_array_equal(np.asarray(sorted_.order), [1, 2, 3, 5, 0, 4])
    np.testing.assert_array_equal(np.asarray(sorted_.group_sizes), [2, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray(sorted_.order)[np.asarray(sorted_.inverse)], np.arange(6))
