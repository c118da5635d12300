"""AdamW with linear warmup, cosine decay to a floor, and global-norm clipping.

Weight decay mask: every parameter is decayed except the RMSNorm scales
(leaves named `scale`), and the embedding table when
`optimizer.decay_embeddings` is False. Norm scales multiply a normalised
activation: decaying them towards 0 shrinks the signal instead of regularising
capacity, which is why every common recipe (GPT-2/3, Llama, the Hugging Face
Trainer that SDAR's release trains with) exempts them. The Hugging Face
Trainer does decay embeddings and the LM head, so the default keeps them
decayed to match the reference recipe; the switch is there for runs that
prefer the GPT-style exemption. The mask goes by leaf *name*, not rank: layers
are stacked by `nn.scan`, so a norm scale is [layers, hidden], a 2-D array.

Gradient accumulation is not an optax wrapper here: `sdar_jax.train.step`
scans over micro-batches inside one jitted step and applies this optimizer
once per step.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from sdar_jax.train.config import RunConfigError

_NO_DECAY_LEAVES = ("scale",)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to peak_lr over warmup_steps, then cosine decay to
    peak_lr * end_lr_ratio at decay_steps (default: total_steps), flat after."""
    decay_steps = opt.decay_steps or total_steps
    if decay_steps <= opt.warmup_steps:
        raise RunConfigError(
            f"optimizer.decay_steps ({decay_steps}) must exceed optimizer.warmup_steps "
            f"({opt.warmup_steps})"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.peak_lr,
        warmup_steps=opt.warmup_steps,
        decay_steps=decay_steps,
        end_value=opt.peak_lr * opt.end_lr_ratio,
    )


def _leaf_name(path: tuple[Any, ...]) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """A pytree of bools like `params`: True where AdamW applies weight decay.

    Works on arrays and on ShapeDtypeStructs (only the tree paths are read).
    """
    excluded = _NO_DECAY_LEAVES if decay_embeddings else (*_NO_DECAY_LEAVES, "embedding")
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in excluded, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm, then AdamW (decoupled weight decay scaled by the schedule).

    Args:
      opt: the `optimizer` section of the run config.
      total_steps: train.steps (the default cosine horizon).
    """
    schedule = learning_rate_schedule(opt, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(
            learning_rate=schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=lambda params: weight_decay_mask(params, opt.decay_embeddings),
        ),
    )
