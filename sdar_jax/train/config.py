"""The run configuration: one `ml_collections.ConfigDict` per training run.

`base_config()` holds every field with its default; the files under
`configs/` start from it and set what their run needs (big_vision style:
`get_config(arg)` in each file, overridable on the command line with
`--config.section.field=value`). Sections:

- model: the architecture (a preset name, or a Hugging Face config.json; the
  `train.init_from` checkpoint's own config when that is set), architecture
  `overrides`, and the runtime fields that do not change the weights.
- objective: "sdar" (block diffusion, spec §2) or "ar" (next-token baseline).
- data: sources, tokenizer, packing length, global batch, seed.
- optimizer: AdamW, warmup + cosine decay to a floor, clipping, accumulation.
- train: steps, intervals, checkpointing, workdir, init_from, seed, and
  `allow_config_change` (see `check_resume`).
- mesh: device mesh axis sizes and logical axis rules (`sdar_jax.parallel`).

Unset optional fields are `None` (typed placeholders, so command-line
overrides still parse to the right type).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from sdar_jax import config as model_config_lib
from sdar_jax.config import ModelConfig
from sdar_jax.diffusion.loss import NORMALIZATIONS

OBJECTIVES = ("sdar", "ar")


class RunConfigError(ValueError):
    """A field of the run configuration is missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One field whose value differs between a checkpoint's config and the new one.

    fixed: the field is part of the architecture or the data layout (never
    changeable on resume).
    """

    field: str
    old: Any
    new: Any
    fixed: bool

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r}"


class ConfigChangeError(RunConfigError):
    """A resume would continue a checkpoint under a different config."""

    def __init__(self, message: str, changes: list[ConfigChange]):
        self.changes = changes
        super().__init__(message)


_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl")


def _architecture_overrides() -> ml_collections.ConfigDict:
    """A ConfigDict with every architecture field of ModelConfig unset (typed
    placeholders), so `--config.model.overrides.num_layers=2` parses."""
    hints = typing.get_type_hints(ModelConfig)
    fields = {}
    for name in ModelConfig.__dataclass_fields__:
        if name in _RUNTIME_FIELDS:
            continue
        kind = hints[name]
        if isinstance(kind, types.UnionType):  # `int | None`
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        fields[name] = placeholder(kind)
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    """Every run-config field with its default value."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict(dict(
        # Exactly one of preset / hf_config, unless train.init_from is set
        # (then the checkpoint's config.json is the architecture).
        preset=placeholder(str),
        hf_config=placeholder(str),
        # Architecture fields replaced on top (e.g. vocab_size for a tokenizer);
        # every ModelConfig architecture field, None = keep.
        overrides=_architecture_overrides(),
        # Runtime: compute dtype, master-weight dtype, remat, attention kernel.
        dtype="float32",
        param_dtype="float32",
        remat_policy="none",
        # "auto": the Pallas kernels on GPU/TPU, the XLA reference on CPU.
        attention_impl="auto",
    ))

    config.objective = ml_collections.ConfigDict(dict(
        kind="sdar",
        block_size=placeholder(int),  # None: the model config's block_size.
        normalization="non_prompt",  # or "masked" (how the released models were trained).
        aux_loss_coef=placeholder(float),  # None: the model's router_aux_loss_coef.
        eps=1e-3,
        max_tries=10,
        # Adaptation aids (spec §2.7); the defaults keep the release's objective.
        # The logits convention is the model's (model.overrides.logits_convention).
        # Noise every example twice with complementary masks (levels t, 1 - t).
        complementary_masking=False,
        # Mixed B: every micro-batch draws its block size from this set, e.g. (4, 8);
        # None: one size. Excludes the schedule below.
        mixed_block_sizes=placeholder(tuple),
        # Block-size schedule: start at this size and double up to block_size in
        # equal stages over block_schedule_steps steps; None: no schedule.
        block_schedule_start=placeholder(int),
        block_schedule_steps=0,
        # Distillation from an AR teacher where a masked token's in-block left
        # context is clean (sdar_jax.diffusion.loss.sdar_loss); 0: off.
        distill_weight=0.0,
        distill_from=placeholder(str),  # None: train.init_from.
        # AR term: next-token CE on the clean half of the [xt ; x0] row, times this
        # weight (sdar_jax.diffusion.loss.sdar_loss). Needs a model with
        # logits_convention="shifted" and block_attention="causal"; 0: off.
        ar_loss_weight=0.0,
    ))

    # Read by the trainer (seq_len, global_batch_size, seed, tokenizer_dir) and
    # by sdar_jax.data.pipeline.DataConfig (the rest; see its docstring).
    config.data = ml_collections.ConfigDict(dict(
        train_path=placeholder(str),
        eval_path=placeholder(str),  # None: no eval.
        tokenizer_dir=placeholder(str),
        seq_len=2048,
        global_batch_size=256,
        seed=0,
        long_examples="raise",
        # "error": a malformed record stops the run naming its file:line; "skip":
        # it is dropped, with a warning and a count (sdar_jax.data.pipeline).
        on_bad_record="error",
        append_eos=True,
        shuffle=True,
        num_epochs=placeholder(int),
        packing_bins=placeholder(int),
        worker_count=0,
        read_threads=4,
    ))

    config.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=1e-5,
        # The cosine decays to peak_lr * end_lr_ratio.
        end_lr_ratio=0.1,
        warmup_steps=100,
        decay_steps=placeholder(int),  # None: train.steps.
        weight_decay=0.1,
        decay_embeddings=True,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        clip_norm=1.0,
        grad_accum_steps=1,
    ))

    config.train = ml_collections.ConfigDict(dict(
        steps=1000,
        log_every=10,
        eval_every=500,
        eval_batches=8,
        checkpoint_every=500,
        keep=3,
        async_checkpointing=True,
        workdir=placeholder(str),
        init_from=placeholder(str),  # a params checkpoint dir (hf-to-jax output).
        seed=0,
        export=True,
        progress_bar=True,
        # Resume even though optimizer / schedule / interval fields differ from
        # the checkpoint's config (the changes are printed); see check_resume.
        allow_config_change=False,
    ))

    config.mesh = ml_collections.ConfigDict(dict(
        # Axis sizes; -1 takes the devices left over (sdar_jax.parallel).
        data=-1,
        fsdp=1,
        tensor=1,
        expert=1,
        # (logical axis name, mesh axis or axes or None) pairs; None: the defaults.
        logical_rules=placeholder(tuple),
    ))

    # Dotted names of fields this run cannot start without (see check_required).
    config.required = ()
    return config


