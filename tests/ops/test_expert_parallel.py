"""sdar_jax.ops.expert_parallel on 8 fake CPU devices: equal to the one-device path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import expert_parallel, moe

AUTO = jax.sharding.AxisType.Auto


def _problem(tokens=21, hidden=16, mlp=12, num_experts=8, top_k=2):
    key_x, key_l, key_g, key_u, key_d = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(key_x, (tokens, hidden))
    logits = 2 * jax.random.normal(key_l, (tokens, num_experts))
    logits = logits.at[:, 5].add(-100.0)  # expert 5 (on its own device when n=8) gets no token
    logits = logits.at[:4, 1].add(100.0)  # a crowd on expert 1
    routing = moe.route(logits, top_k, True)
    weights = (
        0.3 * jax.random.normal(key_g, (num_experts, hidden, mlp)),
        0.3 * jax.random.normal(key_u, (num_experts, hidden, mlp)),
        0.3 * jax.random.normal(key_d, (num_experts, mlp, hidden)),
    )
    return x, routing, weights


@pytest.mark.parametrize(
    "shape,names",
    [
        ((8,), ("expert",)),  # one expert per device, tokens split 8 ways
        ((2, 2, 2), ("data", "expert", "tensor")),  # expert + data + tensor-split mlp
        ((4, 2), ("fsdp", "tensor")),  # no expert axis: local dropless per token shard
    ],
)
def test_sharded_equals_single_device_forward_and_backward(shape, names):
    x, routing, (gate, up, down) = _problem()
    mesh = jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))

    def loss(fn, x, weights, gate, up, down):
        return jnp.sum(jnp.sin(fn(x, weights, routing.experts, gate, up, down)))

    sharded = lambda *a: expert_parallel.sharded_experts(*a, mesh=mesh)  # noqa: E731
    args = (x, routing.weights, gate, up, down)
    value, grads = jax.jit(jax.value_and_grad(lambda *a: loss(sharded, *a), argnums=range(5)))(*args)
    ref_value, ref_grads = jax.value_and_grad(
        lambda *a: loss(moe.dropless_experts, *a), argnums=range(5)
    )(*args)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    out = jax.jit(sharded)(x, routing.weights, routing.experts, gate, up, down)
    ref = moe.dropless_experts(x, routing.weights, routing.experts, gate, up, down)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


def test_expert_weights_stay_split_over_the_expert_axis():
    """The compiled program never materialises all experts' weights on one device."""
    x, routing, (gate, up, down) = _problem()
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(AUTO,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    gate, up, down = (jax.device_put(w, spec) for w in (gate, up, down))
    fn = jax.jit(lambda *a: expert_parallel.sharded_experts(*a, mesh=mesh))
    hlo = fn.lower(x, routing.weights, routing.experts, gate, up, down).compile().as_text()
    assert "all-to-all" in hlo
    full_gate = f"f32[{gate.shape[0]},{gate.shape[1]},{gate.shape[2]}]"
    assert full_gate not in hlo


def test_rejects_experts_not_divisible_by_the_expert_axis():
    x, routing, (gate, up, down) = _problem(num_experts=6)
    mesh = jax.make_mesh((4, 2), ("expert", "data"), axis_types=(AUTO,) * 2)
    with pytest.raises(ValueError, match="num_experts \\(6\\).*'expert' axis \\(4\\)"):
        expert_parallel.sharded_experts(x, routing.weights, routing.experts, gate, up, down, mesh)
