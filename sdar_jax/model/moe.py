"""The Qwen3-MoE MLP: float32 router, top-k, dropless grouped SwiGLU experts.

Parameters (per layer; nn.scan adds the leading [layers] axis):
  router/kernel      [hidden, experts]       logical ("embed", None)
  gate_proj/kernel   [experts, hidden, mlp]  logical ("expert", "embed", "mlp")
  up_proj/kernel     [experts, hidden, mlp]  logical ("expert", "embed", "mlp")
  down_proj/kernel   [experts, mlp, hidden]  logical ("expert", "mlp", "embed")

The router's expert dimension is deliberately unnamed (replicated): it is
small (hidden x experts) and every device needs all experts' logits to route
its own tokens, so sharding it would only add an all-gather per layer.

Which path runs is read from the sharding context, in one place: with no mesh
set (`ShardingContext.activate` or `jax.set_mesh`) the layer runs
`dropless_experts` on one device; with a mesh it runs `sharded_experts` with
the context's expert layout (`ShardingContext.moe_axes`: experts over the
`expert` rule's axes, each expert's mlp over the `mlp` rule's), which is
expert-parallel (all-to-all) when the expert axes have more than one device.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sdar_jax import parallel
from sdar_jax.config import ModelConfig
from sdar_jax.model.layers import dense_init, dtype_of, logical_init
from sdar_jax.ops.expert_parallel import sharded_experts
from sdar_jax.ops.moe import RouterStats, dropless_experts, route, router_stats


class _Kernel(nn.Module):
    """A bare weight with logical axis names (the stacked expert matrices)."""

    shape: tuple[int, ...]
    names: Sequence[str | None]
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        return self.param("kernel", logical_init(dense_init(), self.names), self.shape, self.param_dtype)


class MoeMLP(nn.Module):
    """Mixture-of-experts SwiGLU MLP of one decoder layer (no capacity factor, no dropped token)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, token_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, RouterStats]:
        """
        Args:
          x: [batch, seq, hidden] in the compute dtype.
          token_mask: [batch, seq] bool, False for row padding, which is routed
            and computed like any token but left out of the router statistics
            (as transformers leaves out `attention_mask == 0`); None counts all.

        Returns:
          (out [batch, seq, hidden] in the compute dtype, RouterStats of this
          layer for the load-balancing loss; `sdar_jax.ops.moe.load_balancing_loss`
          turns the stats summed over layers into the model's aux loss).
        """
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        batch, seq, hidden = x.shape
        if hidden != cfg.hidden_size:
            raise ValueError(f"MoeMLP input has hidden size {hidden}; config.hidden_size is {cfg.hidden_size}")
        num_experts, mlp = cfg.num_experts, cfg.moe_intermediate_size

        tokens = x.reshape(batch * seq, hidden).astype(dtype)
        logits = nn.Dense(
            num_experts, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=logical_init(dense_init(), ("embed", None)), name="router",
        )(tokens.astype(jnp.float32))  # [T, experts] float32
        routing = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        stats = router_stats(routing, None if token_mask is None else token_mask.reshape(-1))

        gate = _Kernel((num_experts, hidden, mlp), ("expert", "embed", "mlp"), param_dtype, name="gate_proj")()
        up = _Kernel((num_experts, hidden, mlp), ("expert", "embed", "mlp"), param_dtype, name="up_proj")()
        down = _Kernel((num_experts, mlp, hidden), ("expert", "mlp", "embed"), param_dtype, name="down_proj")()
        gate, up, down = (w.astype(dtype) for w in (gate, up, down))

        context = parallel.current_context()
        if context is None:
            out = dropless_experts(tokens, routing.weights, routing.experts, gate, up, down)
        else:
            axes = context.moe_axes(num_experts, mlp)
            out = sharded_experts(
                tokens, routing.weights, routing.experts, gate, up, down, context.mesh,
                token_axes=axes.tokens, expert_axes=axes.experts, mlp_axes=axes.mlp,
            )
        return out.reshape(batch, seq, hidden), stats