def check_required(config: ml_collections.ConfigDict) -> None:
    """Raises RunConfigError naming the first of `config.required` that is unset."""
    for dotted in config.required:
        require(config, dotted, "this config leaves it to the command line")


def require(config: ml_collections.ConfigDict, dotted: str, why: str) -> Any:
    """The value of a field that must be set, else a RunConfigError saying how to set it."""
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    if value is None or value == "":
        raise RunConfigError(f"config field {dotted} is required ({why}); set --config.{dotted}=...")
    return value


def _runtime_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return dict(
        dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
        attention_impl=m.attention_impl,
    )


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: architecture from init_from / hf_config / preset,
    then `model.overrides`, then the runtime fields."""
    m = config.model
    init_from = config.train.init_from
    sources = [name for name in ("preset", "hf_config") if m[name]]
    if init_from:
        if sources:
            raise RunConfigError(
                f"train.init_from={init_from!r} supplies the architecture; unset model.{sources[0]}"
            )
        arch = model_config_lib.load_hf_config(init_from)
    elif len(sources) != 1:
        raise RunConfigError(
            "exactly one of model.preset and model.hf_config must be set when train.init_from "
            f"is not (got preset={m.preset!r}, hf_config={m.hf_config!r})"
        )
    elif m.preset:
        arch = model_config_lib.get_preset(m.preset)
    else:
        arch = model_config_lib.load_hf_config(m.hf_config)
    changes = {k: v for k, v in m.overrides.to_dict().items() if v is not None}
    architecture = set(ModelConfig.__dataclass_fields__) - set(_RUNTIME_FIELDS)
    unknown = sorted(set(changes) - architecture)
    if unknown:
        raise RunConfigError(
            f"model.overrides names {unknown}, which are not ModelConfig architecture fields "
            "(runtime fields are model.dtype, model.param_dtype, model.remat_policy, model.attention_impl)"
        )
    changes.update(_runtime_fields(config))
    return arch.replace(**changes)


def validate(config: ml_collections.ConfigDict, model: ModelConfig) -> None:
    """Raises RunConfigError on inconsistent fields (checked before any compute)."""
    obj, opt, train, data = config.objective, config.optimizer, config.train, config.data
    if obj.kind not in OBJECTIVES:
        raise RunConfigError(f"objective.kind is {obj.kind!r}; expected one of {OBJECTIVES}")
    if obj.normalization not in NORMALIZATIONS:
        raise RunConfigError(
            f"objective.normalization is {obj.normalization!r}; expected one of {NORMALIZATIONS}"
        )
    if obj.kind == "sdar":
        block = data_block_size(config, model)
        if obj.complementary_masking and not 0.0 < obj.eps < 0.5:
            raise RunConfigError(
                f"objective.complementary_masking needs objective.eps in (0, 0.5), got {obj.eps}"
            )
        if model.mask_token_id is None:
            raise RunConfigError(
                "objective.kind='sdar' needs a mask token: set model.overrides.mask_token_id"
            )
        if obj.ar_loss_weight < 0:
            raise RunConfigError(f"objective.ar_loss_weight must be >= 0, got {obj.ar_loss_weight}")
        if obj.ar_loss_weight > 0 and (model.logits_convention, model.block_attention) != (
                "shifted", "causal"):
            raise RunConfigError(
                f"objective.ar_loss_weight ({obj.ar_loss_weight}) needs the model's "
                f"logits_convention 'shifted' and block_attention 'causal' (got "
                f"{model.logits_convention!r}, {model.block_attention!r}): set "
                "model.overrides.logits_convention / model.overrides.block_attention")
        if data.seq_len % block:
            several = len(block_sizes(config, model)) > 1
            raise RunConfigError(
                f"data.seq_len ({data.seq_len}) must be a multiple of the block size ({block})"
                + (", the least common multiple of the block sizes" if several else "")
            )
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep"):
        if train[name] < 1:
            raise RunConfigError(f"train.{name} must be >= 1, got {train[name]}")
    if opt.grad_accum_steps < 1:
        raise RunConfigError(f"optimizer.grad_accum_steps must be >= 1, got {opt.grad_accum_steps}")
    if data.global_batch_size % opt.grad_accum_steps:
        raise RunConfigError(
            f"data.global_batch_size ({data.global_batch_size}) must be divisible by "
            f"optimizer.grad_accum_steps ({opt.grad_accum_steps})"
        )
    if opt.clip_norm <= 0 or opt.peak_lr <= 0:
        raise RunConfigError(
            f"optimizer.clip_norm ({opt.clip_norm}) and optimizer.peak_lr ({opt.peak_lr}) must be positive"
        )
    if not 0.0 <= opt.end_lr_ratio <= 1.0:
        raise RunConfigError(f"optimizer.end_lr_ratio must lie in [0, 1], got {opt.end_lr_ratio}")
    if opt.warmup_steps < 0:
        raise RunConfigError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")


# Fields a resumed run may change freely: where things go and how the same
# computation is laid out or shown (the mesh: orbax reshards on restore).
_FREE_ON_RESUME = (
    "required", "mesh.", "train.workdir", "train.allow_config_change", "train.progress_bar",
    "train.async_checkpointing", "model.attention_impl", "model.remat_policy", "data.read_threads",
)
# The architecture and the data layout: a checkpoint cannot continue under others.
_FIXED_ON_RESUME = (
    "model.", "train.init_from", "objective.kind", "objective.block_size", "data.train_path",
    "data.tokenizer_dir", "data.seq_len", "data.global_batch_size", "data.seed",
    "data.long_examples", "data.append_eos", "data.shuffle", "data.num_epochs",
    "data.packing_bins", "data.worker_count",
)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def resume_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[ConfigChange]:
    """The fields that differ between a checkpoint's saved config and a new one
    (both `ConfigDict.to_dict()`-style; compared after a JSON round trip).

    A field the saved config lacks (written before the field existed) counts
    only when the new value differs from the field's default. Fields of
    `_FREE_ON_RESUME` are left out.
    """
    old = _flatten(saved)
    now = _flatten(json.loads(json.dumps(dict(new))))
    defaults = _flatten(json.loads(json.dumps(base_config().to_dict())))
    changes = []
    for field in sorted(now):
        if _matches(field, _FREE_ON_RESUME):
            continue
        if field in old:
            before = old[field]
        elif field in defaults:
            before = defaults[field]
        else:
            before = "<absent>"
        if before != now[field]:
            changes.append(ConfigChange(field, before, now[field], _matches(field, _FIXED_ON_RESUME)))
    return changes


def check_resume(
    saved: Mapping[str, Any], new: Mapping[str, Any], *, step: int, allow_change: bool
) -> list[ConfigChange]:
    """Compares the config a checkpoint was written with to the one resuming it.

    Returns the changes that `allow_change` lets through (empty when none).

    Raises:
      ConfigChangeError: an architecture or data-layout field changed (always
        refused), or any other field did and `allow_change` is False.
    """
    changes = resume_changes(saved, new)
    fixed = [c for c in changes if c.fixed]
    if fixed:
        raise ConfigChangeError(
            f"cannot resume the checkpoint of step {step}: the architecture or data layout "
            f"differs from its config ({'; '.join(map(str, fixed))}); use a new train.workdir",
            fixed)
    if changes and not allow_change:
        raise ConfigChangeError(
            f"the config differs from the one the checkpoint of step {step} was written with "
            f"({'; '.join(map(str, changes))}); set --config.train.allow_config_change=True to "
            "resume with these changes, or use a new train.workdir", changes)
    return changes


def block_size(config: ml_collections.ConfigDict, model: ModelConfig) -> int:
    """objective.block_size, else the model's block_size."""
    block = config.objective.block_size or model.block_size
    if not block or block < 1:
        raise RunConfigError(
            "objective.block_size is unset and the model config has no block_size; set "
            "--config.objective.block_size=4"
        )
    return int(block)


