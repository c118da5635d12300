"""The Qwen3 / SDAR / Llama decoder: embeddings, pre-norm layers (scanned or unrolled), head.

One definition serves training (a whole row, any mask) and decoding (a few
tokens against a static KV cache). Parameters are a plain pytree; every call
is `Transformer(config).apply({"params": params}, ...)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdar_jax import parallel
from sdar_jax.config import REMAT_POLICIES, ModelConfig
from sdar_jax.model.attention import Attention, LayerCache
from sdar_jax.model.layers import (
    OUT_MAJOR_KERNEL, OutMajorDense, RMSNorm, SwiGLU, dense_init, dtype_of, logical_init,
)
from sdar_jax.model.moe import MoeMLP
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.ops.moe import RouterStats, load_balancing_loss


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint_policies` entry of a config remat policy name (one of
    `config.REMAT_POLICIES`): "full" saves nothing, the others are named as in JAX."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat_policy {name!r} names no policy; expected one of {REMAT_POLICIES} but 'none'")
    return getattr(jax.checkpoint_policies, "nothing_saveable" if name == "full" else name)


@flax.struct.dataclass
class KVCache:
    """Static-shape key/value cache, indexed by absolute position.

    k, v: [layers, batch, max_len, kv_heads, head_dim].
    """

    k: jnp.ndarray
    v: jnp.ndarray

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An all-zero cache; dtype defaults to the compute dtype."""
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"cache max_len {max_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or dtype_of(config.dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class ModelOutput:
    """logits: [batch, seq', vocab] float32 (seq' set by logits_slice);
    cache: the updated KVCache or None; aux_loss: scalar float32, the MoE
    load-balancing loss of the router statistics pooled over all layers, as
    transformers' `aux_loss` (not the sum of per-layer losses; 0 for dense
    models; row padding, segment id 0, is not counted);
    hidden: [batch, seq', hidden] final-normed hidden states."""

    logits: jnp.ndarray
    cache: KVCache | None
    aux_loss: jnp.ndarray
    hidden: jnp.ndarray


class DecoderLayer(nn.Module):
    """x += attn(norm(x)); x += mlp(norm(x)). Scanned: (carry, cache) -> (carry, cache).

    carry = (x [batch, seq, hidden], router statistics summed over the layers
    so far: a RouterStats for MoE models, a float32 zero for dense ones).
    """

    config: ModelConfig
    mask: MaskSpec

    @nn.compact
    def __call__(self, carry, layer_cache, positions, segment_ids):
        x, router_totals = carry
        # Batch-sharded activations at every layer boundary, by the run's rules (the active
        # sharding context; a no-op without a mesh): without it GSPMD may follow the
        # fsdp-sharded weights and gather the batch instead.
        x = parallel.constrain(x, ("batch", "length", None))
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, param_dtype, "embed", name="input_layernorm")(x)
        attn_out, layer_cache = Attention(cfg, self.mask, name="self_attn")(
            h, positions, segment_ids, layer_cache
        )
        x = x + attn_out
        h = RMSNorm(cfg.rms_norm_eps, param_dtype, "embed", name="post_attention_layernorm")(x)
        if cfg.is_moe:
            token_mask = None if segment_ids is None else segment_ids > 0
            mlp_out, layer_stats = MoeMLP(cfg, name="mlp")(h, token_mask)
            router_totals = jax.tree.map(jnp.add, router_totals, layer_stats)
        else:
            mlp_out = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype, param_dtype, name="mlp")(h)
        return (x + mlp_out, router_totals), layer_cache


