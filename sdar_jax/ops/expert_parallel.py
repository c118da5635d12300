"""Expert parallelism: tokens travel to the devices that own their experts (Flax-free).

Layout inside `shard_map` over the whole mesh, three sets of mesh axes (the
caller's; the model takes them from the run's sharding context,
`sdar_jax.parallel.ShardingContext.moe_axes`; the defaults are the default
rules' layout):

- tokens `[T, hidden]` are split over `token_axes` (default `data`, `fsdp`,
  `expert` where present) and replicated over the rest;
- expert weights are split over `expert_axes` (default `expert`: each device
  holds E / n whole experts) and their `mlp` dimension over `mlp_axes`
  (default `tensor`); a device never holds another group's experts.

Per device, with n = the product of the expert axes' sizes, E_l = E / n local experts, T_l local
tokens and C = T_l * min(k, E_l) (the most assignments one device can send to
one expert group, so nothing is ever dropped):

1. sort the T_l*k assignments by expert (destinations are contiguous blocks);
2. pack them into a `[n, C, hidden]` buffer, block d for expert group d;
3. `all_to_all` over the expert axes (block d goes to device d), and the assignment
   counts `[n, E_l]` with it;
4. sort the received rows by local expert, grouped SwiGLU
   (`sdar_jax.ops.grouped_matmul`), unsort; padding rows belong to no
   expert, stay zero and (in the tiled grouped matmul) cost no work;
5. `all_to_all` back, unpack, unsort, combine with the routing weights;
6. `psum` over the mlp axes (each shard computed a slice of `mlp`).

The padded buffer keeps every shape static, which dropless routing needs
(XLA:CPU has no `ragged_all_to_all`, so the padded `all_to_all` is the
portable transport; it moves n*C rows where the ragged one would move only the
real ones).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sdar_jax.ops.moe import combine, dropless_experts, grouped_swiglu, sort_assignments

EXPERT_AXES = ("expert",)
MLP_AXES = ("tensor",)
TOKEN_AXES = ("data", "fsdp", "expert")

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def _present(mesh: Mesh, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for name in names if name in mesh.axis_names and mesh.shape[name] > 1)


def _axes_name(axes: tuple[str, ...]) -> str:
    return f"'{axes[0]}' axis" if len(axes) == 1 else f"axes {axes}"


def _exchange_body(
    x: jnp.ndarray,
    weights: jnp.ndarray,
    experts: jnp.ndarray,
    gate: jnp.ndarray,
    up: jnp.ndarray,
    down: jnp.ndarray,
    *,
    num_groups: int,
    expert_axes: tuple[str, ...],
    impl: str,
) -> jnp.ndarray:
    """One device's part of expert-parallel MoE (runs inside shard_map).

    Args:
      x: [T_l, hidden] local tokens.
      weights: [T_l, k] float32; experts: [T_l, k] int32 global expert ids.
      gate, up: [E_l, hidden, mlp_l]; down: [E_l, mlp_l, hidden] local experts.
      num_groups: n, the product of the expert axes' sizes.
      expert_axes: the mesh axes the experts are split over.
      impl: the grouped matmul implementation.

    Returns:
      [T_l, hidden] this device's share of the MoE output (a partial sum over
      the tensor axis when mlp is split).
    """
    num_tokens, top_k = experts.shape
    local_experts, hidden = gate.shape[0], x.shape[-1]
    capacity = num_tokens * min(top_k, local_experts)

    # 1-2. Sort by global expert and pack into per-destination blocks.
    sorted_ = sort_assignments(experts, num_groups * local_experts)
    counts = sorted_.group_sizes.reshape(num_groups, local_experts)  # [dest, local expert]
    send_sizes = jnp.sum(counts, axis=1)
    send_starts = jnp.cumsum(send_sizes) - send_sizes
    dest = experts.reshape(-1)[sorted_.order] // local_experts  # [T_l*k], nondecreasing
    slot = jnp.arange(num_tokens * top_k, dtype=jnp.int32) - send_starts[dest]
    send = jnp.zeros((num_groups, capacity, hidden), x.dtype)
    send = send.at[dest, slot].set(x[sorted_.order // top_k], unique_indices=True)

    # 3. Exchange rows and counts: block d goes to device d.
    recv = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)  # [src, C, hidden]
    recv_counts = jax.lax.all_to_all(counts, expert_axes, 0, 0, tiled=True)  # [src, E_l]

    # 4. Local expert of every received row; E_l marks padding (sorts last).
    bounds = jnp.cumsum(recv_counts, axis=1)  # [src, E_l]
    row = jnp.arange(capacity, dtype=jnp.int32)
    local_ids = jax.vmap(lambda b: jnp.searchsorted(b, row, side="right"))(bounds)  # [src, C]
    local_sorted = sort_assignments(local_ids.reshape(-1, 1), local_experts + 1)
    rows = recv.reshape(num_groups * capacity, hidden)[local_sorted.order]
    y = grouped_swiglu(rows, gate, up, down, local_sorted.group_sizes[:local_experts], impl)
    y = y[local_sorted.inverse].reshape(num_groups, capacity, hidden)

    # 5. Send results back and restore the token order.
    back = jax.lax.all_to_all(y, expert_axes, 0, 0, tiled=True)  # [dest, C, hidden]
    y_sorted = back[dest, slot]  # [T_l*k, hidden]
    y_tokens = y_sorted[sorted_.inverse].reshape(num_tokens, top_k, hidden)
    return combine(y_tokens, weights)


def sharded_experts(
    x: jnp.ndarray,
    weights: jnp.ndarray,
    experts: jnp.ndarray,
    gate: jnp.ndarray,
    up: jnp.ndarray,
    down: jnp.ndarray,
    mesh: Mesh,
    impl: str = "auto",
    *,
    token_axes: Sequence[str] = TOKEN_AXES,
    expert_axes: Sequence[str] = EXPERT_AXES,
    mlp_axes: Sequence[str] = MLP_AXES,
) -> jnp.ndarray:
    """Dropless MoE over a device mesh (expert-parallel when the expert axes have > 1 device).

    Args:
      x: [T, hidden] tokens in the compute dtype.
      weights: [T, k] float32 routing weights; experts: [T, k] int32 ids.
      gate, up: [experts, hidden, mlp]; down: [experts, mlp, hidden].
      mesh: a Mesh or AbstractMesh. Axes it lacks, or of size 1, are ignored;
        axes named by none of the three sets replicate the work.
      impl: the grouped matmul implementation ("auto", "ragged_dot", "tiled").
      token_axes: mesh axes splitting the tokens (any of `mlp_axes` among
        them is left out: the partial sums over mlp need the same tokens).
      expert_axes: mesh axes splitting the experts (the all-to-all axes).
      mlp_axes: mesh axes splitting each expert's intermediate dimension.

    Returns:
      [T, hidden], equal to `dropless_experts` on one device.
    """
    num_experts, _, mlp = gate.shape
    mlp_axes = _present(mesh, mlp_axes)
    expert_axes = _present(mesh, expert_axes)
    token_axes = tuple(a for a in _present(mesh, token_axes) if a not in mlp_axes)
    if set(expert_axes) & set(mlp_axes):
        raise ValueError(f"expert axes {expert_axes} and mlp axes {mlp_axes} must be disjoint")
    num_groups = math.prod(mesh.shape[a] for a in expert_axes)
    mlp_shards = math.prod(mesh.shape[a] for a in mlp_axes)
    if num_experts % num_groups:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the mesh's {_axes_name(expert_axes)} "
            f"({num_groups})"
        )
    if mlp % mlp_shards:
        raise ValueError(
            f"moe_intermediate_size ({mlp}) must be divisible by the mesh's {_axes_name(mlp_axes)} "
            f"({mlp_shards})"
        )

    # Pad tokens to a multiple of the token shards; padded rows get weight 0
    # and expert 0, and are cut off again below.
    num_tokens = x.shape[0]
    shards = math.prod(mesh.shape[a] for a in token_axes)
    pad = -num_tokens % shards
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)))

    tok = P(token_axes or None)
    ex = expert_axes or None
    tp = mlp_axes or None

    def body(x, weights, experts, gate, up, down):
        if num_groups > 1:
            out = _exchange_body(
                x, weights, experts, gate, up, down, num_groups=num_groups, expert_axes=expert_axes,
                impl=impl,
            )
        else:  # every device holds all experts (their mlp maybe split)
            out = dropless_experts(x, weights, experts, gate, up, down, impl)
        return jax.lax.psum(out, tp) if tp else out

    out = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, tok, tok, P(ex, None, tp), P(ex, None, tp), P(ex, tp, None)),
        out_specs=tok,
    )(x, weights, experts, gate, up, down)
    return out[:num_tokens]
