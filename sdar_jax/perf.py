"""Useful-work accounting for speed reports: FLOPs, weight bytes, device peaks.

MFU here counts *useful* FLOPs only, so a kernel cannot raise it by doing
masked or repeated work:
  * every dense matmul of the decoder layers, for every token of the row (a
    block-diffusion row `[xt ; x0]` has 2L tokens and both halves are needed:
    the clean half supplies the keys and values the noisy half attends to);
  * the LM head only for the tokens whose logits are used (the noisy half);
  * attention (Q K^T and P V) only for the (query, key) pairs the mask allows,
    not the dense `row x row` square;
  * backward = 2x forward; rematerialised recomputation is not counted;
  * no FLOPs for norms, RoPE, softmax or the optimizer (negligible, and not
    matmul-unit work).

Peak figures are the vendors' published dense (no sparsity) bf16 tensor-core
rates and HBM bandwidths; an unknown device gives None and the caller says so
(or passes its own figures).
"""

from __future__ import annotations

import dataclasses
import heapq
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.config import ModelConfig
from sdar_jax.ops import masks


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Published peaks of one accelerator: dense bf16 FLOP/s and HBM bytes/s."""

    bf16_flops: float
    hbm_bytes_per_s: float


# Matched against `jax.Device.device_kind` by substring, most specific first.
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    ("GH200", DevicePeak(989.4e12, 4.0e12)),
    ("H200", DevicePeak(989.4e12, 4.8e12)),
    ("H100 PCIe", DevicePeak(756.0e12, 2.0e12)),
    ("H100 NVL", DevicePeak(835.0e12, 3.9e12)),
    ("H100", DevicePeak(989.4e12, 3.35e12)),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", DevicePeak(312.0e12, 2.039e12)),
    ("A100", DevicePeak(312.0e12, 1.555e12)),
)


def device_peak(device_kind: str) -> DevicePeak | None:
    """The published peaks for a `device_kind` string, or None when it is not in the table."""
    for name, peak in DEVICE_PEAKS:
        if name in device_kind:
            return peak
    return None


def layer_matmul_params(config: ModelConfig) -> int:
    """Weights one token multiplies through in all decoder layers (dense models).

    q/k/v/o projections and the SwiGLU MLP; embeddings, head and norms excluded.
    """
    if config.is_moe:
        raise ValueError("layer_matmul_params: MoE configs need the routed expert count; "
                         f"{config.model_type} is not supported")
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    return config.num_layers * (attn + 3 * h * config.intermediate_size)


def allowed_pairs(mask: masks.MaskSpec, positions: jnp.ndarray, segment_ids: jnp.ndarray | None) -> int:
    """(query, key) pairs a self-attention mask allows, summed over the batch.

    Args:
      positions, segment_ids: [batch, row] int32 (the training row's metadata).
    """
    row = positions.shape[1]
    if row * row >= 2**31:
        raise ValueError(f"allowed_pairs: row length {row} overflows the int32 per-row count")
    dense = masks.dense_mask(mask, positions, positions, segment_ids, segment_ids)
    return int(np.asarray(dense.sum(axis=(1, 2), dtype=jnp.int32)).astype(np.int64).sum())


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Useful FLOPs of one training step (forward + backward), by part."""

    layers: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.head


def train_step_flops(config: ModelConfig, *, row_tokens: int, logit_tokens: int, pairs: int) -> StepFlops:
    """Useful FLOPs of a training step (module docstring).

    Args:
      config: a dense model config.
      row_tokens: tokens through the layers, summed over the batch (2L per block-diffusion row).
      logit_tokens: tokens whose logits are computed (L per block-diffusion row).
      pairs: allowed (query, key) pairs summed over the batch (`allowed_pairs`).
    """
    fwd_bwd = 3.0  # forward 1x, backward 2x
    layers = fwd_bwd * 2.0 * layer_matmul_params(config) * row_tokens
    attention = fwd_bwd * 4.0 * config.head_dim * config.num_heads * config.num_layers * pairs
    head = fwd_bwd * 2.0 * config.hidden_size * config.vocab_size * logit_tokens
    return StepFlops(layers=layers, attention=attention, head=head)


def forward_weight_bytes(config: ModelConfig, itemsize: int) -> int:
    """Bytes of weights one decoding forward must read from memory.

    Every parameter except the input embedding table (only the looked-up rows
    are read; with tied embeddings the table is the head and is read whole).
    """
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (config.num_params - embed) * itemsize


def bandwidth_roofline_tokens_per_s(config: ModelConfig, *, itemsize: int, hbm_bytes_per_s: float,
                                    tokens_per_forward: float) -> float:
    """Batch-1 decoding upper bound: one weight read per forward, `tokens_per_forward` tokens each."""
    return tokens_per_forward * hbm_bytes_per_s / forward_weight_bytes(config, itemsize)


def queue_forwards(row_forwards: Sequence[int], slots: int) -> int:
    """The fewest batch forwards in which `slots` slots decode rows with these forward
    counts, taken first in, first out: the first `slots` rows start at the first
    forward; a slot whose row ends at forward t takes the next waiting row, whose
    first forward is t + 1. What continuous batching can reach for these rows (in
    this order); with len(row_forwards) <= slots, the largest count.
    """
    if slots < 1:
        raise ValueError(f"queue_forwards: slots must be >= 1, got {slots}")
    ends = sorted(int(f) for f in row_forwards[:slots])
    for forwards in row_forwards[slots:]:
        heapq.heapreplace(ends, ends[0] + int(forwards))
    return max(ends, default=0)


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` runs, after one untimed (compiling) run."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
