"""sdar_jax.model.moe.MoeMLP against transformers' Qwen3MoeSparseMoeBlock, and the
MoE decoder on a device mesh (expert-parallel) against the same decoder on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_moe

from sdar_jax.config import get_preset
from sdar_jax.model import transformer
from sdar_jax.model.moe import MoeMLP
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.ops.moe import load_balancing_loss, route, router_stats

AUTO = jax.sharding.AxisType.Auto


def test_moe_mlp_matches_transformers_sparse_block():
    cfg = get_preset("tiny-moe")
    block_config = hf_moe.Qwen3MoeConfig(
        hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    block = hf_moe.Qwen3MoeSparseMoeBlock(block_config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        block.gate.weight[2, 0] = -50.0  # with x[..., 0] >= 2 below, expert 2 receives no token
    x = np.random.default_rng(0).standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
    x[..., 0] = 2.0 + np.abs(x[..., 0])
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()

    mlp = cfg.moe_intermediate_size
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2*mlp, hidden]
    params = {
        "router": {"kernel": block.gate.weight.detach().numpy().T},
        "gate_proj": {"kernel": gate_up[:, :mlp].transpose(0, 2, 1)},
        "up_proj": {"kernel": gate_up[:, mlp:].transpose(0, 2, 1)},
        "down_proj": {"kernel": block.experts.down_proj.detach().numpy().transpose(0, 2, 1)},
    }
    token_mask = np.ones((2, 7), bool)
    token_mask[1, 5:] = False
    got, stats = MoeMLP(cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(token_mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

    logits = x.reshape(-1, cfg.hidden_size) @ params["router"]["kernel"]
    assert float(stats.expert_counts[2]) == 0.0
    assert float(stats.num_tokens) == token_mask.sum()
    ref_loss = hf_moe.load_balancing_loss_func(
        (torch.from_numpy(logits),), cfg.num_experts, cfg.num_experts_per_tok,
        torch.from_numpy(token_mask.astype(np.int64)),
    )
    np.testing.assert_allclose(float(load_balancing_loss(stats)), float(ref_loss), rtol=1e-5)
    routing = route(jnp.asarray(logits), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    np.testing.assert_allclose(
        np.asarray(stats.prob_sums), np.asarray(router_stats(routing, token_mask.reshape(-1)).prob_sums),
        rtol=1e-5,
    )


def test_decoder_on_expert_mesh_equals_single_device():
    cfg = get_preset("tiny-moe", remat_policy="full")
    # Init and the one-device reference under jit: eagerly they were dispatched op by op.
    params = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    segment_ids = jnp.ones_like(tokens).at[1, 9:].set(0)  # row padding: out of the aux loss

    def loss(params):
        out = transformer.apply(
            cfg, params, tokens, positions, mask=MaskSpec("block_causal", 4), segment_ids=segment_ids
        )
        return jnp.mean(out.logits**2) + out.aux_loss, out

    (ref_loss, ref_out), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AUTO,) * 2)
    with jax.set_mesh(mesh):
        (got_loss, got_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert float(ref_out.aux_loss) > 0.0
    np.testing.assert_allclose(float(got_out.aux_loss), float(ref_out.aux_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_out.logits), np.asarray(ref_out.logits), atol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 activations and experts, float32 router: same routing, output within bf16 error."""
    cfg = get_preset("tiny-moe")
    x = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
    params = MoeMLP(cfg).init(jax.random.key(1), x)["params"]
    want, want_stats = MoeMLP(cfg).apply({"params": params}, x)
    cfg16 = cfg.replace(dtype="bfloat16")
    got, got_stats = MoeMLP(cfg16).apply({"params": params}, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got_stats.expert_counts), np.asarray(want_stats.expert_counts))
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2 * scale)