def block_sizes(config: ml_collections.ConfigDict, model: ModelConfig) -> tuple[int, ...]:
    """The block sizes an SDAR run trains at, in order (see `train.step.block_index`).

    `objective.mixed_block_sizes` (sorted), else the doubling schedule from
    `objective.block_schedule_start` up to `block_size`, else `(block_size,)`.
    """
    obj = config.objective
    mixed, start = obj.mixed_block_sizes, obj.block_schedule_start
    if mixed and start is not None:
        raise RunConfigError(
            "objective.mixed_block_sizes and objective.block_schedule_start exclude each other; "
            "unset one"
        )
    if mixed:
        sizes = tuple(sorted({int(b) for b in mixed}))
        if any(b < 1 for b in sizes) or len(sizes) != len(tuple(mixed)):
            raise RunConfigError(
                f"objective.mixed_block_sizes must hold distinct positive ints, got {tuple(mixed)}"
            )
        return sizes
    target = block_size(config, model)
    if start is None:
        return (target,)
    if start < 1 or obj.block_schedule_steps < 1:
        raise RunConfigError(
            f"a block-size schedule needs objective.block_schedule_start >= 1 and "
            f"objective.block_schedule_steps >= 1, got {start} and {obj.block_schedule_steps}"
        )
    sizes = [int(start)]
    while sizes[-1] < target:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != target:
        raise RunConfigError(
            f"objective.block_schedule_start ({start}) must reach block_size ({target}) by doubling"
        )
    return tuple(sizes)


