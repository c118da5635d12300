"""Tiny random `transformers` checkpoints to test sdar_jax against.

Every builder returns a model whose weights are *all* random (norm scales
included, drawn around 1), so a transposed or misplaced tensor cannot hide
behind an all-ones initialisation. Weights depend only on `seed`.

Typical use::

    from tests.helpers import hf_models

    hf_dir, model = hf_models.make_checkpoint(tmp_path / "hf", "qwen3", tie_word_embeddings=True)
    ref = hf_models.hf_logits(model, tokens, positions, mask)   # numpy float32

Families: "qwen3" (Qwen3ForCausalLM, q/k norm), "qwen3_moe"
(Qwen3MoeForCausalLM), "llama" (LlamaForCausalLM, no q/k norm). The default
sizes match the sdar_jax presets "tiny" / "tiny-moe": hidden 64, 4 heads,
2 kv heads, head_dim 16, vocab 512.

This module imports torch and transformers: only tests use it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import transformers

FAMILIES = ("qwen3", "qwen3_moe", "llama")

# Shared sizes; vocab and widths match sdar_jax's "tiny" preset.
TINY_DIMS: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
)
# Extra sizes for the MoE family (sdar_jax's "tiny-moe").
TINY_MOE_DIMS: dict[str, Any] = dict(
    num_hidden_layers=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)

_CONFIG_CLASSES = {
    "qwen3": transformers.Qwen3Config,
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "llama": transformers.LlamaConfig,
}
_MODEL_CLASSES = {
    "qwen3": transformers.Qwen3ForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "llama": transformers.LlamaForCausalLM,
}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_config(
    family: str, *, tie_word_embeddings: bool = False, rope_theta: float = 10000.0, **overrides: Any
) -> transformers.PretrainedConfig:
    """A tiny transformers config of `family` (see FAMILIES).

    Args:
      family: "qwen3", "qwen3_moe" or "llama".
      tie_word_embeddings: share the embedding with the output head.
      rope_theta: the RoPE base (written as transformers 5's rope_parameters).
      **overrides: any config field, replacing the TINY_DIMS / TINY_MOE_DIMS defaults.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    fields = dict(TINY_DIMS)
    if family == "qwen3_moe":
        fields.update(TINY_MOE_DIMS)
    fields.update(overrides)
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    return _CONFIG_CLASSES[family](tie_word_embeddings=tie_word_embeddings, **fields)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.08) -> None:
    """Overwrites every parameter in place: norm scales ~ 1 + 0.1 N(0, 1), the
    rest ~ scale N(0, 1). Deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = scale * noise
            param.copy_(value.to(param.dtype))


def build_model(
    family: str,
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str = "eager",
    **overrides: Any,
) -> transformers.PreTrainedModel:
    """A randomly initialised `*ForCausalLM` of `family`, in eval mode.

    Args:
      family: see FAMILIES.
      tie_word_embeddings: tied (no separate lm_head tensor in the files) or not.
      seed: weight seed.
      dtype: "float32" or "bfloat16" parameter dtype.
      attn_implementation: "eager" or "sdpa".
      **overrides: config fields (see hf_config), e.g. rope_theta=1e6.
    """
    config = hf_config(family, tie_word_embeddings=tie_word_embeddings, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](config)
    randomize_(model, seed)
    return model.to(_TORCH_DTYPES[dtype]).eval()


def save_model(model: transformers.PreTrainedModel, out_dir: str | os.PathLike, *,
               max_shard_size: str | int | None = None) -> str:
    """`save_pretrained` as safetensors; `max_shard_size` (e.g. "100KB") forces
    several shards plus `model.safetensors.index.json`. Returns the directory."""
    out_dir = os.fspath(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir


def make_checkpoint(
    out_dir: str | os.PathLike,
    family: str = "qwen3",
    *,
    max_shard_size: str | int | None = None,
    **build_kwargs: Any,
) -> tuple[str, transformers.PreTrainedModel]:
    """build_model(family, **build_kwargs) saved to out_dir; returns (dir, model)."""
    model = build_model(family, **build_kwargs)
    return save_model(model, out_dir, max_shard_size=max_shard_size), model


def load_model(hf_dir: str | os.PathLike, *, attn_implementation: str = "eager",
               dtype: str = "float32") -> transformers.PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(hf_dir), dtype=_TORCH_DTYPES[dtype], attn_implementation=attn_implementation,
    ).eval()


def additive_mask(allowed: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask [batch, q_len, kv_len] (True = may attend) as transformers'
    4-D float additive mask [batch, 1, q_len, kv_len] (0 keep, finfo.min drop).

    transformers 5.23's eager attention mishandles 4-D *boolean* masks, so
    custom masks are always passed in this form."""
    allowed = torch.as_tensor(np.asarray(allowed, dtype=bool))
    if allowed.ndim != 3:
        raise ValueError(f"mask must be [batch, q_len, kv_len], got shape {tuple(allowed.shape)}")
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def hf_logits(
    model: transformers.PreTrainedModel,
    tokens: np.ndarray,
    positions: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Runs the transformers model and returns float32 numpy logits.

    Args:
      model: a causal LM.
      tokens: [batch, seq] int token ids.
      positions: [batch, seq] int position ids, or None for 0..seq-1.
      allowed: [batch, seq, seq] bool custom attention mask (True = attend),
        or None for the model's own causal mask.

    Returns:
      [batch, seq, vocab] float32.
    """
    kwargs: dict[str, Any] = {"input_ids": torch.tensor(np.asarray(tokens, dtype=np.int64))}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions, dtype=np.int64))
    if allowed is not None:
        kwargs["attention_mask"] = additive_mask(allowed, model.dtype)
    with torch.no_grad():
        out = model(**kwargs, use_cache=False)
    return out.logits.float().numpy()