class Transformer(nn.Module):
    """The full decoder.

    Param tree: embed_tokens/embedding [vocab, hidden]; layers/... with a
    leading [layers] axis (scan); norm/scale [hidden]; lm_head/kernel
    [hidden, vocab] unless tie_word_embeddings.
    """

    config: ModelConfig
    # False: the layers' params are separate trees "layers_0", ... (`unstack_layers`)
    # and the forward runs them one after another instead of scanning a stack.
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray,
        *,
        mask: MaskSpec,
        segment_ids: jnp.ndarray | None = None,
        cache: KVCache | None = None,
        logits_slice: tuple[int, int] | None = None,
    ) -> ModelOutput:
        """
        Args:
          tokens: [batch, seq] int32.
          positions: [batch, seq] int32 position ids (per packed segment, or
            absolute positions in the cache when decoding).
          mask: the attention mask description.
          segment_ids: [batch, seq] int32 packing segments, or None. Not used
            with a cache.
          cache: a KVCache to write this call's keys/values into and attend to.
          logits_slice: (start, stop) along seq: compute the head only there
            (e.g. the noisy half of a block-diffusion row).

        Returns:
          ModelOutput.
        """
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        if tokens.shape != positions.shape:
            raise ValueError(f"tokens {tokens.shape} and positions {positions.shape} must match")
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=logical_init(dense_init(), ("vocab", "embed")), name="embed_tokens",
        )
        x = embed(tokens)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        router_totals = RouterStats.zeros(cfg.num_experts) if cfg.is_moe else jnp.zeros((), jnp.float32)
        carry = (x, router_totals)
        layer_cache = None if cache is None else LayerCache(cache.k, cache.v)
        if self.scan_layers:
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, mask, name="layers")
            carry, layer_cache = layers(carry, layer_cache, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                if layer_cache is not None:  # every layer writes into the one stacked buffer
                    layer_cache = layer_cache.replace(layer=i)
                carry, layer_cache = layer_cls(cfg, mask, name=f"layers_{i}")(
                    carry, layer_cache, positions, segment_ids)
        x, router_totals = carry
        aux_loss = load_balancing_loss(router_totals) if cfg.is_moe else router_totals
        new_cache = None if cache is None else KVCache(k=layer_cache.k, v=layer_cache.v)

        if logits_slice is not None:
            x = x[:, logits_slice[0] : logits_slice[1]]
        hidden = RMSNorm(cfg.rms_norm_eps, param_dtype, "embed", name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(hidden)
        elif OUT_MAJOR_KERNEL in self.variables.get("params", {}).get("lm_head", {}):
            logits = OutMajorDense(1, dtype, name="lm_head")(hidden)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=logical_init(dense_init(), ("embed", "vocab")), name="lm_head",
            )(hidden)
        return ModelOutput(
            logits=logits.astype(jnp.float32), cache=new_cache, aux_loss=aux_loss, hidden=hidden
        )


def _dummy_inputs(config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    tokens = jnp.zeros((1, 2), jnp.int32)
    return tokens, jnp.zeros_like(tokens)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (plain arrays, logical boxes removed)."""
    tokens, positions = _dummy_inputs(config)
    variables = Transformer(config).init(rng, tokens, positions, mask=MaskSpec("causal"))
    return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> dict:
    """The boxed parameter tree as ShapeDtypeStructs (carries logical axis names)."""
    tokens, positions = _dummy_inputs(config)
    variables = jax.eval_shape(
        lambda rng: Transformer(config).init(rng, tokens, positions, mask=MaskSpec("causal")),
        jax.random.key(0),
    )
    return variables["params"]


def param_logical_axes(config: ModelConfig) -> dict:
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(config))


def apply(
    config: ModelConfig, params: dict, tokens: jnp.ndarray, positions: jnp.ndarray, **kwargs: Any
) -> ModelOutput:
    """Shorthand for `Transformer(config).apply({"params": params}, tokens, positions, **kwargs)`;
    params in either layout (stacked "layers", or per layer from `unstack_layers`)."""
    module = Transformer(config, scan_layers="layers" in params)
    return module.apply({"params": params}, tokens, positions, **kwargs)


def unstack_layers(params: dict, *, free_stacked: bool = False) -> dict:
    """The params with the scanned stack "layers" (leading [layers] axis) split into
    separate trees "layers_0", "layers_1", ...: the layout of an unrolled forward.

    Decoding reads every weight once per forward; inside a scan XLA:CPU copies
    each layer's slice of a stacked weight before its matrix product; an
    unrolled forward over separate buffers reads them in place (1.05-1.17x on
    the batch-1 loop, docs/benchmarks.md, bench/release_decode.py). Call it once,
    outside jit, on params that are then decoded with; `transformer.apply`
    takes either layout. A sharded leaf's layers keep its sharding of the
    other axes.

    Args:
      params: a param tree with "layers".
      free_stacked: delete each stacked array once it is split, so that the
        peak memory is the weights plus one stacked array (not twice the
        weights); `params` must not be used afterwards.
    """
    if "layers" not in params:
        raise ValueError(f"unstack_layers: params have no stacked 'layers' (keys: {sorted(params)})")
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]

    def split(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
            layer_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
            take = jax.jit(lambda x, i: x[i], out_shardings=layer_sharding)
            layers = [take(leaf, i) for i in range(num_layers)]
        else:
            layers = [leaf[i] for i in range(num_layers)]
        if free_stacked and isinstance(leaf, jax.Array):
            jax.block_until_ready(layers)
            leaf.delete()
        return layers

    per_leaf = jax.tree.map(split, stacked)
    out = {name: tree for name, tree in params.items() if name != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda layers, i=i: layers[i], per_leaf,
                                          is_leaf=lambda x: isinstance(x, list))
    return out


# Kernels smaller than this (elements per layer) stay [in, out]: the out-major product
# only pays for large weights (docs/benchmarks.md).
OUT_MAJOR_MIN_SIZE = 2**18
# (input axes, output axes) of each projection's kernel [in..., out...].
PROJECTION_AXES = {"q_proj": (1, 2), "k_proj": (1, 2), "v_proj": (1, 2), "o_proj": (2, 1),
                    "gate_proj": (1, 1), "up_proj": (1, 1), "down_proj": (1, 1), "lm_head": (1, 1)}


def out_major_kernels(params: dict, config: ModelConfig, *, min_size: int = OUT_MAJOR_MIN_SIZE,
                      free_stored: bool = False) -> dict:
    """The params with each dense projection kernel [in..., out...] of at least `min_size`
    elements per layer stored out-major as "kernel_t" [out..., in...] (leading stacked axes
    kept). The layout for decoding few rows at a time on XLA:CPU: a few rows times a large
    out-major weight taken as the left operand run 1.5-3x as fast, while many rows (large
    batches) run 0.7-1.1x and small weights lose (`layers.out_major_product`,
    docs/benchmarks.md). MoE models keep their MLP kernels, and a tied head stays the
    embedding. Call once, outside jit; `transformer.apply` reads either layout, kernel by
    kernel. `free_stored` deletes each converted kernel; `params` must not be used afterwards.
    """
    def convert(tree: dict, inside_moe_mlp: bool) -> dict:
        out = {}
        for name, sub in tree.items():
            if not isinstance(sub, dict):
                out[name] = sub
            elif name in PROJECTION_AXES and "kernel" in sub and not inside_moe_mlp:
                kernel = sub["kernel"]
                num_in, num_out = PROJECTION_AXES[name]
                lead = kernel.ndim - num_in - num_out
                if math.prod(kernel.shape[lead:]) < min_size:
                    out[name] = sub
                    continue
                order = (tuple(range(lead)) + tuple(range(lead + num_in, kernel.ndim))
                         + tuple(range(lead, lead + num_in)))
                out[name] = {OUT_MAJOR_KERNEL: jax.block_until_ready(jnp.transpose(kernel, order))}
                if free_stored and isinstance(kernel, jax.Array):
                    kernel.delete()
            else:
                out[name] = convert(sub, inside_moe_mlp or (config.is_moe and name == "mlp"))
        return out

    return convert(params, False)