def data_block_size(config: ml_collections.ConfigDict, model: ModelConfig) -> int:
    """The multiple examples are padded to: for SDAR the least common multiple of its
    block sizes (every size then sees examples on its block boundaries), 1 for AR."""
    if config.objective.kind != "sdar":
        return 1
    return math.lcm(*block_sizes(config, model))


def aux_loss_coef(config: ml_collections.ConfigDict, model: ModelConfig) -> float:
    """objective.aux_loss_coef, else the model's router_aux_loss_coef (0 for dense models)."""
    if not model.is_moe:
        return 0.0
    coef = config.objective.aux_loss_coef
    return float(model.router_aux_loss_coef if coef is None else coef)


def workdir(config: ml_collections.ConfigDict) -> str:
    return os.path.abspath(require(config, "train.workdir", "where checkpoints and logs go"))


# ---------------------------------------------------------------------------
# The paper-scale recipe (configs/sdar_*.py)

# `<|MASK|>` of the SDAR tokenizer, as the released SDAR configs say.
SDAR_MASK_TOKEN_ID = model_config_lib.get_preset("sdar-1.7b").mask_token_id
SDAR_STAGES = ("pretrain", "sft")
# Spec §2: ~50B tokens of continued pretraining (whole sequence noised), then
# ~4B tokens of SFT (prompt kept clean), block size 4.
_STAGE_TOKENS = {"pretrain": 50e9, "sft": 4e9}


