"""Mixture-of-experts routing and dropless grouped experts (Flax-free).

The pieces of a Qwen3-MoE MLP, as plain functions on arrays:

- `route`: softmax over all experts in float32, top-k, optional renormalisation.
- `router_stats` / `load_balancing_loss`: the Switch-style auxiliary loss,
  computed exactly as transformers' `load_balancing_loss_func` does.
- `dropless_experts`: every (token, expert) assignment is sorted by expert,
  the SwiGLU experts run as grouped matmuls (`sdar_jax.ops.grouped_matmul`:
  `jax.lax.ragged_dot` on TPU/GPU, a tiled XLA loop on CPU), and the results
  are unsorted and combined with the routing weights. There is no capacity
  factor: no token is ever dropped.

Expert parallelism (tokens sent to the devices that own their experts) lives
in `sdar_jax.ops.expert_parallel`, built from the same pieces.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdar_jax.ops.grouped_matmul import grouped_matmul


class Routing(NamedTuple):
    """The router's decision for T tokens.

    probs: [T, experts] float32 softmax over all experts.
    weights: [T, top_k] float32 combine weights of the chosen experts
      (renormalised to sum to 1 when norm_topk_prob).
    experts: [T, top_k] int32 chosen expert ids, by decreasing probability.
    """

    probs: jnp.ndarray
    weights: jnp.ndarray
    experts: jnp.ndarray


class RouterStats(NamedTuple):
    """Sufficient statistics of the load-balancing loss, summed over tokens.

    Stats of several layers add elementwise (`jax.tree.map(jnp.add, a, b)`); the loss of the sum is what
    transformers reports for a whole model (it pools all layers' router
    logits before normalising, which is not the sum of per-layer losses).

    expert_counts: [experts] float32, top-k assignments per expert (a token
      counts once for each of its k experts).
    prob_sums: [experts] float32, router probabilities summed per expert.
    num_tokens: [] float32, tokens counted.
    """

    expert_counts: jnp.ndarray
    prob_sums: jnp.ndarray
    num_tokens: jnp.ndarray

    @staticmethod
    def zeros(num_experts: int) -> "RouterStats":
        return RouterStats(
            expert_counts=jnp.zeros((num_experts,), jnp.float32),
            prob_sums=jnp.zeros((num_experts,), jnp.float32),
            num_tokens=jnp.zeros((), jnp.float32),
        )


def route(logits: jnp.ndarray, top_k: int, norm_topk_prob: bool) -> Routing:
    """Softmax over all experts, then top-k.

    Args:
      logits: [T, experts] router logits (computed in float32 by the caller).
      top_k: experts per token.
      norm_topk_prob: renormalise the k weights to sum to 1.

    Returns:
      Routing, all float32 except the int32 expert ids.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs=probs, weights=weights, experts=experts.astype(jnp.int32))


def router_stats(routing: Routing, token_mask: jnp.ndarray | None = None) -> RouterStats:
    """Per-layer sums for the load-balancing loss.

    Args:
      routing: the routing of T tokens.
      token_mask: [T] bool, False for tokens to leave out (row padding), like
        the `attention_mask` transformers passes to `load_balancing_loss_func`;
        None counts every token.

    Returns:
      RouterStats.
    """
    num_experts = routing.probs.shape[-1]
    if token_mask is None:
        token_mask = jnp.ones(routing.probs.shape[:1], jnp.bool_)
    mask = token_mask.astype(jnp.float32)
    # [T, k, E] one-hot summed over tokens and slots: every top-k assignment counts once.
    one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)
    counts = jnp.einsum("tke,t->e", one_hot, mask)
    return RouterStats(
        expert_counts=counts,
        prob_sums=jnp.einsum("te,t->e", routing.probs, mask),
        num_tokens=jnp.sum(mask),
    )


def load_balancing_loss(stats: RouterStats) -> jnp.ndarray:
    """Switch auxiliary loss `E * sum_e(fraction_e * mean_prob_e)`, float32 scalar.

    fraction_e is the number of top-k assignments to expert e per counted
    token (so the fractions sum to top_k, as in transformers), mean_prob_e the
    mean router probability of e. With no counted token the loss is 0
    (transformers would return NaN from 0/0).
    """
    num_experts = stats.expert_counts.shape[-1]
    n = jnp.maximum(stats.num_tokens, 1.0)
    loss = num_experts * jnp.sum((stats.expert_counts / n) * (stats.prob_sums / n))
    return jnp.where(stats.num_tokens > 0, loss, 0.0).astype(jnp.float32)


