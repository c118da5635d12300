"""Model configuration: architecture of Qwen3 / SDAR / Llama decoders (dense and MoE).

`ModelConfig` holds the architecture (what a Hugging Face `config.json` says)
and the runtime choices that do not change the weights (compute and parameter
dtype, remat policy, attention implementation). Layers are always
scanned (`nn.scan`), so every layer has the same structure.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# model_type values this project reads, mapped to the family they belong to.
_QWEN3_TYPES = ("qwen3", "sdar")
_QWEN3_MOE_TYPES = ("qwen3_moe", "sdar_moe")
_LLAMA_TYPES = ("llama",)
SUPPORTED_MODEL_TYPES = _QWEN3_TYPES + _QWEN3_MOE_TYPES + _LLAMA_TYPES

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "pallas", "auto")
# How a block-diffusion model reads the token at position j (spec §2.7):
# "same_position" (SDAR's release) from the output at j, "shifted" (Dream,
# Fast-dLLM v2) from the output at j - 1, as an AR model does.
LOGITS_CONVENTIONS = ("same_position", "shifted")
# Attention among the tokens of one block: SDAR's ("bidirectional") or "causal" (an
# adaptation aid beyond spec §2.7, docs/adaptation.md: a committed token's keys and
# values are then computed exactly as an AR model computes them).
BLOCK_ATTENTIONS = ("bidirectional", "causal")


class ConfigError(ValueError):
    """A model configuration field is missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and runtime settings of one decoder.

    Architecture fields follow the Hugging Face names where one exists
    (`num_layers` is `num_hidden_layers`, `num_heads` is `num_attention_heads`).
    `num_experts == 0` means a dense SwiGLU MLP in every layer.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    # Mixture of experts (Qwen3-MoE); 0 experts = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    # SDAR block diffusion; None for plain AR checkpoints.
    block_size: int | None = None
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    logits_convention: str = "same_position"
    block_attention: str = "bidirectional"
    # Runtime: do not change the weights.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"  # Pallas on GPU/TPU, the XLA reference on CPU

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def causal_in_block(self) -> bool:
        """Whether a block's tokens attend only to its earlier positions (`MaskSpec.causal_in_block`)."""
        return self.block_attention == "causal"

    @property
    def is_diffusion(self) -> bool:
        """True when the checkpoint carries a mask token (an SDAR model)."""
        return self.mask_token_id is not None

    @property
    def num_params(self) -> int:
        """Number of parameters (embedding and head counted separately unless tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        if self.is_moe:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
        else:
            mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + norms + mlp) + embed + h

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require_positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")


def _validate(cfg: ModelConfig) -> None:
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"ModelConfig.model_type {cfg.model_type!r} is not supported; "
            f"expected one of {SUPPORTED_MODEL_TYPES}"
        )
    _require_positive(
        cfg, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "max_position_embeddings",
    )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"ModelConfig.num_heads ({cfg.num_heads}) must be divisible by "
            f"num_kv_heads ({cfg.num_kv_heads})"
        )
    if cfg.is_moe:
        _require_positive(cfg, "num_experts_per_tok", "moe_intermediate_size")
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise ConfigError(
                f"ModelConfig.num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds "
                f"num_experts ({cfg.num_experts})"
            )
    else:
        _require_positive(cfg, "intermediate_size")
    if cfg.block_size is not None:
        _require_positive(cfg, "block_size")
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise ConfigError(
            f"ModelConfig.mask_token_id {cfg.mask_token_id} is outside the vocabulary "
            f"[0, {cfg.vocab_size})"
        )
    if cfg.rope_theta <= 0:
        raise ConfigError(f"ModelConfig.rope_theta must be positive, got {cfg.rope_theta}")
    for name, allowed in (
        ("dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES),
        ("attention_impl", ATTENTION_IMPLS), ("logits_convention", LOGITS_CONVENTIONS),
        ("block_attention", BLOCK_ATTENTIONS),
    ):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"ModelConfig.{name} is {getattr(cfg, name)!r}; expected one of {allowed}"
            )


# ---------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig


def _field(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return hf[key]


def _rope_theta(hf: Mapping[str, Any], source: str) -> float:
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; older files a top-level key.
    params = hf.get("rope_parameters")
    if params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported")
        return float(params["rope_theta"])
    scaling = hf.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported")
    return float(_field(hf, "rope_theta", source))


def _single_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json", **runtime: Any) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face config dict.

    Args:
      hf: the parsed `config.json`.
      source: the file name used in error messages.
      **runtime: runtime fields (dtype, param_dtype, remat_policy, ...) to set.
    """
    model_type = _field(hf, "model_type", source)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"expected one of {SUPPORTED_MODEL_TYPES}"
        )
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    for bias_field in ("attention_bias", "mlp_bias"):
        if hf.get(bias_field):
            raise ConfigError(f"{source}: {bias_field}=true is not supported")
    hidden_act = hf.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"{source}: hidden_act {hidden_act!r} is not supported; expected 'silu'")
    hidden = int(_field(hf, "hidden_size", source))
    heads = int(_field(hf, "num_attention_heads", source))
    is_moe = model_type in _QWEN3_MOE_TYPES
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(_field(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(_field(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(hf.get("intermediate_size", 0) if is_moe else _field(hf, "intermediate_size", source)),
        rms_norm_eps=float(_field(hf, "rms_norm_eps", source)),
        rope_theta=_rope_theta(hf, source),
        max_position_embeddings=int(_field(hf, "max_position_embeddings", source)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type not in _LLAMA_TYPES,
        block_size=hf.get("block_size"),
        mask_token_id=hf.get("mask_token_id"),
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        logits_convention=hf.get("logits_convention", "same_position"),
        block_attention=hf.get("block_attention", "bidirectional"),
    )
    if is_moe:
        mlp_only = list(hf.get("mlp_only_layers") or [])
        sparse_step = int(hf.get("decoder_sparse_step", 1))
        if mlp_only or sparse_step != 1:
            raise ConfigError(
                f"{source}: mixed dense/MoE layers (mlp_only_layers={mlp_only}, "
                f"decoder_sparse_step={sparse_step}) are not supported; every layer must be MoE"
            )
        fields.update(
            # transformers 5 saves Qwen3-MoE's expert count as num_local_experts.
            num_experts=int(
                hf["num_local_experts"] if "num_experts" not in hf and "num_local_experts" in hf
                else _field(hf, "num_experts", source)
            ),
            num_experts_per_tok=int(_field(hf, "num_experts_per_tok", source)),
            moe_intermediate_size=int(_field(hf, "moe_intermediate_size", source)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    fields.update(runtime)
    return ModelConfig(**fields)


def read_hf_config_json(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(the file's path, its parsed dict) of a `config.json` file or a directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path) as f:
        try:
            hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return path, hf


def load_hf_config(path: str | os.PathLike, **runtime: Any) -> ModelConfig:
    """Reads a `config.json` file (or a directory holding one)."""
    path, hf = read_hf_config_json(path)
    return from_hf_config(hf, source=path, **runtime)


# The `architectures` entry each model type is written with: SDAR's release
# names its own classes (engines such as lmdeploy, SGLang and JetEngine
# recognise a block-diffusion model by them).
HF_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "sdar": "SDARForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "sdar_moe": "SDARMoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
_SDAR_TYPE_OF = {"qwen3": "sdar", "qwen3_moe": "sdar_moe"}


def export_model_type(cfg: ModelConfig) -> str:
    """The model_type a checkpoint of `cfg` is written with: its own, except a
    Qwen3(-MoE) network trained as a block-diffusion model (it has a mask
    token and a block size), which is an SDAR model (spec §2)."""
    if cfg.is_diffusion and cfg.block_size is not None:
        return _SDAR_TYPE_OF.get(cfg.model_type, cfg.model_type)
    return cfg.model_type


def _same_ids(value: Any, wanted: int | None) -> bool:
    return _single_id(value) == wanted


def to_hf_config(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` dict of `cfg`.

    Args:
      cfg: the model config.
      base: the source checkpoint's `config.json`, if any: every key it has
        that `cfg` does not describe (`fuse_cross_entropy`, `use_cache`,
        `rope_scaling`, `auto_map`, ...) is kept as it was, and so are its
        `architectures` when the model type is unchanged and its token-id
        lists when their first id is the one `cfg` holds.

    SDAR model types stay `sdar` / `sdar_moe` (architectures
    `SDARForCausalLM` / `SDARMoeForCausalLM`, what the release writes; the
    network is Qwen3's); `block_size`, `mask_token_id` and a non-default
    `logits_convention` or `block_attention` are written as fields.
    """
    base = dict(base or {})
    model_type = export_model_type(cfg)
    hf: dict[str, Any] = dict(base)
    if base.get("model_type") != model_type or not base.get("architectures"):
        hf["architectures"] = [HF_ARCHITECTURES[model_type]]
    hf.update(
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
    )
    hf.setdefault("attention_dropout", 0.0)
    if model_type != "llama" or "use_sliding_window" in base:  # Llama has no sliding window fields
        hf["use_sliding_window"] = False
        hf.setdefault("sliding_window", None)
    for key in ("bos_token_id", "eos_token_id"):
        if key not in base or not _same_ids(base[key], getattr(cfg, key)):
            hf[key] = getattr(cfg, key)
    # transformers 5 writes rope_parameters and dtype where older files have
    # rope_theta and torch_dtype: keep the source's form.
    if isinstance(base.get("rope_parameters"), Mapping):
        hf["rope_parameters"] = {**base["rope_parameters"], "rope_theta": cfg.rope_theta}
    if "rope_theta" in base or "rope_parameters" not in base:
        hf["rope_theta"] = cfg.rope_theta
    if "dtype" in base:
        hf["dtype"] = cfg.param_dtype
    if "torch_dtype" in base or "dtype" not in base:
        hf["torch_dtype"] = cfg.param_dtype
    if model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.is_moe:
        # transformers 5 spells the expert count num_local_experts.
        experts_key = "num_local_experts" if "num_local_experts" in base and "num_experts" not in base else "num_experts"
        hf.update(
            {experts_key: cfg.num_experts},
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        hf.setdefault("output_router_logits", False)
        if "num_local_experts" in base:
            hf["num_local_experts"] = cfg.num_experts
    for key in ("block_size", "mask_token_id"):
        if getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
        else:
            hf.pop(key, None)
    for key, default in (("logits_convention", "same_position"), ("block_attention", "bidirectional")):
        if getattr(cfg, key) != default:
            hf[key] = getattr(cfg, key)
        else:
            hf.pop(key, None)
    return hf


# ---------------------------------------------------------------------------
# Presets

_SDAR_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    block_size=4,
    mask_token_id=151669,
    bos_token_id=151643,
    eos_token_id=151643,
)

PRESETS: dict[str, ModelConfig] = {
    "sdar-1.7b": ModelConfig(
        model_type="sdar", hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
        intermediate_size=6144, **_SDAR_COMMON,
    ),
    "sdar-4b": ModelConfig(
        model_type="sdar", hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
        intermediate_size=9728, **_SDAR_COMMON,
    ),
    "sdar-8b": ModelConfig(
        model_type="sdar", hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
        intermediate_size=12288, **_SDAR_COMMON,
    ),
    "sdar-30b-a3b": ModelConfig(
        model_type="sdar_moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, **_SDAR_COMMON,
    ),
    # Tiny shapes for tests and the CPU demo.
    "tiny": ModelConfig(
        model_type="sdar", vocab_size=512, hidden_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
        block_size=4, mask_token_id=511, bos_token_id=0, eos_token_id=1,
    ),
    "tiny-moe": ModelConfig(
        model_type="sdar_moe", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=0, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512,
        block_size=4, mask_token_id=511, bos_token_id=0, eos_token_id=1,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with fields optionally replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