def sdar_recipe(
    stage: str | None, *, remat_policy: str, mesh: dict[str, int], seq_len: int = 4096,
    global_batch_size: int = 256,
) -> ml_collections.ConfigDict:
    """The AR -> SDAR adaptation of spec §2 for one released model size.

    `stage="pretrain"` starts from a converted AR checkpoint (`train.init_from`,
    e.g. Qwen3-*-Base after `convert_checkpoint.py hf-to-jax`); `stage="sft"`
    from the pretrain stage's export. The number of steps is the stage's token
    budget over `global_batch_size * seq_len` tokens per step. Data paths,
    tokenizer (the SDAR one, which has `<|MASK|>` = 151669), init_from and
    workdir are left to the command line (`config.required`).

    Settings the spec does not give (learning rate, warmup, batch, sequence
    length) are conventional continued-training values: 4096-token rows like
    Qwen3's pretraining, ~1M tokens per step, peak learning rate 1e-5 with a
    cosine decay to 10%. The loss is normalised by the number of masked tokens,
    how the released checkpoints were trained (spec §2.4).
    """
    stage = stage or "pretrain"
    if stage not in SDAR_STAGES:
        raise RunConfigError(f"config arg (stage) is {stage!r}; expected one of {SDAR_STAGES}")
    config = base_config()
    config.model.overrides.update(dict(mask_token_id=SDAR_MASK_TOKEN_ID, block_size=4))
    config.model.update(
        dtype="bfloat16", param_dtype="float32", remat_policy=remat_policy, attention_impl="auto",
    )
    config.objective.update(kind="sdar", block_size=4, normalization="masked")
    # Pretraining documents longer than a row are split; so are the rare SFT
    # conversations that exceed it (the response tail still trains).
    config.data.update(seq_len=seq_len, global_batch_size=global_batch_size, long_examples="split")
    tokens_per_step = seq_len * global_batch_size
    steps = int(-(-_STAGE_TOKENS[stage] // tokens_per_step))
    config.optimizer.update(
        peak_lr=1e-5, end_lr_ratio=0.1, warmup_steps=500 if stage == "pretrain" else 100,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum_steps=1,
    )
    config.train.update(
        steps=steps, log_every=10, eval_every=1000, eval_batches=16, checkpoint_every=1000,
        keep=3, export=True,
    )
    config.mesh.update(mesh)
    config.required = ("train.init_from", "data.train_path", "data.tokenizer_dir", "train.workdir")
    return config