class SortedAssignments(NamedTuple):
    """The T*k (token, expert) assignments ordered by expert.

    order: [T*k] int32, index into the flattened [T, k] assignments; stable,
      so within one expert tokens keep their original order.
    inverse: [T*k] int32, the inverse permutation of `order`.
    group_sizes: [experts] int32, assignments per expert (sums to T*k).
    """

    order: jnp.ndarray
    inverse: jnp.ndarray
    group_sizes: jnp.ndarray


def sort_assignments(experts: jnp.ndarray, num_experts: int) -> SortedAssignments:
    """Sorts flattened [T, k] expert ids by expert.

    Args:
      experts: [T, k] int32 expert ids in [0, num_experts).
      num_experts: number of expert groups.
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(
        jnp.arange(order.shape[0], dtype=jnp.int32), unique_indices=True
    )
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return SortedAssignments(order=order, inverse=inverse, group_sizes=group_sizes)


def grouped_swiglu(
    x: jnp.ndarray,
    gate: jnp.ndarray,
    up: jnp.ndarray,
    down: jnp.ndarray,
    group_sizes: jnp.ndarray,
    impl: str = "auto",
) -> jnp.ndarray:
    """SwiGLU experts on rows grouped by expert: `down_g(silu(gate_g(x)) * up_g(x))`.

    Args:
      x: [M, hidden] rows, the first group_sizes[0] for expert 0, and so on.
        Rows past sum(group_sizes) belong to no expert and come out as zeros.
      gate, up: [experts, hidden, mlp].
      down: [experts, mlp, hidden].
      group_sizes: [experts] int32.
      impl: the grouped matmul implementation ("auto", "ragged_dot", "tiled").

    Returns:
      [M, hidden] in x's dtype.
    """
    g = grouped_matmul(x, gate, group_sizes, impl=impl)
    u = grouped_matmul(x, up, group_sizes, impl=impl)
    return grouped_matmul(jax.nn.silu(g) * u, down, group_sizes, impl=impl)


def combine(y: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """Weighted sum over the k experts of each token.

    Args:
      y: [T, k, hidden] expert outputs in the compute dtype.
      weights: [T, k] float32 routing weights (cast to y's dtype first, as
        transformers does).

    Returns:
      [T, hidden].
    """
    return jnp.einsum("tkh,tk->th", y, weights.astype(y.dtype))


def dropless_experts(
    x: jnp.ndarray,
    weights: jnp.ndarray,
    experts: jnp.ndarray,
    gate: jnp.ndarray,
    up: jnp.ndarray,
    down: jnp.ndarray,
    impl: str = "auto",
) -> jnp.ndarray:
    """Dropless MoE on one device: sort by expert, grouped matmuls, unsort, combine.

    Args:
      x: [T, hidden] tokens in the compute dtype.
      weights: [T, k] float32 routing weights.
      experts: [T, k] int32 expert ids.
      gate, up: [experts, hidden, mlp]; down: [experts, mlp, hidden].
      impl: the grouped matmul implementation ("auto", "ragged_dot", "tiled").

    Returns:
      [T, hidden] in x's dtype.
    """
    num_tokens, top_k = experts.shape
    sorted_ = sort_assignments(experts, gate.shape[0])
    x_sorted = x[sorted_.order // top_k]  # [T*k, hidden]
    y_sorted = grouped_swiglu(x_sorted, gate, up, down, sorted_.group_sizes, impl)
    y = y_sorted[sorted_.inverse].reshape(num_tokens, top_k, -1)
    return combine(y, weights)


def dense_experts_reference(
    x: jnp.ndarray,
    weights: jnp.ndarray,
    experts: jnp.ndarray,
    gate: jnp.ndarray,
    up: jnp.ndarray,
    down: jnp.ndarray,
) -> jnp.ndarray:
    """The same result by running every expert on every token (E/k times the work).

    A reference for tests and the benchmark, not for use in the model.
    Shapes as in `dropless_experts`.
    """
    num_experts = gate.shape[0]
    h = jax.nn.silu(jnp.einsum("th,ehm->etm", x, gate)) * jnp.einsum("th,ehm->etm", x, up)
    y = jnp.einsum("etm,emh->eth", h, down)  # [E, T, hidden]
    dense_weights = jnp.einsum(
        "tke,tk->te", jax.nn.one_hot(experts, num_experts, dtype=x.dtype), weights.astype(x.dtype)
    )
    return jnp.einsum("eth,te->th", y, dense_weights)
