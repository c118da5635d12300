"""A converted tiny Qwen3-MoE checkpoint (8 experts, top-2) against transformers:
logits, the router aux loss, expert parallelism and the export back to files.

transformers 5 fuses the experts in memory but saves per-expert tensors
(`mlp.experts.{e}.{gate,up,down}_proj.weight`): the conversion reads the files.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sdar_jax import parallel
from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.convert.from_hf import hf_to_jax
from sdar_jax.convert.to_hf import jax_to_hf
from sdar_jax.model import sharding as model_sharding
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec
from tests.helpers import hf_models

ATOL = 1e-4


def hf_forward(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None):
    """(logits [batch, seq, vocab] float32, aux_loss, router logits [layers, batch*seq, experts])."""
    kwargs = {"input_ids": torch.as_tensor(tokens, dtype=torch.int64)}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.int64)
    with torch.no_grad():
        out = model(**kwargs, output_router_logits=True, use_cache=False)
    router = np.stack([r.float().numpy() for r in out.router_logits])
    return out.logits.float().numpy(), float(out.aux_loss), router


def sdar_apply(config, params, tokens: np.ndarray, segment_ids: np.ndarray | None = None):
    """(logits [batch, seq, vocab] float32, aux_loss) as jax arrays (jit-able)."""
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out = transformer.apply(
        config, params, np.asarray(tokens, np.int32), positions, mask=MaskSpec("causal"),
        segment_ids=None if segment_ids is None else np.asarray(segment_ids, np.int32),
    )
    return out.logits, out.aux_loss


def sdar_forward(config, params, tokens: np.ndarray, segment_ids: np.ndarray | None = None):
    # Under jit: run eagerly, the MoE decoder was dispatched op by op (several seconds a call).
    logits, aux_loss = jax.jit(lambda p: sdar_apply(config, p, tokens, segment_ids))(params)
    return np.asarray(logits), float(aux_loss)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers model, config, params, checkpoint dir); the files come in several shards."""
    tmp = tmp_path_factory.mktemp("qwen3_moe")
    hf_dir, model = hf_models.make_checkpoint(
        tmp / "hf", "qwen3_moe", seed=5, rope_theta=1e6, max_shard_size="60KB"
    )
    hf_to_jax(hf_dir, tmp / "ckpt")
    config, params = load_params_checkpoint(tmp / "ckpt")
    assert config.is_moe and (config.num_experts, config.num_experts_per_tok) == (8, 2)
    return model, config, params, tmp / "ckpt"


def test_logits_and_aux_loss_match(converted):
    model, config, params, _ = converted
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
    ref_logits, ref_aux, _ = hf_forward(model, tokens)
    got_logits, got_aux = sdar_forward(config, params, tokens)
    np.testing.assert_allclose(got_logits, ref_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got_aux, ref_aux, rtol=1e-5)


def test_batch_with_idle_experts(converted):
    """Three tokens pick at most six of the eight experts in each layer."""
    model, config, params, _ = converted
    tokens = np.array([[7, 300, 42]])
    ref_logits, ref_aux, router = hf_forward(model, tokens)
    chosen = np.argsort(-router, axis=-1)[..., : config.num_experts_per_tok]  # [layers, tokens, k]
    for layer in chosen:
        assert len(np.unique(layer)) < config.num_experts
    got_logits, got_aux = sdar_forward(config, params, tokens)
    np.testing.assert_allclose(got_logits, ref_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got_aux, ref_aux, rtol=1e-5)


def test_padding_is_left_out_of_the_aux_loss(converted):
    """Row padding (segment id 0 here, attention_mask 0 in transformers) is not counted."""
    model, config, params, _ = converted
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 10))
    valid = np.ones(tokens.shape, np.int64)
    valid[1, 6:] = 0
    ref_logits, ref_aux, _ = hf_forward(model, tokens, valid)
    got_logits, got_aux = sdar_forward(config, params, tokens, segment_ids=valid)
    np.testing.assert_allclose(got_logits[valid > 0], ref_logits[valid > 0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got_aux, ref_aux, rtol=1e-5)
    _, unmasked_aux = sdar_forward(config, params, tokens)
    assert abs(unmasked_aux - ref_aux) > 1e-6


def test_expert_parallel_equals_single_device(converted):
    model, config, params, _ = converted
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 12))
    want_logits, want_aux = sdar_forward(config, params, tokens)
    context = parallel.ShardingContext.from_config(parallel.ParallelConfig(data=1, expert=8))  # one expert per device
    shardings = model_sharding.param_shardings(config, context)
    gate_spec = shardings["layers"]["mlp"]["gate_proj"]["kernel"].spec
    assert gate_spec[1] == "expert"
    sharded_params = jax.device_put(params, shardings)
    with context.activate():
        got_logits, got_aux = jax.jit(lambda p: sdar_apply(config, p, tokens))(sharded_params)
    np.testing.assert_allclose(np.asarray(got_logits), want_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(got_aux), want_aux, rtol=1e-6)
    ref_logits, _, _ = hf_forward(model, tokens)
    np.testing.assert_allclose(np.asarray(got_logits), ref_logits, atol=ATOL, rtol=0)


def test_export_back_reproduces_transformers(converted, tmp_path):
    model, config, _, ckpt = converted
    out = tmp_path / "exported"
    jax_to_hf(ckpt, out, max_shard_bytes=60_000)
    reloaded = hf_models.load_model(out)
    original = model.state_dict()
    assert any("experts" in name for name in original)
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(1, 12))
    ref_logits, ref_aux, _ = hf_forward(model, tokens)
    got_logits, got_aux, _ = hf_forward(reloaded, tokens)
    np.testing.assert_allclose(got_logits, ref_logits, atol=1e-6, rtol=0)
    assert got_aux == pytest.approx(ref_aux, rel=1e-6)
