"""Useful-FLOP and weight-byte counts against the parameter tree and a brute-force mask count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax import perf
from sdar_jax.config import get_preset
from sdar_jax.model import transformer
from sdar_jax.ops import masks

MATMUL_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _leaves(params):
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)]


def test_layer_matmul_params_and_weight_bytes_match_the_param_tree():
    config = get_preset("tiny")
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    leaves = _leaves(params)
    matmul = sum(x.size for name, x in leaves if name.startswith("layers") and any(m in name for m in MATMUL_LEAVES))
    assert matmul > 0 and perf.layer_matmul_params(config) == matmul
    read = sum(x.size for name, x in leaves if not name.startswith("embed_tokens"))
    assert perf.forward_weight_bytes(config, 2) == 2 * read
    tied = config.replace(tie_word_embeddings=True)
    tied_params = transformer.init_params(tied, jax.random.PRNGKey(0))
    assert perf.forward_weight_bytes(tied, 4) == 4 * sum(x.size for _, x in _leaves(tied_params))


def _brute_force_block_diffusion(positions, segments, block):
    batch, row = positions.shape
    half = row // 2
    total = 0
    for b in range(batch):
        for i in range(row):
            for j in range(row):
                if segments[b, i] != segments[b, j]:
                    continue
                qb, kb = positions[b, i] // block, positions[b, j] // block
                q_noisy, k_noisy = i < half, j < half
                if q_noisy and k_noisy:
                    total += qb == kb
                elif q_noisy:
                    total += kb < qb
                elif not k_noisy:
                    total += kb <= qb
    return total


def test_allowed_pairs_equals_brute_force_count_with_packing():
    pos = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]] * 2, np.int32)
    pos = np.concatenate([pos, pos], 1)
    seg = np.array([[1] * 12 + [2] * 4, [1] * 4 + [2] * 12], np.int32)
    seg = np.concatenate([seg, seg], 1)
    got = perf.allowed_pairs(masks.block_diffusion(4), jnp.asarray(pos), jnp.asarray(seg))
    assert got == _brute_force_block_diffusion(pos, seg, 4)


def test_train_step_flops_parts():
    config = get_preset("tiny")
    flops = perf.train_step_flops(config, row_tokens=128, logit_tokens=64, pairs=1000)
    assert flops.layers == 6 * perf.layer_matmul_params(config) * 128
    assert flops.attention == 3 * 4 * config.head_dim * config.num_heads * config.num_layers * 1000
    assert flops.head == 6 * config.hidden_size * config.vocab_size * 64
    assert flops.total == flops.layers + flops.attention + flops.head


@pytest.mark.parametrize("kind,expected", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H200", 4.8e12),
    ("NVIDIA GH200 480GB", 4.0e12), ("cpu", None),
])
def test_device_peak_lookup(kind, expected):
    peak = perf.device_peak(kind)
    assert (peak.hbm_bytes_per_s if peak else None) == expected


def test_roofline_is_bandwidth_over_weight_bytes():
    config = get_preset("tiny")
    got = perf.bandwidth_roofline_tokens_per_s(config, itemsize=2, hbm_bytes_per_s=1e9, tokens_per_forward=2.0)
    assert got == pytest.approx(2.0 * 1e9 / perf.forward_weight_bytes(config, 2))


def test_moe_configs_are_refused():
    with pytest.raises(ValueError, match="MoE"):
        perf.layer_matmul_params(get_preset("tiny-moe"))


def test_queue_forwards_is_the_first_in_first_out_makespan():
    # Slots A, B: A runs row 0 (forwards 1-3); B row 1 (1), then row 2 (2-3); both
    # free after forward 3, so row 3 runs 4-5.
    assert perf.queue_forwards([3, 1, 2, 2], 2) == 5
    assert perf.queue_forwards([3, 1], 4) == 3  # fewer rows than slots: the slowest row
    assert perf.queue_forwards([5, 5, 5], 1) == 15
    assert perf.queue_forwards([], 2) == 0
    with pytest.raises(ValueError, match="slots"):
        perf.queue_forwards([1], 0)
